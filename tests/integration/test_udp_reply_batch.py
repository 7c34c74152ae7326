"""UDP replies of many flows and quota-bound rules on the batched path, on real loopback sockets
with the loop driven from the test (SPEC §2.4, §2.10): the replies of every flow read in one loop
turn leave the listen socket in one sendmmsg (each to its flow's source), a flow with one reply
waiting reads it with one recv_into and a flow with more drains with recvmmsg, a full listen
socket drops and counts (never blocks, never queues), counters and idle timers are exact at the
end of the turn; an owned rule's lone datagrams are debited once per recvmmsg round, and a round
that could end the budget is cut exactly where datagram-by-datagram would cut it."""

from __future__ import annotations

import errno
import socket

import pytest

from portunus.relay import mmsg
from portunus.relay.quota import QuotaHandle
from test_udp_batching import PATHS, Rig, install_cap, needs_batch, quota_set, rigs  # noqa: F401  (rigs: the fixture)


@pytest.fixture
def debits(monkeypatch):
    """Every QuotaHandle.debit amount, in order (the real debit still runs)."""
    seen = []
    real = QuotaHandle.debit

    def debit(self, n):
        seen.append(n)
        return real(self, n)
    monkeypatch.setattr(QuotaHandle, "debit", debit)
    return seen


def up_flows(rig: Rig, n: int, payload=lambda i: b"q%d" % i) -> tuple[list[socket.socket], list[tuple]]:
    """``n`` clients, one datagram each, through to the target: (clients, their flows' upstream
    source addresses at the target, in client order)."""
    clients = [rig.client() for _ in range(n)]
    base = rig.snap()["datagrams_in"]
    for i, c in enumerate(clients):
        c.sendto(payload(i), ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == base + n, f"{n} datagrams upstream")
    by_data = {d: src for d, src in rig.target_drain()}
    return clients, [by_data[payload(i)] for i in range(n)]


def flow_of(rig: Rig, c: socket.socket):
    return rig.relay.flows[(rig.listen, c.getsockname())]


def calls_on(spy, fd: int) -> list[tuple[int, int, int]]:
    return [call for call in spy.calls if call[0] == fd]


class Clock:
    """The Batch's clock (the turn clock of replies: flows' last_seen), moved by the test; each
    step also counts a turn of other flows' replies (``Batch.turn``), so a flow read in one step
    was not read "in the previous turn that had replies" when the next step reads it."""

    def __init__(self, rig: Rig):
        self.rig = rig
        self.t = rig.loop.time()
        rig.batch.now = self

    def __call__(self) -> float:
        return self.t

    def step(self) -> None:
        self.t += 1.0
        self.rig.batch.turn += 1  # another flow's replies went out in between


@needs_batch
@pytest.mark.parametrize("path", ["batched", "gso"])
def test_replies_of_many_flows_in_one_turn_leave_in_one_sendmmsg_each_to_its_source(rigs, path):
    rig = rigs(path)
    n = 40  # more than one Batch's SLOTS (32): the turn's queue is sent when it fills, then at the end
    clients, srcs = up_flows(rig, n)
    lfd = rig.relay.sockets[rig.listen].fileno()
    clock = Clock(rig)
    for rnd in range(2):
        clock.step()
        rig.send_spy.calls.clear()
        rig.recv_spy.calls.clear()
        for f in (flow_of(rig, c) for c in clients):
            f.last_seen = 0.0  # as if idle for long: a reply must refresh it
        out0 = rig.snap()["datagrams_out"]
        for i, src in enumerate(srcs):
            rig.target.sendto(b"R%d-%d" % (rnd, i), src)
        rig.run_until(lambda: rig.snap()["datagrams_out"] == out0 + n, f"round {rnd}: {n} replies")
        for i, c in enumerate(clients):
            assert rig.drain(c) == [b"R%d-%d" % (rnd, i)]
        sends = calls_on(rig.send_spy, lfd)
        assert [r for _, _, r in sends] == [mmsg.SLOTS, n - mmsg.SLOTS]  # all of them in one turn
        flow_reads = [call for call in rig.recv_spy.calls if call[0] != lfd]
        if rnd == 0:
            # a new flow drains with recvmmsg; it found one reply alone: its next read is a recv_into
            # (the flow that got the last free slot of the queue tries once more: EAGAIN)
            got = [r for _, _, r in flow_reads if r != -1]
            assert got == [1] * n and len(flow_reads) <= n + 1
        else:
            assert flow_reads == []
        assert all(flow_of(rig, c).last_seen == clock.t for c in clients)
        assert all(not flow_of(rig, c).burst for c in clients)
    snap = rig.snap()
    assert snap["datagrams_out"] == 2 * n and snap["send_dropped"] == 0
    assert snap["bytes_out"] == sum(len(b"R%d-%d" % (rnd, i)) for rnd in range(2) for i in range(n))
    targets = rig.rt.snapshot("u", per_target=True)["per_target"]
    assert targets[0]["bytes_out"] == snap["bytes_out"]


@needs_batch
def test_a_flow_drains_with_recvmmsg_while_it_has_more_than_one_reply_waiting(rigs):
    rig = rigs("batched")
    (a,), (src,) = up_flows(rig, 1)
    flow = flow_of(rig, a)
    fd = flow.fd
    clock = Clock(rig)

    def replies(*data):
        clock.step()  # within one step no other flow's turn comes between two reads
        out0 = rig.snap()["datagrams_out"]
        rig.recv_spy.calls.clear()
        for d in data:
            rig.target.sendto(d, src)
        rig.run_until(lambda: rig.snap()["datagrams_out"] == out0 + len(data), f"{len(data)} replies")
        assert rig.drain(a) == list(data)
        return [r for _, _, r in calls_on(rig.recv_spy, fd)]

    assert replies(b"a", b"b", b"c", b"d", b"e") == [5] and flow.burst  # several waiting: recvmmsg
    assert replies(b"f") == [1] and not flow.burst                     # one alone: next time recv_into
    assert replies(b"g") == [] and not flow.burst                      # read by recv_into
    # three at once: recv_into takes one (level-triggered: the socket stays readable); woken again
    # on the very next poll, the flow drains the other two with one recvmmsg, in order
    assert replies(b"h", b"i", b"j") == [2] and flow.burst
    snap = rig.snap()
    assert snap["datagrams_out"] == 10 and snap["bytes_out"] == 10 and snap["send_dropped"] == 0


@needs_batch
@pytest.mark.parametrize("script", [[("errno", errno.EAGAIN)], [("partial", 5), ("errno", errno.EAGAIN)],
                                    [("errno", errno.EPERM)]])
def test_a_full_listen_socket_drops_and_counts_the_replies_of_many_flows_and_the_next_turn_sends(rigs, script):
    rig = rigs("batched")
    n = 12
    clients, srcs = up_flows(rig, n)
    for i, src in enumerate(srcs):  # a first round: every flow reads by recv_into from then on
        rig.target.sendto(b"x", src)
    rig.run_until(lambda: rig.snap()["datagrams_out"] == n, "the first replies")
    for c in clients:
        rig.drain(c)
    rig.send_spy.script = list(script)
    for i, src in enumerate(srcs):
        rig.target.sendto(b"y%d" % i, src)
    sent = script[0][1] if script[0][0] == "partial" else (1 if script[-1][1] == errno.EPERM else 0)
    # EAGAIN: the rest of the turn's queue goes (dropped, counted); EPERM: that one, the rest goes on
    dropped = n - sent if script[-1][1] == errno.EAGAIN else 1
    rig.run_until(lambda: rig.snap()["datagrams_out"] + rig.snap()["send_dropped"] == 2 * n, "decided")
    snap = rig.snap()
    assert snap["send_dropped"] == dropped and snap["datagrams_out"] == 2 * n - dropped
    got = [d for c in clients for d in rig.drain(c)]
    assert len(got) == n - dropped and snap["bytes_out"] == n + sum(len(d) for d in got)
    assert rig.batch.q_n == 0 and rig.batch.q_sock is None
    # nothing was held back: the next replies go out at once
    for i, src in enumerate(srcs):
        rig.target.sendto(b"z", src)
    rig.run_until(lambda: rig.snap()["datagrams_out"] == 3 * n - dropped, "the next replies")
    assert all(rig.drain(c) == [b"z"] for c in clients)


@pytest.mark.parametrize("path", PATHS)
def test_a_quota_cuts_a_drained_read_of_replies_at_the_last_whole_one_that_fits(rigs, path):
    if path != "per_datagram" and mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    rig = rigs(path, owner="fred")
    handle = rig.ctx.enforcer.quotas.handle("fred")
    rig.ctx.enforcer.quotas.apply_update(quota_set("fred", 10_000))
    (a,), (src,) = up_flows(rig, 1, payload=lambda i: b"q" * 10)
    assert handle.debited_total == 10
    handle.mark_reported()
    rig.ctx.enforcer.quotas.apply_update(quota_set("fred", 250))
    for i in range(4):
        rig.target.sendto(bytes([65 + i]) * 100, src)
    rig.run_until(lambda: rig.snap()["datagrams_out"] + rig.snap()["quota_dropped"] == 4, "4 decided")
    snap = rig.snap()
    assert rig.drain(a) == [b"A" * 100, b"B" * 100]  # the third did not fit in the 50 left
    assert snap["datagrams_out"] == 2 and snap["quota_dropped"] == 2 and snap["bytes_out"] == 200
    assert handle.exhausted and handle.remaining == 50 and handle.debited_total == 210
    rig.run_until(lambda: rig.snap()["active_flows"] == 0, "the flow cut")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("budget", [10_000, 7 * 100 + 50, 7 * 100])
def test_lone_datagrams_of_an_owned_rule_are_debited_exactly(rigs, debits, path, budget):
    """Twelve flows, one 100-byte datagram each, in one recvmmsg round: with budget to spare they go
    by write(2) and the quota is debited once; a round that could end the budget is cut exactly
    where datagram by datagram cuts it (the 8th does not fit in 50 bytes; 700: the 7th ends it)."""
    if path != "per_datagram" and mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    rig = rigs(path, owner="fred")
    rig.ctx.enforcer.quotas.apply_update(quota_set("fred", 100_000))
    clients, _ = up_flows(rig, 12, payload=lambda i: b"w%02d" % i)
    handle = rig.ctx.enforcer.quotas.handle("fred")
    assert handle.debited_total == 12 * 3
    handle.mark_reported()
    rig.ctx.enforcer.quotas.apply_update(quota_set("fred", budget))
    debits.clear()  # what the warm-up above debited
    if rig.batch is not None:
        rig.write_spy.calls.clear()
    for i, c in enumerate(clients):
        c.sendto(bytes([65 + i]) * 100, ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] + rig.snap()["quota_dropped"] == 24, "12 decided")
    fits = min(12, budget // 100)
    snap = rig.snap()
    assert snap["datagrams_in"] == 12 + fits and snap["quota_dropped"] == 12 - fits
    assert sorted(d for d, _ in rig.target_drain()) == [bytes([65 + i]) * 100 for i in range(fits)]
    assert handle.debited_total == 12 * 3 + 100 * fits and handle.exhausted == (fits < 12)
    if rig.batch is not None and budget == 10_000:
        assert len(rig.write_spy.calls) == 12  # lone datagrams by write(2), not gated
        assert debits == [1200]                # one debit for the round
    else:  # a round that could end the budget (or the per-datagram path): one at a time
        assert debits == [100] * fits


@pytest.mark.parametrize("path", PATHS)
def test_runs_of_an_owned_rule_in_a_round_with_budget_to_spare_are_debited_once(rigs, debits, path):
    if path != "per_datagram" and mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    rig = rigs(path, owner="fred")
    rig.ctx.enforcer.quotas.apply_update(quota_set("fred", 100_000))
    (a, b), _ = up_flows(rig, 2)
    handle = rig.ctx.enforcer.quotas.handle("fred")
    before = handle.debited_total
    debits.clear()
    for s, data in [(a, b"a" * 10), (a, b"a" * 10), (a, b"a" * 5), (b, b"b" * 7), (a, b"a" * 3)]:
        s.sendto(data, ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["datagrams_in"] == 2 + 5, "5 upstream")
    assert handle.debited_total == before + 35 and not handle.exhausted
    assert sorted(d for d, _ in rig.target_drain()) == sorted([b"a" * 10, b"a" * 10, b"a" * 5, b"b" * 7, b"a" * 3])
    assert debits == ([35] if rig.batch is not None else [10, 10, 5, 7, 3])


@needs_batch
def test_a_reply_read_by_recv_into_passes_the_quota_whole_or_not_at_all(rigs):
    rig = rigs("batched", owner="fred")
    rig.ctx.enforcer.quotas.apply_update(quota_set("fred", 10_000))
    (a,), (src,) = up_flows(rig, 1, payload=lambda i: b"q" * 10)
    flow = flow_of(rig, a)
    clock = Clock(rig)
    handle = rig.ctx.enforcer.quotas.handle("fred")
    for i, size in enumerate([100, 100]):  # the first drains (a new flow) and finds one: recv_into next
        clock.step()
        rig.target.sendto(b"r" * size, src)
        rig.run_until(lambda: rig.snap()["datagrams_out"] == i + 1, "a reply")
    assert not flow.burst and handle.debited_total == 210
    handle.mark_reported()
    rig.ctx.enforcer.quotas.apply_update(quota_set("fred", 150))
    rig.recv_spy.calls.clear()
    for i in range(2):  # the second does not fit in the 50 left: dropped whole, the budget ends
        clock.step()
        rig.target.sendto(b"s" * 100, src)
        rig.run_until(lambda: rig.snap()["datagrams_out"] + rig.snap()["quota_dropped"] == 3 + i, "decided")
    snap = rig.snap()
    assert calls_on(rig.recv_spy, flow.fd) == []  # both read by recv_into
    assert snap["datagrams_out"] == 3 and snap["quota_dropped"] == 1
    assert handle.exhausted and handle.remaining == 50 and rig.drain(a)[-1:] == [b"s" * 100]


@needs_batch
def test_an_icmp_error_met_by_the_recv_into_of_a_reply_evicts_only_that_flow(rigs):
    """A flow that reads its replies by recv_into (one alone last time) whose target went away:
    the ICMP port unreachable drawn by its next datagram surfaces on that recv and evicts it; a
    flow of another source, to the same rule, is untouched."""
    rig = rigs("batched")
    (a, b), (src_a, src_b) = up_flows(rig, 2)
    clock = Clock(rig)
    clock.step()
    for src in (src_a, src_b):
        rig.target.sendto(b"r", src)
    rig.run_until(lambda: rig.snap()["datagrams_out"] == 2, "the first replies")
    fa = flow_of(rig, a)
    fd = fa.fd
    assert not fa.burst
    port = rig.target.getsockname()[1]
    rig.target.close()  # the target's port stays unbound: the next datagram draws an ICMP error
    clock.step()
    rig.recv_spy.calls.clear()
    a.sendto(b"gone", ("127.0.0.1", rig.listen))
    rig.run_until(lambda: rig.snap()["flows_evicted_icmp"] == 1, "the eviction")
    assert calls_on(rig.recv_spy, fd) == [] and fa.closed  # met by recv_into, not recvmmsg
    assert (rig.listen, b.getsockname()) in rig.relay.flows and rig.snap()["active_flows"] == 1
    rig.target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # for the rig's close
    rig.target.bind(("127.0.0.1", port))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("where", ["rule", "owner"])
def test_a_bandwidth_cap_installed_after_admission_binds_replies_read_one_at_a_time(rigs, path, where):
    """Four flows whose replies are read by recv_into (one waiting each, not read often): an out
    cap hot-installed on the rule, or on its owner's envelope, binds their next replies; each
    passes or drops whole and is counted."""
    if path != "per_datagram" and mmsg._libc_calls() is None:
        pytest.skip("no recvmmsg here")
    from portunus.ratelimit import RateLimit
    rig = rigs(path, **({"owner": "alice"} if where == "owner" else {}))
    if where == "owner":
        rig.ctx.enforcer.quotas.apply_update(quota_set("alice", 1 << 40))
    clients, srcs = up_flows(rig, 4)
    clock = Clock(rig) if rig.batch is not None else None
    if clock:
        clock.step()
    for src in srcs:
        rig.target.sendto(b"r" * 100, src)
    rig.run_until(lambda: rig.snap()["datagrams_out"] == 4, "4 replies, uncapped")
    for c in clients:
        rig.drain(c)
    install_cap(rig, where, RateLimit.from_dict({"bandwidth_out_bps": 1000}))
    dropped = lambda: rig.rt.snapshot("u")["rate_limit"]["bandwidth_dropped_out"]
    for rnd in range(5):
        if clock:
            clock.step()
        for src in srcs:
            rig.target.sendto(b"c" * 400, src)
        rig.run_until(lambda: rig.snap()["datagrams_out"] + dropped() == 4 + 4 * (rnd + 1), f"round {rnd}")
    if rig.batch is not None:
        assert all(not flow_of(rig, c).burst for c in clients)
    passed = rig.snap()["datagrams_out"] - 4
    assert 1 <= passed <= 3 and dropped() == 20 - passed  # a 1000 B/s bucket: two or three 400 B
    assert rig.snap()["bytes_out"] == 400 + 400 * passed
    assert sum(len(rig.drain(c)) for c in clients) == passed


@needs_batch
def test_lone_datagrams_written_from_kept_slot_cuts_carry_each_round_s_own_bytes(rigs):
    """A run of one is written from its receive slot cut to its length, the cut kept for the next
    datagram of that length in that slot: rounds of other sizes and contents in the same slots
    still send exactly what each datagram held."""
    rig = rigs("batched")
    clients, _ = up_flows(rig, 3)
    rounds = [[b"a" * 10, b"b" * 20, b"c" * 10], [b"D" * 20, b"E" * 10, b"F" * 10], [b"g" * 10, b"h" * 10, b""]]
    for rnd, sizes in enumerate(rounds):
        base = rig.snap()["datagrams_in"]
        rig.write_spy.calls.clear()
        for c, data in zip(clients, sizes):
            c.sendto(data, ("127.0.0.1", rig.listen))
        rig.run_until(lambda: rig.snap()["datagrams_in"] == base + 3, f"round {rnd}")
        assert sorted(d for d, _ in rig.target_drain()) == sorted(sizes)
        assert sorted(d for _, d in rig.write_spy.calls) == sorted(sizes)  # each by write(2)
