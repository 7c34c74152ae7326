"""UDP flows on real loopback sockets, the loop driven from the test: the recvmmsg/sendmmsg path
and the per-datagram fallback give the same datagrams, counters and drops (SPEC §2.4, §2.10):
several flows in one batch stay apart and in order, the flow cap, ICMP eviction in the middle of
a batch, an owner quota and a bandwidth cap trimmed datagram by datagram, and (batched path
only) partial sends, EAGAIN and a refused call (ENOSYS) that switches to the fallback."""

from __future__ import annotations

import ctypes
import errno
import socket

import pytest

from conftest import free_port, free_port_block
from harness import LogCapture
from portunus.control import messages as m
from portunus.loop import Loop
from portunus.model import Rule
from portunus.ratelimit import RateLimit
from portunus.relay import mmsg
from portunus.relay.context import RelayContext
from portunus.relay.runtime import RuleRuntime
from portunus.relay.udp import flush_replies

PATHS = ["batched", "gso", "per_datagram"]  # batched: recvmmsg/sendmmsg with GSO off
needs_batch = pytest.mark.skipif(mmsg._libc_calls() is None, reason="recvmmsg/sendmmsg need Linux libc")


class Spy:
    """Wraps the real recvmmsg/sendmmsg of a Batch and records (fd, vlen, result) per call."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[tuple[int, int, int]] = []
        self.script: list = []  # per call: None (real), or ("partial", k), or ("errno", e)

    def __call__(self, fd, addr, vlen, *rest):
        step = self.script.pop(0) if self.script else None
        if step is None:
            r = self.fn(fd, addr, vlen, *rest)
        elif step[0] == "partial":
            r = self.fn(fd, addr, min(vlen, step[1]), *rest)
        else:
            ctypes.set_errno(step[1])
            r = -1
        self.calls.append((fd, vlen, r))
        return r


class WriteSpy:
    """Wraps a Batch's ``send_one`` (os.write of a run of one) and records (fd, bytes) per call;
    ``script`` entries ("errno", e) make a call raise that OSError instead of sending."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[tuple[int, bytes]] = []
        self.script: list = []

    def __call__(self, fd, data):
        step = self.script.pop(0) if self.script else None
        self.calls.append((fd, bytes(data)))
        if step is not None:
            raise OSError(step[1], "scripted")
        return self.fn(fd, data)


class Rig:
    def __init__(self, path: str, target_port: int | None = None, **rule):
        self.loop = Loop()
        self.ctx = RelayContext(self.loop)
        self.batch = None
        if path == "per_datagram":
            self.ctx.udp_batch = None
        else:
            self.batch = mmsg.batch_for(self.ctx)
            assert self.batch is not None
            if path == "gso" and self.batch.gso_max == mmsg.GSO_OFF:
                pytest.skip("no UDP GSO on this kernel")
            if path == "batched":
                self.batch.gso_max = mmsg.GSO_OFF
            self.batch.recvmmsg = self.recv_spy = Spy(self.batch.recvmmsg)
            self.batch.sendmmsg = self.send_spy = Spy(self.batch.sendmmsg)
            self.batch.send_one = self.write_spy = WriteSpy(self.batch.send_one)
        self.target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.target.bind(("127.0.0.1", target_port or 0))
        self.target.setblocking(False)
        self.rt = RuleRuntime(self.loop, ctx=self.ctx)
        self.clients: list[socket.socket] = []
        self.listen = rule.pop("listen_port", None) or free_port()
        tport = self.target.getsockname()[1]
        target = f"127.0.0.1:{tport}-{tport + rule.pop('target_width') - 1}" if "target_width" in rule \
            else f"127.0.0.1:{tport}"
        self.rule = Rule.from_dict({"rule_id": "u", "protocol": "udp", "listen_port": self.listen,
                                    "target": target, **rule})
        assert self.rt.activate(self.rule).state == "active"

    @property
    def relay(self):
        return self.rt.rules["u"].relay

    def snap(self) -> dict:
        counters = self.rt.rules["u"].counters
        return {**counters.snapshot(), "flows_evicted_icmp": counters.flows_evicted_icmp}

    def client(self) -> socket.socket:
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.bind(("127.0.0.1", 0))
        c.setblocking(False)
        self.clients.append(c)
        return c

    def run_until(self, pred, what: str, timeout: float = 5.0) -> None:
        assert self.loop.run_until(pred, timeout), f"timed out waiting for {what}: {self.snap()}"

    def target_drain(self) -> list[tuple[bytes, tuple]]:
        out = []
        while True:
            try:
                out.append(self.target.recvfrom(70000))
            except BlockingIOError:
                return out

    @staticmethod
    def drain(s: socket.socket) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(s.recv(70000))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.rt.abort_all()
        for live in self.rt.rules.values():
            if live.relay is not None:
                live.relay.close_listeners()
        self.ctx.close()
        self.loop.close()
        self.target.close()
        for c in self.clients:
            c.close()


def install_cap(rig: "Rig", where: str, cap: RateLimit) -> None:
    """A cap arrives while the rule's flows live: on the rule (a hot update) or on owner alice."""
    if where == "rule":
        rule = Rule.from_dict({**rig.rule.to_dict(), "rate_limit": cap.to_dict()})
        assert rig.rt.activate(rule).state == "active" and rig.relay.flows  # a hot update: flows stay
    else:
        rig.rt.set_owner_cap("alice", cap)


@pytest.fixture
def rigs():
    made = []

    def make(path, **kw):
        r = Rig(path, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


@pytest.mark.parametrize("path", PATHS)
def test_interleaved_sources_in_one_batch_stay_apart_in_order_and_counted(rigs, path):
    if path != "per_datagram" and mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    rig = rigs(path)
    a, b, c = rig.client(), rig.client(), rig.client()
    pattern = [(a, b"a1"), (a, b"a2"), (b, b"b1"), (c, b"c1"), (c, b"c2"), (a, b"a3"), (b, b"b2"),
               (b, b"b3"), (c, b"c3"), (a, b"a4xx")]
    for s, data in pattern:
        s.sendto(data, ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 10, "10 datagrams upstream")
    got = rig.target_drain()
    by_src: dict = {}
    for data, src in got:
        by_src.setdefault(src, []).append(data)
    assert sorted(by_src.values()) == [[b"a1", b"a2", b"a3", b"a4xx"], [b"b1", b"b2", b"b3"], [b"c1", b"c2", b"c3"]]
    snap = rig.snap()
    assert snap["active_flows"] == 3 and snap["bytes_in"] == sum(len(d) for _, d in pattern)
    if path != "per_datagram":
        # one recvmmsg read all ten; each run of one source went upstream in one sendmmsg,
        # each lone datagram in one write(2)
        assert rig.recv_spy.calls[0][2] == 10
        # runs a1 a2 | b1 | c1 c2 | a3 | b2 b3 | c3 | a4xx: a message per datagram, or with GSO
        # one per run of equal sizes; b1, a3, c3 and a4xx went by write, from their flows' sockets
        want = [2, 2, 2] if path == "batched" else [1, 1, 1]
        assert [r for _, _, r in rig.send_spy.calls] == want
        fds = {src: f.fd for (_, src), f in rig.relay.flows.items()}
        assert rig.write_spy.calls == [(fds[b.getsockname()], b"b1"), (fds[a.getsockname()], b"a3"),
                                       (fds[c.getsockname()], b"c3"), (fds[a.getsockname()], b"a4xx")]
        rig.send_spy.calls.clear()
    for data, src in got:
        rig.target.sendto(b"R" + data, src)
    rig.run_until(lambda: rig.snap()["datagrams_out"] == 10, "10 replies")
    assert rig.drain(a) == [b"Ra1", b"Ra2", b"Ra3", b"Ra4xx"]
    assert rig.drain(b) == [b"Rb1", b"Rb2", b"Rb3"]
    assert rig.drain(c) == [b"Rc1", b"Rc2", b"Rc3"]
    snap = rig.snap()
    assert snap["bytes_out"] == snap["bytes_in"] + 10 and snap["send_dropped"] == 0
    targets = rig.rt.snapshot("u", per_target=True)["per_target"]
    assert targets[0]["bytes_in"] == snap["bytes_in"] and targets[0]["bytes_out"] == snap["bytes_out"]
    if path != "per_datagram":
        # the replies of all three flows went back through the listen socket in one sendmmsg per turn
        lfd = rig.relay.sockets[rig.listen].fileno()
        replies = [(n, r) for fd, n, r in rig.send_spy.calls if fd == lfd]
        assert all(n == r for n, r in replies) and len(replies) <= 3
        if path == "batched":
            assert sum(r for _, r in replies) == 10 and max(r for _, r in replies) > 1


@pytest.mark.parametrize("path", PATHS)
def test_a_65507_byte_datagram_goes_whole_both_ways(rigs, path):
    if path != "per_datagram" and mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    rig = rigs(path)
    a = rig.client()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    big = bytes(range(256)) * 255 + b"\x01" * 227
    assert len(big) == 65507
    a.sendto(big, ("127.0.0.1", rig.listen))
    a.sendto(b"small", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 2, "both upstream")
    got = rig.target_drain()
    assert [d for d, _ in got] == [big, b"small"]
    for d, src in got:
        rig.target.sendto(d, src)
    rig.run_until(lambda: rig.snap()["datagrams_out"] == 2, "both back")
    assert rig.drain(a) == [big, b"small"]


@pytest.mark.parametrize("path", PATHS)
def test_the_flow_cap_drops_and_counts_every_datagram_of_the_flows_over_it(rigs, path):
    if path != "per_datagram" and mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    rig = rigs(path, udp_max_flows=2)
    cs = [rig.client() for _ in range(4)]
    for rnd in range(3):
        for i, c in enumerate(cs):
            c.sendto(f"{i}{rnd}".encode(), ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] + rig.snap()["flows_dropped_overflow"] == 12, "all decided")
    snap = rig.snap()
    assert snap["datagrams_in"] == 6 and snap["flows_dropped_overflow"] == 6 and snap["active_flows"] == 2
    assert sorted(d for d, _ in rig.target_drain()) == [b"00", b"01", b"02", b"10", b"11", b"12"]


@pytest.mark.parametrize("path", PATHS)
def test_icmp_eviction_evicts_counts_and_the_next_datagram_rebuilds_the_flow(rigs, path):
    """Nothing listens on the target: each flow's first datagram draws an ICMP port unreachable,
    the upstream socket reports ECONNREFUSED and the flow is evicted; the next datagram from the
    same source builds a new one (a new upstream socket, a new target pick)."""
    if path != "per_datagram" and mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    dead = free_port()
    rig = rigs(path, target_port=dead)
    rig.target.close()  # the port stays unbound: ICMP port unreachable
    a = rig.client()
    for n in range(1, 4):
        a.sendto(b"d%d" % n, ("127.0.0.1", rig.listen))
        rig.run_until(lambda: rig.snap()["flows_evicted_icmp"] == n, f"eviction {n}")
        snap = rig.snap()
        assert snap["datagrams_in"] == n and snap["active_flows"] == 0 and snap["send_dropped"] == 0
    assert rig.rt.snapshot("u", per_target=True)["per_target"][0]["connections"] == 3


@pytest.mark.parametrize("path", PATHS)
def test_an_icmp_error_met_by_a_batch_send_evicts_and_the_rest_of_the_run_builds_a_new_flow(rigs, path):
    """The error is already pending when the listen socket's handler sends the next run (its
    event came first): the run's first datagram meets ECONNREFUSED and is lost with the flow, the
    rest of the run builds a new flow, as datagram by datagram."""
    if path != "per_datagram" and mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    dead = free_port()
    rig = rigs(path, target_port=dead)
    rig.target.close()
    a = rig.client()
    a.sendto(b"d1", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 1, "d1 sent (its ICMP now pending on the flow)")
    assert rig.snap()["flows_evicted_icmp"] == 0
    for d in (b"d2", b"d3", b"d4"):
        a.sendto(d, ("127.0.0.1", rig.listen))
    relay = rig.relay
    sock = relay.sockets[rig.listen]
    first = next(iter(relay.flows.values()))
    handler = relay._batch_receiver(sock, rig.listen) if path == "batched" else relay._receiver(sock, rig.listen)
    handler()  # the listen socket's event before the upstream socket's
    snap = rig.snap()
    assert first.closed and snap["send_dropped"] == 0
    if path == "batched":
        # d2 met the error; d3 and d4 went in one sendmmsg on the new flow (the ICMP that d3 draws
        # surfaces after the call, as it would an RTT later on a real network)
        assert snap["flows_evicted_icmp"] == 1 and snap["datagrams_in"] == 1 + 2
        assert snap["active_flows"] == 1 and next(iter(relay.flows.values())) is not first
    else:
        # on loopback the ICMP d3 draws is there before d4's send: d4 meets it too
        assert snap["flows_evicted_icmp"] == 2 and snap["datagrams_in"] == 1 + 1
        assert snap["active_flows"] == 0


def quota_set(user: str, remaining: int) -> dict:
    import time
    now = int(time.time())
    return m.traffic_quota_update(user, "edge-01", "set", {
        "monthly_bytes": remaining, "budget_remaining_bytes": remaining,
        "period_started_at": now - 3600, "period_ends_at": now + 30 * 86400, "exhausted": False})


@pytest.mark.parametrize("path", PATHS)
def test_a_quota_trims_a_batch_to_the_last_whole_datagram_that_fits(rigs, path):
    if path != "per_datagram" and mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    rig = rigs(path, owner="fred")
    rig.ctx.enforcer.quotas.apply_update(quota_set("fred", 1050))
    a = rig.client()
    for i in range(15):
        a.sendto(bytes([65 + i]) * 100, ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] + rig.snap()["quota_dropped"] == 15, "15 decided")
    snap = rig.snap()
    handle = rig.ctx.enforcer.quotas.handle("fred")
    assert snap["datagrams_in"] == 10 and snap["quota_dropped"] == 5
    assert handle.debited_total == 1000 and handle.exhausted  # the 11th did not fit in the 50 left
    assert [d for d, _ in rig.target_drain()] == [bytes([65 + i]) * 100 for i in range(10)]


@pytest.mark.parametrize("path", PATHS)
def test_a_bandwidth_cap_passes_or_drops_each_datagram_of_a_batch_whole(rigs, path):
    if path != "per_datagram" and mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    rig = rigs(path, rate_limit={"bandwidth_in_bps": 1000})
    a = rig.client()
    for _ in range(10):
        a.sendto(b"d" * 400, ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] + rig.rt.snapshot("u")["rate_limit"]["bandwidth_dropped_in"] == 10,
                  "10 decided")
    snap = rig.rt.snapshot("u")
    assert snap["datagrams_in"] in (2, 3) and snap["bytes_in"] == 400 * snap["datagrams_in"]
    assert len(rig.target_drain()) == snap["datagrams_in"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("where", ["rule", "owner"])
def test_a_bandwidth_cap_installed_after_admission_binds_lone_datagrams_of_many_flows(rigs, path, where):
    """Interleaved sources (runs of one, which skip the per-datagram cap check while no cap can
    bind; an owner's flows carry its quota, so they are gated anyway): a cap hot-installed on the
    rule, or on its owner's envelope, binds the flows admitted before it from the next batch on;
    each datagram passes or drops whole and is counted."""
    if path != "per_datagram" and mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    rig = rigs(path, **({"owner": "alice"} if where == "owner" else {}))
    cs = [rig.client() for _ in range(4)]
    for c in cs:
        for _ in range(2):
            c.sendto(b"u" * 100, ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 8, "8 upstream, uncapped")
    rig.target_drain()
    install_cap(rig, where, RateLimit.from_dict({"bandwidth_in_bps": 1000}))
    for _ in range(5):
        for c in cs:
            c.sendto(b"c" * 400, ("127.0.0.1", rig.listen))
    dropped = lambda: rig.rt.snapshot("u")["rate_limit"]["bandwidth_dropped_in"]
    rig.run_until(lambda: rig.snap()["datagrams_in"] + dropped() == 8 + 20, "20 decided")
    passed = rig.snap()["datagrams_in"] - 8
    assert 1 <= passed <= 3 and dropped() == 20 - passed  # a 1000 B/s bucket: two or three 400 B
    assert rig.snap()["bytes_in"] == 800 + 400 * passed and rig.snap()["active_flows"] == 4
    assert len(rig.target_drain()) == passed


def test_maybe_capped_answers_for_the_rule_limiter_and_its_owners_envelope(rigs):
    rig = rigs("per_datagram", owner="bob")
    relay = rig.relay
    assert relay.maybe_capped() is False  # no cap anywhere
    rig.rt.set_owner_cap("bob", RateLimit.from_dict({"concurrent_connections": 5}))
    assert relay.maybe_capped() is False  # an envelope without a bandwidth cap
    rig.rt.set_owner_cap("bob", RateLimit.from_dict({"bandwidth_out_bps": 10_000}))
    assert relay.maybe_capped() is True
    rig.rt.set_owner_cap("bob", None)
    assert relay.maybe_capped() is False
    rule = Rule.from_dict({**rig.rule.to_dict(), "rate_limit": {"bandwidth_in_bps": 1000}})
    assert rig.rt.activate(rule).state == "active"
    assert relay.maybe_capped() is True
    rig.ctx.enforcer.limits.rules.pop("u")  # the rule leaving the book: each flow is asked
    assert relay.maybe_capped() is True


@pytest.mark.parametrize("path", PATHS)
def test_a_range_rule_keys_flows_by_port_and_source(rigs, path):
    if path != "per_datagram" and mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    base = free_port_block(2)
    rig = rigs(path, listen_port=base, listen_port_end=base + 1, target_width=2)
    a = rig.client()
    a.sendto(b"p0", ("127.0.0.1", base))
    a.sendto(b"p1", ("127.0.0.1", base + 1))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 2, "both ports")
    assert rig.snap()["active_flows"] == 2
    # both land on the one target port + the port's offset: p0 here, p1 on target+1 (unbound: ICMP)
    assert [d for d, _ in rig.target_drain()] == [b"p0"]


# ---- the batched path only -----------------------------------------------------------------

@needs_batch
def test_a_partial_sendmmsg_then_eagain_drops_and_counts_the_rest(rigs):
    rig = rigs("batched")  # GSO off: a message per datagram
    a = rig.client()
    a.sendto(b"first", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 1, "the flow up")
    rig.target_drain()
    rig.send_spy.script = [("partial", 2), ("errno", errno.EAGAIN)]
    for i in range(5):
        a.sendto(b"x%d" % i, ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["send_dropped"] == 3, "three dropped")
    snap = rig.snap()
    assert snap["datagrams_in"] == 3 and snap["bytes_in"] == 5 + 2 * 2
    assert [d for d, _ in rig.target_drain()] == [b"x0", b"x1"]
    assert rig.batch.enabled


@needs_batch
def test_a_one_off_send_error_drops_that_datagram_only_and_keeps_batching(rigs):
    rig = rigs("batched")
    a = rig.client()
    a.sendto(b"first", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 1, "the flow up")
    rig.target_drain()
    rig.send_spy.script = [("errno", errno.EPERM)]  # e.g. a netfilter rule refusing one packet
    for i in range(4):
        a.sendto(b"y%d" % i, ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 4, "the other three")
    assert rig.snap()["send_dropped"] == 1
    assert [d for d, _ in rig.target_drain()] == [b"y1", b"y2", b"y3"]
    assert rig.batch.enabled and rig.relay.batch is rig.batch


@needs_batch
@pytest.mark.parametrize("err", [errno.EAGAIN, errno.EPERM])
def test_a_lone_datagram_whose_write_fails_is_dropped_and_counted_and_the_batch_goes_on(rigs, err):
    """Sources interleaved (runs of one, each a write(2) on its flow's socket): the write that
    meets a full socket (EAGAIN) or a refusal loses that datagram alone, counted; the others of
    the same batch go, each counted once, and the flow stays."""
    rig = rigs("batched")
    cs = [rig.client() for _ in range(3)]
    for c in cs:
        c.sendto(b"hello", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 3, "three flows up")
    rig.target_drain()
    rig.write_spy.calls.clear()
    rig.write_spy.script = [None, ("errno", err)]  # the second write of the batch fails
    for i in range(2):
        for k, c in enumerate(cs):
            c.sendto(b"%d-%d" % (k, i), ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 3 + 5, "five more upstream")
    snap = rig.snap()
    assert snap["send_dropped"] == 1 and snap["bytes_in"] == 15 + 5 * 3 and snap["active_flows"] == 3
    assert len(rig.write_spy.calls) == 6 and rig.send_spy.calls == []
    got = sorted(d for d, _ in rig.target_drain())
    assert got == [b"0-0", b"0-1", b"1-1", b"2-0", b"2-1"]
    assert rig.batch.enabled and not any(f.closed for f in rig.relay.flows.values())


@needs_batch
def test_an_icmp_error_met_by_a_lone_write_evicts_that_flow_and_counts_nothing_else(rigs):
    rig = rigs("batched")
    a, b = rig.client(), rig.client()
    for c in (a, b):
        c.sendto(b"hello", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 2, "two flows up")
    rig.target_drain()
    first = rig.relay.flows[(rig.listen, a.getsockname())]
    rig.write_spy.script = [("errno", errno.ECONNREFUSED)]
    a.sendto(b"a1", ("127.0.0.1", rig.listen))
    b.sendto(b"b1", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 3, "b1 upstream")
    snap = rig.snap()
    assert first.closed and snap["flows_evicted_icmp"] == 1 and snap["send_dropped"] == 0
    assert snap["active_flows"] == 1 and [d for d, _ in rig.target_drain()] == [b"b1"]
    a.sendto(b"a2", ("127.0.0.1", rig.listen))  # a new flow for the evicted source
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 4, "a2 upstream on a new flow")
    assert rig.snap()["active_flows"] == 2 and [d for d, _ in rig.target_drain()] == [b"a2"]


@needs_batch
def test_replies_that_meet_eagain_on_the_listen_socket_are_dropped_and_counted(rigs):
    rig = rigs("batched")
    a = rig.client()
    a.sendto(b"q", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 1, "the flow up")
    (_, src), = rig.target_drain()
    rig.send_spy.script = [("partial", 1), ("errno", errno.EAGAIN)]
    for i in range(4):
        rig.target.sendto(b"r%d" % i, src)
    rig.run_until(lambda: rig.snap()["send_dropped"] == 3, "three replies dropped")
    assert rig.snap()["datagrams_out"] == 1 and rig.drain(a) == [b"r0"]


@needs_batch
def test_replies_queued_when_the_listeners_close_are_counted_as_dropped(rigs):
    rig = rigs("batched")
    a = rig.client()
    a.sendto(b"q", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 1, "the flow up")
    (_, src), = rig.target_drain()
    for i in range(3):
        rig.target.sendto(b"r%d" % i, src)
    flow = next(iter(rig.relay.flows.values()))
    flow.on_upstream_batch()  # read and queued for the turn's flush ...
    assert rig.batch.q_n == 3
    relay = rig.relay
    relay.close_listeners()   # ... but the listen socket goes first
    flush_replies(rig.batch)
    assert rig.snap()["send_dropped"] == 3 and rig.snap()["datagrams_out"] == 0
    assert rig.batch.q_n == 0 and rig.batch.q_sock is None


@needs_batch
def test_enosys_from_recvmmsg_switches_the_context_to_the_per_datagram_path(rigs, monkeypatch):
    logs = LogCapture(monkeypatch)
    rig = rigs("batched")
    rig.recv_spy.script = [("errno", errno.ENOSYS)]
    a = rig.client()
    a.sendto(b"one", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 1, "forwarded per datagram")
    assert not rig.batch.enabled and rig.relay.batch is None and rig.ctx.udp_batch is rig.batch
    (ev,) = logs.events("proxy.udp_batch_unsupported_fallback", rule="u")
    assert ev["errno_name"] == "ENOSYS"
    (_, src), = rig.target_drain()
    rig.target.sendto(b"back", src)
    rig.run_until(lambda: rig.snap()["datagrams_out"] == 1, "the reply per datagram")
    assert rig.drain(a) == [b"back"]
    calls = len(rig.recv_spy.calls) + len(rig.send_spy.calls)
    a.sendto(b"two", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 2, "still per datagram")
    assert len(rig.recv_spy.calls) + len(rig.send_spy.calls) == calls  # the batch calls are out of it
    # another UDP rule on the same context starts per datagram
    other = Rule.from_dict({"rule_id": "u2", "protocol": "udp", "listen_port": free_port(),
                            "target": f"127.0.0.1:{rig.target.getsockname()[1]}"})
    assert rig.rt.activate(other).state == "active"
    assert rig.rt.rules["u2"].relay.batch is None


@needs_batch
def test_enosys_on_an_upstream_socket_falls_back_and_the_reply_still_arrives(rigs, monkeypatch):
    LogCapture(monkeypatch)
    rig = rigs("batched")
    a = rig.client()
    a.sendto(b"one", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 1, "the flow up")
    (_, src), = rig.target_drain()
    rig.recv_spy.script = [("errno", errno.ENOSYS)]
    rig.target.sendto(b"back", src)
    rig.run_until(lambda: rig.snap()["datagrams_out"] == 1, "the reply per datagram")
    assert rig.drain(a) == [b"back"] and not rig.batch.enabled


# ---- GSO ------------------------------------------------------------------------------------

def gso_rig(rigs):
    if mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    return rigs("gso")


def test_gso_sends_a_run_of_equal_datagrams_in_one_message_and_they_arrive_apart(rigs):
    rig = gso_rig(rigs)
    a = rig.client()
    sent = [bytes([48 + i]) * 100 for i in range(10)] + [b"tail"]
    for d in sent:
        a.sendto(d, ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 11, "11 upstream")
    assert [(n, r) for _, n, r in rig.send_spy.calls] == [(1, 1)]  # 10 x 100 B + the shorter tail
    got = rig.target_drain()
    assert [d for d, _ in got] == sent
    assert rig.snap()["bytes_in"] == 1004
    rig.send_spy.calls.clear()
    for d, src in got:
        rig.target.sendto(d, src)
    rig.run_until(lambda: rig.snap()["datagrams_out"] == 11, "11 back")
    assert rig.drain(a) == sent
    assert sum(r for _, _, r in rig.send_spy.calls) <= 2  # one or two GSO messages, not eleven


def test_gso_runs_split_at_sizes_and_sources(rigs):
    rig = gso_rig(rigs)
    a, b = rig.client(), rig.client()
    pattern = [(a, 100), (a, 100), (a, 50), (a, 50), (a, 200), (b, 200), (b, 200), (b, 0), (b, 0)]
    for i, (s, n) in enumerate(pattern):
        s.sendto(bytes([i]) * n, ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 9, "9 upstream")
    # a: [100 100 50] [50] [200]; b: [200 200] [0] [0] (a datagram of 0 bytes goes alone)
    assert [(n, r) for _, n, r in rig.send_spy.calls] == [(3, 3), (3, 3)]
    got = rig.target_drain()
    by_src: dict = {}
    for d, src in got:
        by_src.setdefault(src, []).append(d)
    want = [[bytes([i]) * n for i, (s, n) in enumerate(pattern) if s is who] for who in (a, b)]
    assert sorted(by_src.values()) == sorted(want)


@pytest.mark.parametrize("err", [errno.EIO, errno.EINVAL])
def test_a_path_that_refuses_gso_gets_the_run_again_one_datagram_a_message(rigs, err):
    rig = gso_rig(rigs)
    a = rig.client()
    a.sendto(b"first", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 1, "the flow up")
    rig.target_drain()
    flow = next(iter(rig.relay.flows.values()))
    rig.send_spy.script = [("errno", err)]
    for i in range(6):
        a.sendto(b"g%d" % i * 40, ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 7, "all six after the refusal")
    assert [d for d, _ in rig.target_drain()] == [b"g%d" % i * 40 for i in range(6)]
    assert rig.snap()["send_dropped"] == 0
    assert [(n, r) for _, n, r in rig.send_spy.calls[-2:]] == [(1, -1), (6, 6)]
    assert flow.gso_max == (mmsg.GSO_OFF if err == errno.EIO else 80 - 1)
    # a smaller size may still go as one message after EINVAL; after EIO nothing does
    rig.send_spy.calls.clear()
    for i in range(3):
        a.sendto(b"s%d" % i, ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 10, "three more")
    assert [(n, r) for _, n, r in rig.send_spy.calls] == [(1, 1)] if err == errno.EINVAL else [(3, 3)]
    assert [d for d, _ in rig.target_drain()] == [b"s0", b"s1", b"s2"]


def test_replies_that_gso_refuses_go_again_one_a_message(rigs):
    rig = gso_rig(rigs)
    a = rig.client()
    a.sendto(b"q", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 1, "the flow up")
    (_, src), = rig.target_drain()
    flow = next(iter(rig.relay.flows.values()))
    rig.send_spy.script = [("errno", errno.EIO)]
    for i in range(4):
        rig.target.sendto(b"r%d" % i, src)
    rig.run_until(lambda: rig.snap()["datagrams_out"] == 4, "four replies")
    assert rig.drain(a) == [b"r0", b"r1", b"r2", b"r3"] and rig.snap()["send_dropped"] == 0
    assert flow.gso_max == mmsg.GSO_OFF


@pytest.mark.parametrize("path", PATHS)
def test_an_ipv6_listener_keys_and_answers_its_sources(rigs, path):
    if path != "per_datagram" and mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no ::1 here")
    rig = rigs(path, listen_host="::1")
    cs = []
    for _ in range(2):
        c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        c.bind(("::1", 0))
        c.setblocking(False)
        rig.clients.append(c)
        cs.append(c)
    for i in range(3):
        for k, c in enumerate(cs):
            c.sendto(b"%d-%d" % (k, i), ("::1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 6, "6 upstream")
    assert rig.snap()["active_flows"] == 2
    assert set(rig.relay.flows) == {(rig.listen, c.getsockname()) for c in cs}  # (port, source) keys
    for d, src in rig.target_drain():
        rig.target.sendto(b"R" + d, src)
    rig.run_until(lambda: rig.snap()["datagrams_out"] == 6, "6 back")
    for k, c in enumerate(cs):
        assert rig.drain(c) == [b"R%d-%d" % (k, i) for i in range(3)]


@pytest.mark.parametrize("path", PATHS)
def test_an_icmp_error_met_by_a_lone_datagram_of_a_batch_evicts_only_its_flow(rigs, path):
    """Runs of one datagram (sources interleaved): the one that meets its flow's pending
    ECONNREFUSED is lost with that flow; the next source's datagram and the next one from the
    evicted source (a new flow) both go."""
    if path != "per_datagram" and mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    rig = rigs(path, target_port=free_port())
    rig.target.close()
    a, b = rig.client(), rig.client()
    a.sendto(b"a1", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 1, "a1 sent (its ICMP now pending on the flow)")
    first = next(iter(rig.relay.flows.values()))
    a.sendto(b"a2", ("127.0.0.1", rig.listen))
    b.sendto(b"b1", ("127.0.0.1", rig.listen))
    a.sendto(b"a3", ("127.0.0.1", rig.listen))
    relay = rig.relay
    sock = relay.sockets[rig.listen]
    handler = relay._batch_receiver(sock, rig.listen) if path != "per_datagram" else relay._receiver(sock, rig.listen)
    handler()
    snap = rig.snap()
    assert first.closed and snap["flows_evicted_icmp"] == 1 and snap["send_dropped"] == 0
    assert snap["datagrams_in"] == 3 and snap["active_flows"] == 2
    assert {src for _, src in relay.flows} == {a.getsockname(), b.getsockname()}


def test_a_listen_socket_asks_for_a_bigger_kernel_queue_than_the_default_capped_by_rmem_max(rigs):
    from portunus.relay import udp

    rig = rigs("per_datagram")
    sock = rig.relay.sockets[rig.listen]
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    try:
        with open("/proc/sys/net/core/rmem_max") as f:
            rmem_max = int(f.read())
    except OSError:
        pytest.skip("no /proc/sys/net/core/rmem_max")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
        default = plain.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # Linux doubles the asked size (bookkeeping overhead) after capping it at rmem_max
    assert got == max(default, 2 * min(udp.LISTEN_RCVBUF, rmem_max))
