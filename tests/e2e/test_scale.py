"""Scale: one process holds a 1024-port range and 10 000 concurrent TCP connections.

Each forwarded connection costs the relay two sockets, so 10 000 connections plus
1024 listeners need ~21 100 descriptors. Where the hard RLIMIT_NOFILE is lower and
cannot be raised (no CAP_SYS_RESOURCE, e.g. a 20 000 hard limit), the test runs
as many connections as fit under that limit and says so in its output.
"""

from __future__ import annotations

import resource
import selectors
import socket
import time

import pytest

from conftest import IN_CI, free_port_block, rule_stats, wait_until
from peers import TcpEchoServer

NOFILE = 65536
TARGET_CONNS = 10_000
WIDTH = 1024
MIN_CONNS = 8_000  # below this the machine is too small for the test to mean anything


def _nofile_limit() -> int:
    """Raise this process's fd limit as far as allowed; return the limit children can get."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (NOFILE, hard):
        if want == resource.RLIM_INFINITY:
            want = NOFILE
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard) if hard != resource.RLIM_INFINITY else hard))
            return want
        except (ValueError, OSError):
            continue
    return soft


def _raise_nofile() -> None:
    _nofile_limit()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_1024_port_range_with_10000_concurrent_connections(standalone, tmp_path):
    limit = _nofile_limit()  # this test process holds both ends of every connection
    # both the relay and this process hold 2 fds per connection plus 1024 listeners
    CONNS = min(TARGET_CONNS, (limit - WIDTH - 300) // 2)
    if CONNS < MIN_CONNS:
        msg = f"RLIMIT_NOFILE {limit} allows only {CONNS} connections"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    if CONNS < TARGET_CONNS:
        print(f"\nNOTE: hard RLIMIT_NOFILE {limit} fits {CONNS} connections, not {TARGET_CONNS}")

    sock = str(tmp_path / "s.sock")
    for attempt in range(3):
        listen, target = free_port_block(WIDTH), free_port_block(WIDTH)
        echo = TcpEchoServer(range(target, target + WIDTH))
        try:
            p = standalone(f"""
[global]
log_level = "info"
shutdown_drain_secs = 2
[stats]
socket_path = "{sock}"
[[rule]]
name = "wide"
listen_ports = "{listen}-{listen + WIDTH - 1}"
target = "127.0.0.1:{target}-{target + WIDTH - 1}"
""", preexec_fn=_raise_nofile)
            break
        except AssertionError as exc:
            echo.close()  # 1024 listeners must not leak into the tests that follow
            # a port of the block taken between the free-port check and the relay's bind: another block
            if "port_in_use" not in str(exc) or attempt == 2:
                raise
    try:
        _run_scale(p, listen, sock, CONNS)
    finally:
        echo.close()


def _run_scale(p, listen: int, sock: str, CONNS: int) -> None:
    sel = selectors.DefaultSelector()
    clients: list[socket.socket] = []
    try:
        # open 10 000 connections spread over every port of the range
        for i in range(CONNS):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", listen + i % WIDTH))
            clients.append(c)
            if i % 500 == 499:
                time.sleep(0.05)  # let the relay drain its accept queues
        # every connection carries its own token and gets exactly that back
        expect = {}
        for i, c in enumerate(clients):
            token = f"{i:05d}".encode()
            expect[c.fileno()] = token
            sel.register(c, selectors.EVENT_WRITE, i)
        got: dict[int, bytes] = {}
        sent = 0
        deadline = time.monotonic() + 120
        while len(got) < CONNS and time.monotonic() < deadline:
            for key, mask in sel.select(0.5):
                c = key.fileobj
                fd = c.fileno()
                if mask & selectors.EVENT_WRITE:
                    c.send(expect[fd])
                    sent += 1
                    sel.modify(c, selectors.EVENT_READ, key.data)
                elif mask & selectors.EVENT_READ:
                    data = c.recv(16)
                    got[fd] = got.get(fd, b"") + data
                    if len(got[fd]) >= 5 or not data:
                        sel.unregister(c)
        wrong = [fd for fd, tok in expect.items() if got.get(fd) != tok]
        assert not wrong, f"{len(wrong)} of {CONNS} connections did not echo their own token"

        stats = rule_stats(sock, "wide")
        assert stats["active_connections"] == CONNS
        with open(f"/proc/{p.p.pid}/status") as f:
            rss = {k: v.strip() for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}
        print(f"\nrelay memory with {WIDTH} listeners and {CONNS} connections: {rss}")
        assert len(stats["per_port"]) == WIDTH
        assert all(row["active_connections"] >= CONNS // WIDTH for row in stats["per_port"])
        assert not p.events("proxy.accept_error"), "the relay ran out of file descriptors"
        assert not p.events("loop.callback_error")
    finally:
        for c in clients:
            c.close()
        sel.close()
    stats = wait_until(lambda: (lambda s: s if s["active_connections"] == 0 else None)(
        rule_stats(sock, "wide")), timeout=60, interval=0.5, what="all connections to close")
    assert stats["bytes_in"] == CONNS * 5
