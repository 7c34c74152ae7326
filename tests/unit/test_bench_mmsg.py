"""bench/portbench/mmsg: the bench's batched UDP I/O (recvmmsg/sendmmsg via ctypes) on real
127.0.0.1 sockets, and the closed-loop load generator against a real batched echo, both
with and without batching."""

from __future__ import annotations

import select
import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from portbench.mmsg import MSG_WAITFORONE, Batch  # noqa: E402
from portbench.tools import udp_load  # noqa: E402

pytestmark = pytest.mark.skipif(not Batch.available(), reason="libc without recvmmsg/sendmmsg")


def _udp(connect_to: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    if connect_to:
        s.connect(("127.0.0.1", connect_to))
    s.settimeout(5)
    return s


def test_send_copies_then_recv_and_echo_back_to_each_source():
    server, a, b = _udp(), _udp(), _udp()
    port = server.getsockname()[1]
    with server, a, b:
        a.connect(("127.0.0.1", port))
        tx = Batch(8)
        assert tx.send_copies(a.fileno(), b"hello", 3) == 3
        b.sendto(b"from-b-longer", ("127.0.0.1", port))
        rx = Batch(8)
        got = 0
        while got < 4:
            k = rx.recv(server.fileno(), MSG_WAITFORONE)
            assert [rx.data(i) for i in range(k)] == \
                ([b"hello"] * 3 + [b"from-b-longer"])[got:got + k]
            assert rx.lens(k) == [len(rx.data(i)) for i in range(k)]
            assert rx.echo(server.fileno(), k) == k
            got += k
        assert [a.recv(100) for _ in range(3)] == [b"hello"] * 3
        assert b.recvfrom(100) == (b"from-b-longer", ("127.0.0.1", port))
        # the buffers are whole again after an echo: a full-size datagram still fits
        a.send(b"x" * 2048)
        assert rx.recv(server.fileno(), MSG_WAITFORONE) == 1 and rx.data(0) == b"x" * 2048


def test_recv_on_an_empty_socket_is_zero_and_send_copies_is_capped_at_the_batch():
    s, peer = _udp(), _udp()
    with s, peer:
        b = Batch(4)
        assert b.recv(s.fileno()) == 0                      # EAGAIN -> 0, not an error
        peer.connect(s.getsockname())
        assert b.send_copies(peer.fileno(), b"p", 10) == 4  # at most n per call
        assert b.recv(s.fileno(), MSG_WAITFORONE) == 4      # the same batch receives again
        assert [b.data(i) for i in range(4)] == [b"p"] * 4


def test_a_refused_destination_raises_oserror_not_a_silent_zero():
    s = _udp()
    dead = _udp()
    dead_port = dead.getsockname()[1]
    dead.close()
    with s:
        s.connect(("127.0.0.1", dead_port))
        b = Batch(2)
        b.send_copies(s.fileno(), b"x", 1)
        with pytest.raises(OSError):
            for _ in range(50):                 # the ICMP error arrives on a later call
                b.send_copies(s.fileno(), b"x", 1)
                b.recv(s.fileno())


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("flows", [1, 8])
def test_load_generator_counts_every_echoed_datagram(batched, flows):
    server = _udp()
    port = server.getsockname()[1]
    stop = threading.Event()

    def echo():
        b = Batch(16)
        while not stop.is_set():
            if not select.select([server], [], [], 0.1)[0]:
                continue
            k = b.recv(server.fileno())
            if k:
                b.echo(server.fileno(), k)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    try:
        r = udp_load(port, flows, 2000, 32, 10.0, batched=batched)
    finally:
        stop.set()
        t.join(5)
        server.close()
    assert r["batched"] is batched
    assert r["sent"] == 2000 and r["received"] == 2000 and r["loss_pct"] == 0.0
    assert r["errors"] == 0
