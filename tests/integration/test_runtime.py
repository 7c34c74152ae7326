"""The rule runtime in-process, on a real loop with real sockets: activate, replace, remove."""

from __future__ import annotations

import socket
import threading

import pytest

from conftest import free_port, free_port_block, wait_until
from peers import TcpEchoServer, UdpEchoServer
from portunus.loop import Loop
from portunus.model import Rule
from portunus.relay.rule_relay import RuleRelay
from portunus.relay.runtime import RELAYS, RuleRuntime, RuntimeSettings


class LoopThread:
    def __init__(self):
        self.loop = Loop()
        self.runtime = RuleRuntime(self.loop, RuntimeSettings(drain_timeout=1.0))
        self.t = threading.Thread(target=self.loop.run, daemon=True)
        self.t.start()

    def call(self, fn, *args):
        done = threading.Event()
        box = {}

        def run():
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # surface in the test thread
                box["error"] = exc
            done.set()
        self.loop.call_soon_threadsafe(run)
        assert done.wait(10), "loop did not run the call"
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def close(self):
        self.loop.stop_threadsafe()
        self.t.join(5)
        self.loop.close()


@pytest.fixture
def lt():
    x = LoopThread()
    yield x
    x.close()


def tcp_rule(rule_id, listen, target, **kw) -> Rule:
    return Rule.from_dict({"rule_id": rule_id, "listen_port": listen, "target": f"127.0.0.1:{target}", **kw})


def echo_once(c: socket.socket, data: bytes, expect: int | None = None) -> bytes:
    c.sendall(data)
    got = b""
    while len(got) < (expect or len(data)):
        b = c.recv(65536)
        if not b:
            break
        got += b
    return got


def test_reapplying_an_unchanged_rule_keeps_listener_and_connections(lt):
    listen, target = free_port(), free_port()
    echo = TcpEchoServer([target])
    try:
        rule = tcp_rule("r1", listen, target)
        assert lt.call(lt.runtime.activate, rule).state == "active"
        lsock_fd = lt.call(lambda: lt.runtime.rules["r1"].relay.listeners[listen].fileno())
        c = socket.create_connection(("127.0.0.1", listen), timeout=5)
        assert echo_once(c, b"one") == b"one"
        statuses = lt.call(lt.runtime.apply, [tcp_rule("r1", listen, target)])
        assert statuses["r1"].state == "active"
        assert lt.call(lambda: lt.runtime.rules["r1"].relay.listeners[listen].fileno()) == lsock_fd
        assert echo_once(c, b"two") == b"two"
        c.close()
    finally:
        echo.close()


def test_changed_target_keeps_listener_and_live_connection_new_ones_go_to_new_target(lt):
    listen, t1, t2 = free_port(), free_port(), free_port()
    e1 = TcpEchoServer([t1], prefix_port=True)
    e2 = TcpEchoServer([t2], prefix_port=True)
    try:
        lt.call(lt.runtime.activate, tcp_rule("r1", listen, t1))
        old = socket.create_connection(("127.0.0.1", listen), timeout=5)
        assert echo_once(old, b"x", len(f"{t1}:x")) == f"{t1}:x".encode()
        lt.call(lt.runtime.activate, tcp_rule("r1", listen, t2))
        new = socket.create_connection(("127.0.0.1", listen), timeout=5)
        assert echo_once(new, b"y", len(f"{t2}:y")) == f"{t2}:y".encode()
        assert echo_once(old, b"z") == b"z"  # still the first target, still alive
        old.close()
        new.close()
    finally:
        e1.close()
        e2.close()


def test_apply_removes_missing_rules_and_unbinds_their_ports(lt):
    a, b, target = free_port(), free_port(), free_port()
    lt.call(lt.runtime.apply, [tcp_rule("a", a, target), tcp_rule("b", b, target)])
    lt.call(lt.runtime.apply, [tcp_rule("b", b, target)])
    assert lt.call(lambda: sorted(lt.runtime.rules)) == ["b"]
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", a))  # free again
    s.close()


def test_failed_rule_reports_port_and_binds_nothing(lt):
    base = free_port_block(10)
    holder = socket.socket()
    holder.bind(("0.0.0.0", base + 9))
    holder.listen()
    try:
        rule = Rule.from_dict({"rule_id": "wide", "listen": f"{base}-{base + 9}",
                               "target": f"127.0.0.1:{base + 100}-{base + 109}"})
        st = lt.call(lt.runtime.activate, rule)
        assert st.state == "failed"
        assert st.code == "port_in_use" and st.port == base + 9
        assert st.reason == f"port_in_use (port {base + 9} already bound)"
        s = socket.socket()
        s.bind(("0.0.0.0", base))
        s.close()
        # the failed rule keeps its row until removed
        assert lt.call(lt.runtime.status, "wide").state == "failed"
        assert lt.call(lt.runtime.remove, "wide") is True
        assert lt.call(lt.runtime.status, "wide") is None
    finally:
        holder.close()


def test_remove_drains_then_closes_after_timeout(lt):
    listen, target = free_port(), free_port()
    echo = TcpEchoServer([target])
    try:
        lt.call(lt.runtime.activate, tcp_rule("r1", listen, target))
        c = socket.create_connection(("127.0.0.1", listen), timeout=5)
        assert echo_once(c, b"hi") == b"hi"
        drained = threading.Event()
        lt.call(lt.runtime.remove, "r1", drained.set)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", listen), timeout=2)
        assert echo_once(c, b"during drain") == b"during drain"
        assert drained.wait(5), "drain timeout (1 s) did not close the connection"
        c.settimeout(5)
        try:
            assert c.recv(10) == b""
        except ConnectionResetError:
            pass
        c.close()
    finally:
        echo.close()


def test_snapshot_counts_delivered_bytes_per_port(lt):
    base, target = free_port_block(3), free_port_block(3)
    echo = TcpEchoServer(range(target, target + 3))
    try:
        rule = Rule.from_dict({"rule_id": "rng", "listen": f"{base}-{base + 2}",
                               "target": f"127.0.0.1:{target}-{target + 2}"})
        lt.call(lt.runtime.activate, rule)
        c = socket.create_connection(("127.0.0.1", base + 2), timeout=5)
        assert echo_once(c, b"abcdef") == b"abcdef"
        snap = wait_until(lambda: (lambda s: s if s["bytes_out"] == 6 else None)(
            lt.call(lt.runtime.snapshot, "rng", True)))
        assert snap["bytes_in"] == 6 and snap["active_connections"] == 1
        rows = {r["listen_port"]: r for r in snap["per_port"]}
        assert rows[base + 2]["bytes_in"] == 6 and rows[base]["bytes_in"] == 0
        c.close()
    finally:
        echo.close()


def udp_rule(rule_id, listen, target, **kw) -> Rule:
    return Rule.from_dict({"rule_id": rule_id, "protocol": "udp", "listen_port": listen,
                           "target": f"127.0.0.1:{target}", **kw})


def udp_ask(s: socket.socket, listen: int, data: bytes) -> bytes:
    s.sendto(data, ("127.0.0.1", listen))
    return s.recvfrom(65536)[0]


def test_both_relays_implement_the_one_rule_relay_interface():
    for relay_cls in RELAYS.values():
        for name in ("bind", "start", "update", "close_listeners", "abort_sessions", "active", "snapshot"):
            assert hasattr(relay_cls, name), f"{relay_cls.__name__} lacks {name}"
    assert sorted(RELAYS) == ["tcp", "udp"]


def test_udp_relay_reports_its_live_flows_and_removal_ends_them_at_once(lt):
    listen, target = free_port(), free_port()
    echo = UdpEchoServer([target])
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        assert lt.call(lt.runtime.activate, udp_rule("u1", listen, target)).state == "active"
        relay = lt.call(lambda: lt.runtime.rules["u1"].relay)
        assert isinstance(relay, RuleRelay)
        for i, c in enumerate(clients):
            c.settimeout(5)
            assert udp_ask(c, listen, f"d{i}".encode()) == f"{target}:d{i}".encode()
        assert lt.call(lambda: relay.active) == 3  # one flow per source
        assert lt.call(lt.runtime.snapshot, "u1")["active_flows"] == 3
        removed = threading.Event()
        lt.call(lt.runtime.remove, "u1", removed.set)
        assert removed.is_set()  # replies go out through the listen socket: nothing to drain
        assert lt.call(lambda: relay.active) == 0
    finally:
        for c in clients:
            c.close()
        echo.close()


def test_udp_update_applies_new_default_limits_to_the_running_rule(lt):
    listen, target, other = free_port(), free_port(), free_port()
    lt.call(lt.runtime.activate, udp_rule("u1", listen, target))
    relay = lt.call(lambda: lt.runtime.rules["u1"].relay)
    assert relay.max_flows == 1024
    lt.call(setattr, lt.runtime.settings, "udp_max_flows", 7)  # as the agent does on welcome
    assert relay.max_flows == 1024  # a new default reaches a rule at its next update
    assert lt.call(lt.runtime.activate, udp_rule("u1", listen, other)).state == "active"
    assert lt.call(lambda: lt.runtime.rules["u1"].relay) is relay  # same listeners: updated in place
    assert relay.max_flows == 7
