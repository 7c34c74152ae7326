"""TCP forwarding through the real standalone process: ranges, splice and userspace paths."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time

import pytest

from conftest import free_port, free_port_block, rule_stats, wait_until
from peers import TcpEchoServer


def roundtrip(port: int, payload: bytes, timeout: float = 30.0) -> bytes:
    """Send payload, half-close, read until EOF; returns what came back."""
    c = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = []

    def reader():
        while True:
            b = c.recv(1 << 20)
            if not b:
                return
            got.append(b)
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    c.sendall(payload)
    c.shutdown(socket.SHUT_WR)
    t.join(timeout)
    assert not t.is_alive(), "no EOF came back through the relay"
    c.close()
    return b"".join(got)


def range_config(listen: int, target: int, width: int, sock: str, name: str = "range") -> str:
    return f"""
[global]
log_level = "info"
shutdown_drain_secs = 2
[stats]
socket_path = "{sock}"
[[rule]]
name = "{name}"
listen_ports = "{listen}-{listen + width - 1}"
target = "127.0.0.1:{target}-{target + width - 1}"
"""


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "userspace"])
def test_100_port_range_moves_8mib_intact_on_several_ports(standalone, tmp_path, splice):
    listen, target = free_port_block(100), free_port_block(100)
    echo = TcpEchoServer(range(target, target + 100), prefix_port=True)
    sock = str(tmp_path / "stats.sock")
    env = {} if splice else {"PORTUNUS_DISABLE_SPLICE": "1"}
    p = standalone(range_config(listen, target, 100, sock), env=env)
    try:
        payload = os.urandom(8 << 20)
        want = hashlib.sha256(payload).hexdigest()
        results = {}

        def one(offset, idx):
            results[(offset, idx)] = roundtrip(listen + offset, payload)
        threads = [threading.Thread(target=one, args=(off, i)) for off in (0, 37, 99) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for (offset, _), got in results.items():
            prefix = f"{target + offset}:".encode()
            assert got.startswith(prefix), f"offset {offset} reached the wrong target port"
            assert hashlib.sha256(got[len(prefix):]).hexdigest() == want
        assert len(results) == 6

        stats = wait_until(lambda: (lambda s: s if s["active_connections"] == 0 else None)(
            rule_stats(sock, "range")), what="connections to close")
        assert stats["bytes_in"] == 6 * len(payload)
        per_port = {row["listen_port"]: row for row in stats["per_port"]}
        assert len(per_port) == 100
        for off in (0, 37, 99):
            assert per_port[listen + off]["bytes_in"] == 2 * len(payload)
            assert per_port[listen + off]["bytes_out"] == 2 * (len(payload) + len(f"{target + off}:"))
        assert per_port[listen + 1]["bytes_in"] == 0
        selected = p.events("proxy.splice_selected")
        if splice:
            assert selected and selected[0]["rule"] == "range"
        else:
            assert selected == []
    finally:
        echo.close()


def test_range_with_one_held_port_binds_nothing_and_names_the_port(standalone, procs, tmp_path):
    listen = free_port_block(20)
    held_port = listen + 5
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("0.0.0.0", held_port))
    holder.listen()
    try:
        p = standalone(range_config(listen, 40000, 20, str(tmp_path / "s.sock")), wait_ready=False)
        rc = p.wait(20)
        assert rc == 5
        err = p.lines
        assert any(f"port_in_use (port {held_port} already bound)" in line for line in err), p.log_text()
        assert any(line.startswith("error: port_in_use:") for line in err)
        # nothing of the range stayed bound
        for port in range(listen, listen + 20):
            if port == held_port:
                continue
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen()
            s.close()
    finally:
        holder.close()


def test_half_close_is_preserved(standalone, tmp_path):
    """The client half-closes; the target keeps sending after seeing EOF, and it all arrives."""
    listen, target = free_port(), free_port()
    srv = socket.socket()
    srv.bind(("127.0.0.1", target))
    srv.listen()
    p = standalone(range_config(listen, target, 1, str(tmp_path / "s.sock")))
    c = socket.create_connection(("127.0.0.1", listen), timeout=10)
    s, _ = srv.accept()
    s.settimeout(10)
    c.sendall(b"question")
    c.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        b = s.recv(100)
        if not b:
            break
        got += b
    assert got == b"question"  # target saw the data, then EOF
    s.sendall(b"answer after your EOF")
    s.close()
    back = b""
    c.settimeout(10)
    while True:
        b = c.recv(100)
        if not b:
            break
        back += b
    assert back == b"answer after your EOF"
    c.close()
    srv.close()
    assert p.p.poll() is None


def test_reset_on_one_side_resets_the_other(standalone, tmp_path):
    listen, target = free_port(), free_port()
    srv = socket.socket()
    srv.bind(("127.0.0.1", target))
    srv.listen()
    standalone(range_config(listen, target, 1, str(tmp_path / "s.sock")))
    c = socket.create_connection(("127.0.0.1", listen), timeout=10)
    s, _ = srv.accept()
    c.sendall(b"x")
    assert s.recv(1) == b"x"
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()  # RST towards the relay
    c.settimeout(10)
    with pytest.raises(ConnectionResetError):
        while True:
            if not c.recv(100):
                break  # a FIN would be wrong: RST must propagate
        raise AssertionError("got EOF instead of a reset")
    c.close()
    srv.close()


def test_unreachable_target_closes_the_connection_and_counts(standalone, tmp_path):
    listen, dead = free_port(), free_port()
    sock = str(tmp_path / "s.sock")
    standalone(range_config(listen, dead, 1, sock))
    c = socket.create_connection(("127.0.0.1", listen), timeout=10)
    assert c.recv(10) == b""
    c.close()
    stats = wait_until(lambda: (lambda s: s if s["active_connections"] == 0 else None)(rule_stats(sock, "range")))
    assert stats["connect_failures"] >= 1


def test_sigterm_drains_live_connections_then_exits_0(standalone, tmp_path):
    listen, target = free_port(), free_port()
    echo = TcpEchoServer([target])
    p = standalone(range_config(listen, target, 1, str(tmp_path / "s.sock")).replace(
        "shutdown_drain_secs = 2", "shutdown_drain_secs = 10"))
    try:
        c = socket.create_connection(("127.0.0.1", listen), timeout=10)
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        p.signal(signal.SIGTERM)
        p.wait_event("process.shutdown")
        # the listener is closed at once ...
        wait_until(lambda: _refused(listen), what="listener to close")
        # ... but the live connection still works during the drain
        c.sendall(b"still here")
        assert c.recv(100) == b"still here"
        c.close()
        assert p.wait(15) == 0
    finally:
        echo.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def test_drain_timeout_closes_stuck_connections(standalone, tmp_path):
    listen, target = free_port(), free_port()
    echo = TcpEchoServer([target])
    p = standalone(range_config(listen, target, 1, str(tmp_path / "s.sock")).replace(
        "shutdown_drain_secs = 2", "shutdown_drain_secs = 1"))
    try:
        c = socket.create_connection(("127.0.0.1", listen), timeout=10)
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        p.signal(signal.SIGTERM)
        assert p.wait(15) == 0
        c.settimeout(5)
        try:
            data = c.recv(10)
        except ConnectionResetError:
            data = b""
        assert data == b""
        c.close()
    finally:
        echo.close()


def test_out_of_file_descriptors_backs_off_and_recovers(standalone, tmp_path):
    """With a tiny fd limit the listener logs proxy.accept_error, keeps serving, and recovers."""
    import resource

    def tiny_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
    listen, target = free_port(), free_port()
    echo = TcpEchoServer([target])
    p = standalone(range_config(listen, target, 1, str(tmp_path / "s.sock")), preexec_fn=tiny_limit)
    conns = []
    try:
        for _ in range(40):  # each costs the relay two fds: more than the limit allows
            conns.append(socket.create_connection(("127.0.0.1", listen), timeout=5))
        p.wait_event("proxy.accept_error", timeout=10)
        assert p.events("proxy.accept_error")[0]["errno_name"] in ("EMFILE", "ENFILE")
        for c in conns:
            c.close()
        conns.clear()

        def works():
            try:
                c = socket.create_connection(("127.0.0.1", listen), timeout=2)
                c.settimeout(2)
                c.sendall(b"again")
                ok = c.recv(5) == b"again"
                c.close()
                return ok
            except OSError:
                return False
        wait_until(works, timeout=15, what="relay to serve again after fd exhaustion")
        assert p.p.poll() is None
    finally:
        for c in conns:
            c.close()
        echo.close()


def test_sighup_reloads_rules_keeping_unchanged_ones_and_survives_a_bad_config(standalone, tmp_path):
    a_listen, b_listen, target = free_port(), free_port(), free_port()
    echo = TcpEchoServer([target])
    base = f"""
[global]
shutdown_drain_secs = 2
[[rule]]
name = "a"
listen_port = {a_listen}
target = "127.0.0.1:{target}"
"""
    p = standalone(base)
    try:
        live = socket.create_connection(("127.0.0.1", a_listen), timeout=5)
        live.sendall(b"one")
        assert live.recv(3) == b"one"
        p.config_path.write_text(base + f"""
[[rule]]
name = "b"
listen_port = {b_listen}
target = "127.0.0.1:{target}"
""")
        p.signal(signal.SIGHUP)
        ev = p.wait_event("config.reloaded")
        assert ev["added"] == ["b"] and ev["removed"] == [] and ev["changed"] == []
        c = socket.create_connection(("127.0.0.1", b_listen), timeout=5)
        c.sendall(b"two")
        assert c.recv(3) == b"two"
        c.close()
        live.sendall(b"still")  # rule a was unchanged: its connection lives on
        assert live.recv(5) == b"still"

        p.config_path.write_text("[[rule]]\nname = 'x'\nlisten_port = 0\n")
        p.signal(signal.SIGHUP)
        bad = p.wait_event("config.reload_failed")
        assert bad["code"] == "config_invalid"
        live.sendall(b"alive")
        assert live.recv(5) == b"alive"
        c = socket.create_connection(("127.0.0.1", b_listen), timeout=5)
        c.close()
        live.close()
        assert p.p.poll() is None
    finally:
        echo.close()
