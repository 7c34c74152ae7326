"""Traffic quotas and history below HTTP (SPEC §4.4): CRUD and its errors, PATCH order, what
un-exhausts a pair, the period tick, accounting from stats reports across counter resets and a
server restart, the hourly rollup, retention boundaries, history queries, metrics, the replay."""

from __future__ import annotations

import calendar
import io
import json
import sqlite3

import pytest

from portunus.errors import PortunusError
from portunus.log import log
from portunus.server.billing import billing_period
from portunus.server.quotas import QuotaService, client_state
from portunus.server.traffic import (MAX_ROWS, ReportWriter, RuleBytes, TrafficAccounting, TrafficHousekeeper,
                                     TrafficReport, counter_delta, report_from_stats)
from portunus.store import Store, clients, db
from portunus.store import grants as store_grants
from portunus.store import traffic as store_traffic
from portunus.store import users as store_users
from portunus.store.db import ALLOW_ANY_FS_ENV, load_migrations

T0 = calendar.timegm((2026, 1, 31, 10, 0, 0))  # a Jan 31 anchor: the next period starts Feb 28
DAY = 86400
MiB = 1 << 20


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, secs: float) -> None:
        self.t += secs


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_ANY_FS_ENV, "1")
    return str(tmp_path / "data")


@pytest.fixture
def store(data_dir):
    s = Store.open(data_dir)
    yield s
    s.close()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def logs(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(log, "stream", buf)
    return buf


def events(logs, name: str) -> list[dict]:
    return [r for r in map(json.loads, logs.getvalue().splitlines()) if r["event"] == name]


class World:
    """Users alice and bob with grants on client edge-tokyo, one rule each, and the services."""

    def __init__(self, store: Store, clock: Clock):
        self.store, self.clock, self.pushes = store, clock, []
        for user in ("admin", "alice", "bob", "carol"):
            store_users.insert_user(store, user, user.title(), "superadmin" if user == "admin" else "user",
                                    None, "2026-01-01T00:00:00Z")
        self.edge = clients.create_client(store, "edge-tokyo")["client_id"]
        self.other = clients.create_client(store, "edge-osaka")["client_id"]
        for user in ("alice", "bob"):
            store_grants.insert_grant(store, f"G{user}", user, self.edge, 30000, 30100, ["tcp", "udp"], None,
                                      "2026-01-01T00:00:00Z")
        self.add_rule("r-alice", "alice", 30001)
        self.add_rule("r-alice2", "alice", 30002)
        self.add_rule("r-bob", "bob", 30003)
        self.add_rule("r-none", None, 30004)
        self.quotas = QuotaService(store, clock=clock, publish=self.pushes.append)
        self.traffic = TrafficAccounting(store, self.quotas, clock=clock)

    def add_rule(self, rule_id: str, owner, port: int, client_id: str | None = None) -> None:
        with self.store.write() as conn:
            conn.execute("INSERT INTO rules (rule_id, client_id, owner, protocol, listen_host, listen_port, "
                         "listen_port_end, spec_json, state, created_at, updated_at) "
                         "VALUES (?, ?, ?, 'tcp', '0.0.0.0', ?, ?, '{}', 'active', 'x', 'x')",
                         (rule_id, client_id or self.edge, owner, port, port))

    def report(self, **counters) -> None:
        """Apply one stats report of edge-tokyo now: rule id -> (bytes_in, bytes_out)."""
        owners = {"r-alice": "alice", "r-alice2": "alice", "r-bob": "bob", "r-none": None}
        rules = [{"rule_id": rid.replace("_", "-"), "bytes_in": b_in, "bytes_out": b_out}
                 for rid, (b_in, b_out) in counters.items()]
        self.traffic.apply([report_from_stats(self.edge, self.clock(), rules, owners)])

    def used(self, user: str = "alice") -> int:
        return self.quotas.status(user, self.edge)["current_period_bytes_used"]


@pytest.fixture
def w(store, clock):
    return World(store, clock)


def refused(code: str, fn, *args, **kwargs) -> PortunusError:
    with pytest.raises(PortunusError) as ei:
        fn(*args, **kwargs)
    assert ei.value.code == code, ei.value
    return ei.value


# ------------------------------------------------------------------ CRUD and errors

def test_put_creates_the_quota_with_the_view_and_pushes_its_state(w):
    change = w.quotas.put("alice", "edge-tokyo", {"monthly_bytes": 4 * MiB})
    start, end = billing_period(T0, T0)
    assert change.created and (start, end) == (T0, calendar.timegm((2026, 2, 28, 10, 0, 0)))
    assert change.view == {
        "user_id": "alice", "client_id": w.edge, "client_name": "edge-tokyo", "monthly_bytes": 4 * MiB,
        "billing_anchor": T0, "current_period_started_at": start, "current_period_ends_at": end,
        "current_period_bytes_used": 0, "budget_remaining_bytes": 4 * MiB, "exhausted": False,
        "exhausted_at": None, "last_report_at": None}
    [push] = w.pushes
    assert (push.user_id, push.client_id, push.action) == ("alice", w.edge, "set")
    assert push.state == {"monthly_bytes": 4 * MiB, "budget_remaining_bytes": 4 * MiB, "period_started_at": start,
                          "period_ends_at": end, "exhausted": False}
    assert push.message()["type"] == "traffic_quota_update"
    assert w.quotas.status("alice", w.edge) == change.view
    assert w.quotas.list_for_user("alice") == [change.view]
    assert w.quotas.list_for_client("edge-tokyo") == [change.view]
    assert w.quotas.list_for_user("bob") == []


def test_put_again_replaces_the_limit_keeps_usage_and_the_immutable_anchor(w):
    anchor = calendar.timegm((2025, 12, 15, 0, 0, 0))
    w.quotas.put("alice", w.edge, {"monthly_bytes": 1000, "billing_anchor": anchor})
    w.report(r_alice=(300, 100))
    again = w.quotas.put("alice", w.edge, {"monthly_bytes": 2000, "billing_anchor": anchor})
    assert not again.created
    assert (again.view["monthly_bytes"], again.view["current_period_bytes_used"]) == (2000, 400)
    assert again.view["current_period_started_at"] == calendar.timegm((2026, 1, 15, 0, 0, 0))
    e = refused("invalid_billing_anchor", w.quotas.put, "alice", w.edge, {"monthly_bytes": 1, "billing_anchor": T0})
    assert (e.http_status, e.exit_code) == (400, 2) and str(anchor) in e.message and str(T0) in e.message
    assert w.quotas.status("alice", w.edge)["monthly_bytes"] == 2000


@pytest.mark.parametrize("size", [-1, "5", True, 1.5, None, 1 << 63, [1]])
def test_invalid_quota_size(w, size):
    e = refused("invalid_quota_size", w.quotas.put, "alice", w.edge, {"monthly_bytes": size})
    assert (e.http_status, e.exit_code) == (400, 2) and repr(size)[:10] in e.message
    w.quotas.put("alice", w.edge, {"monthly_bytes": 10})
    refused("invalid_quota_size", w.quotas.patch, "alice", w.edge, {"monthly_bytes": size})


def test_monthly_bytes_is_required_and_unknown_fields_are_refused(w):
    refused("invalid_quota_size", w.quotas.put, "alice", w.edge, {})
    e = refused("validation.unknown_field", w.quotas.put, "alice", w.edge, {"monthly_bytes": 1, "monthly": 2})
    assert e.http_status == 400 and "'monthly'" in e.message
    refused("bad_request", w.quotas.put, "alice", w.edge, [1])
    w.quotas.put("alice", w.edge, {"monthly_bytes": 1})
    refused("validation.unknown_field", w.quotas.patch, "alice", w.edge, {"billing_anchor": T0})
    refused("validation.invalid_clear_period_usage", w.quotas.patch, "alice", w.edge, {"clear_period_usage": 1})


@pytest.mark.parametrize("anchor", [-1, "1700000000", True, 1.0, 32503680001])
def test_invalid_billing_anchor(w, anchor):
    e = refused("invalid_billing_anchor", w.quotas.put, "alice", w.edge, {"monthly_bytes": 1, "billing_anchor": anchor})
    assert (e.http_status, e.exit_code) == (400, 2)


def test_the_pair_needs_a_grant(w):
    for user, client in (("nobody", w.edge), ("alice", "edge-nowhere"), ("alice", w.other), ("carol", w.edge)):
        e = refused("quota_target_not_found", w.quotas.put, user, client, {"monthly_bytes": 1})
        assert (e.http_status, e.exit_code) == (422, 3)
    # a grant on every client covers edge-osaka too
    store_grants.insert_grant(w.store, "Gall", "carol", None, 1, 2, ["tcp"], None, "2026-01-01T00:00:00Z")
    assert w.quotas.put("carol", "edge-osaka", {"monthly_bytes": 1}).created


def test_capability_gate_for_a_client_that_said_hello_without_traffic_quota(w):
    clients.record_connection(w.store, w.edge, "1.3.0", ["udp", "rate_limit"])
    e = refused("quota_unsupported_by_client", w.quotas.put, "alice", w.edge, {"monthly_bytes": 1})
    assert (e.http_status, e.exit_code) == (422, 3) and "edge-tokyo" in e.message
    clients.record_connection(w.store, w.edge, "1.4.0", ["udp", "traffic_quota"])
    assert w.quotas.put("alice", w.edge, {"monthly_bytes": 1}).created
    # a client that never connected gets the quota stored for its first hello
    store_grants.insert_grant(w.store, "Go", "alice", w.other, 1, 2, ["tcp"], None, "2026-01-01T00:00:00Z")
    assert w.quotas.put("alice", w.other, {"monthly_bytes": 1}).created


def test_quota_not_found(w):
    for fn, args in ((w.quotas.status, ()), (w.quotas.patch, ({"clear_period_usage": True},)),
                     (w.quotas.delete, ())):
        for user, client in (("alice", w.edge), ("nobody", w.edge), ("alice", "edge-nowhere"), (None, w.edge)):
            e = refused("quota_not_found", fn, user, client, *args)
            assert (e.http_status, e.exit_code) == (404, 8)
    assert w.pushes == []


def test_delete_pushes_remove_and_forgets_the_pair(w):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 1})
    removed = w.quotas.delete("alice", "edge-tokyo")
    assert removed["monthly_bytes"] == 1
    assert [(p.action, p.state) for p in w.pushes] == [("set", w.pushes[0].state), ("remove", None)]
    assert w.pushes[-1].message() == {"type": "traffic_quota_update", "user_id": "alice", "client_id": w.edge,
                                      "action": "remove", "state": None}
    refused("quota_not_found", w.quotas.status, "alice", w.edge)


# ------------------------------------------------------------------ PATCH and un-exhausting

def test_patch_applies_the_limit_then_the_clear_as_one_state_and_one_push(w):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 1000})
    w.report(r_alice=(600, 300))
    w.pushes.clear()
    view = w.quotas.patch("alice", w.edge, {"monthly_bytes": 500, "clear_period_usage": True}).view
    assert (view["monthly_bytes"], view["current_period_bytes_used"], view["exhausted"]) == (500, 0, False)
    assert len(w.pushes) == 1 and w.pushes[0].state["budget_remaining_bytes"] == 500


def test_lowering_the_limit_below_usage_exhausts_once(w, clock, logs):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 1000})
    w.report(r_alice=(600, 300))
    clock.advance(5)
    view = w.quotas.patch("alice", w.edge, {"monthly_bytes": 500}).view
    assert view["exhausted"] and view["exhausted_at"] == T0 + 5 and view["budget_remaining_bytes"] == 0
    assert w.pushes[-1].state["exhausted"] is True
    clock.advance(5)
    again = w.quotas.patch("alice", w.edge, {"monthly_bytes": 400}).view
    assert again["exhausted_at"] == T0 + 5  # still the first trip
    assert len(events(logs, "traffic_quota.exhausted")) == 1


def test_exhaustion_from_reports_then_each_way_back(w, clock, logs):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 4 * MiB})
    clock.advance(30)
    w.report(r_alice=(3 * MiB, MiB))
    status = w.quotas.status("alice", w.edge)
    assert status["exhausted"] and status["exhausted_at"] == T0 + 30 and status["last_report_at"] == T0 + 30
    assert w.pushes[-1].state == {"monthly_bytes": 4 * MiB, "budget_remaining_bytes": 0,
                                  "period_started_at": T0, "period_ends_at": status["current_period_ends_at"],
                                  "exhausted": True}
    [line] = events(logs, "traffic_quota.exhausted")
    assert (line["user_id"], line["client_id"], line["bytes_used"]) == ("alice", w.edge, 4 * MiB)
    # more traffic after the trip is counted, but it is not a second exhaustion
    w.report(r_alice=(3 * MiB + 10, MiB))
    assert len(events(logs, "traffic_quota.exhausted")) == 1 and w.used() == 4 * MiB + 10

    # a raise that stays below the usage does not resume
    assert w.quotas.patch("alice", w.edge, {"monthly_bytes": 4 * MiB + 10}).view["exhausted"]
    # a raise above the usage resumes (the runbook's PUT)
    view = w.quotas.put("alice", w.edge, {"monthly_bytes": 2199023255552}).view
    assert not view["exhausted"] and view["exhausted_at"] is None
    assert w.pushes[-1].state["exhausted"] is False
    assert w.pushes[-1].state["budget_remaining_bytes"] == 2199023255552 - (4 * MiB + 10)
    # exhaust again by lowering, then the runbook's one-shot credit
    w.quotas.patch("alice", w.edge, {"monthly_bytes": MiB})
    view = w.quotas.patch("alice", w.edge, {"clear_period_usage": True}).view
    assert (view["exhausted"], view["current_period_bytes_used"], view["budget_remaining_bytes"]) == (False, 0, MiB)
    assert view["current_period_started_at"] == T0  # the period boundary is unchanged
    assert w.quotas.metric_samples()["portunus_traffic_quota_exhausted_total"] == [
        ({"user": "alice", "client": "edge-tokyo"}, 2)]


def test_a_zero_quota_is_exhausted_at_once_and_a_clear_does_not_resume_it(w):
    view = w.quotas.put("alice", w.edge, {"monthly_bytes": 0}).view
    assert view["exhausted"] and view["exhausted_at"] == T0
    assert w.pushes[-1].state["exhausted"] is True and w.pushes[-1].state["budget_remaining_bytes"] == 0
    assert w.quotas.patch("alice", w.edge, {"clear_period_usage": True}).view["exhausted"]
    assert not w.quotas.patch("alice", w.edge, {"monthly_bytes": 1}).view["exhausted"]


def test_the_client_reporting_exhaustion_marks_it_once(w, clock, logs):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 1000})
    clock.advance(3)
    view = w.quotas.client_exhausted("alice", w.edge)
    assert view["exhausted"] and view["exhausted_at"] == T0 + 3 and view["current_period_bytes_used"] == 0
    clock.advance(3)
    assert w.quotas.client_exhausted("alice", w.edge)["exhausted_at"] == T0 + 3
    assert len(events(logs, "traffic_quota.exhausted")) == 1
    assert w.quotas.client_exhausted("bob", w.edge) is None


# ------------------------------------------------------------------ the period tick

def test_tick_rolls_the_period_resets_usage_resumes_and_pushes(w, clock, logs):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 100})
    w.report(r_alice=(100, 50))
    assert w.quotas.status("alice", w.edge)["exhausted"]
    feb_28 = calendar.timegm((2026, 2, 28, 10, 0, 0))
    clock.t = feb_28 - 1
    assert w.quotas.tick() == []
    clock.t = feb_28
    [push] = w.quotas.tick()
    assert push.state == {"monthly_bytes": 100, "budget_remaining_bytes": 100, "period_started_at": feb_28,
                          "period_ends_at": calendar.timegm((2026, 3, 31, 10, 0, 0)), "exhausted": False}
    assert w.pushes[-1] == push
    [line] = events(logs, "traffic_quota.period_rolled")
    assert (line["user_id"], line["period_started_at"]) == ("alice", feb_28)
    assert w.quotas.tick() == []
    assert w.quotas.metric_samples()["portunus_traffic_quota_period_resets_total"][0][1] == 1


def test_tick_after_a_forward_jump_rolls_once_into_the_right_period_and_a_rewind_keeps_it(w, clock):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 100})
    clock.t = calendar.timegm((2026, 9, 2, 0, 0, 0))
    [push] = w.quotas.tick()
    assert push.state["period_started_at"] == calendar.timegm((2026, 8, 31, 10, 0, 0))
    clock.t = T0  # the clock goes back to January
    assert w.quotas.tick() == []
    w.report(r_alice=(5, 5))
    assert w.quotas.status("alice", w.edge)["current_period_started_at"] == push.state["period_started_at"]
    assert w.used() == 10


def test_a_report_after_the_period_end_counts_into_the_new_period(w, clock, logs):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 1000})
    w.report(r_alice=(400, 0))
    clock.t = calendar.timegm((2026, 2, 28, 10, 0, 30))  # the tick has not run yet
    w.report(r_alice=(450, 0))
    status = w.quotas.status("alice", w.edge)
    assert (status["current_period_started_at"], status["current_period_bytes_used"]) == (clock.t - 30, 50)
    assert len(events(logs, "traffic_quota.period_rolled")) == 1


# ------------------------------------------------------------------ accounting

def test_counter_delta():
    assert counter_delta(None, (5, 7)) == (5, 7)
    assert counter_delta((5, 7), (15, 7)) == (10, 0)
    assert counter_delta((500, 700), (10, 20)) == (10, 20)  # client restarted: from zero
    assert counter_delta((500, 700), (600, 20)) == (600, 20)  # one counter down is a restart too


def test_deltas_become_usage_and_minute_samples_per_user_and_client(w, clock):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 10 * MiB})
    w.quotas.put("bob", w.edge, {"monthly_bytes": 10 * MiB})
    w.report(r_alice=(100, 10), r_alice2=(1, 2), r_bob=(7, 0), r_none=(3, 3))
    clock.advance(60)
    w.report(r_alice=(250, 10), r_alice2=(1, 2), r_bob=(7, 0), r_none=(3, 3))
    assert (w.used("alice"), w.used("bob")) == (100 + 10 + 3 + 150, 7)
    rows = w.store.read().execute("SELECT user_id, ts, bytes_in, bytes_out FROM traffic_samples_1m "
                                  "ORDER BY ts, user_id").fetchall()
    minute = T0 - T0 % 60
    # the idle second minute has rows only for alice: idle buckets are not written
    assert [tuple(r) for r in rows] == [("", minute, 3, 3), ("alice", minute, 101, 12), ("bob", minute, 7, 0),
                                        ("alice", minute + 60, 150, 0)]


def test_no_double_counting_across_a_client_restart_or_a_retried_batch(w, clock):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 10 * MiB})
    w.report(r_alice=(1000, 0))
    w.report(r_alice=(1000, 0))  # the same cumulative counters again (a reconnect's first report)
    assert w.used() == 1000
    w.report(r_alice=(40, 2))  # the client restarted: counters began again at zero
    assert w.used() == 1042
    w.report(r_alice=(100, 2))
    assert w.used() == 1102


def test_nothing_lost_or_repeated_when_the_server_restarts_between_reports(data_dir, clock):
    store = Store.open(data_dir)
    world = World(store, clock)
    world.quotas.put("alice", world.edge, {"monthly_bytes": 10 * MiB})
    world.report(r_alice=(1000, 100))
    store.close()
    with Store.open(data_dir) as reopened:
        quotas = QuotaService(reopened, clock=clock)
        traffic = TrafficAccounting(reopened, quotas, clock=clock)
        report = TrafficReport(world.edge, int(clock()) + 5, (RuleBytes("r-alice", "alice", 1500, 150),))
        traffic.apply([report])
        assert quotas.status("alice", world.edge)["current_period_bytes_used"] == 1650
        total = reopened.read().execute("SELECT SUM(bytes_in), SUM(bytes_out) FROM traffic_samples_1m").fetchone()
        assert tuple(total) == (1500, 150)


def test_a_failed_batch_writes_nothing_and_is_retried_whole(w, monkeypatch):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 10 * MiB})
    writer = ReportWriter(w.traffic)
    for n in (100, 200, 300):
        writer.enqueue(TrafficReport(w.edge, T0, (RuleBytes("r-alice", "alice", n, 0),)))
    real = w.quotas.charge
    calls = []

    def flaky(usage, report_at):
        calls.append(usage)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(usage, report_at)

    monkeypatch.setattr(w.quotas, "charge", flaky)
    with pytest.raises(RuntimeError):
        writer.flush()
    assert writer.pending() == 3 and w.used() == 0
    assert writer.flush() == 3
    assert w.used() == 300 and writer.pending() == 0


def test_a_poison_batch_is_dropped_after_three_attempts_and_the_next_report_recovers_its_bytes(w, logs,
                                                                                                monkeypatch):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 10 * MiB})
    writer = ReportWriter(w.traffic)
    writer.enqueue(TrafficReport(w.edge, T0, (RuleBytes("r-alice", "alice", 100, 0),)))
    real = w.traffic.apply
    monkeypatch.setattr(w.traffic, "apply", lambda batch: (_ for _ in ()).throw(ValueError("poison")))
    for _ in range(3):
        with pytest.raises(ValueError):
            writer.flush()
    assert writer.pending() == 0 and writer.dropped == 1
    assert events(logs, "traffic.reports_dropped")[0]["reason"] == "apply_failed"
    monkeypatch.setattr(w.traffic, "apply", real)
    writer.enqueue(TrafficReport(w.edge, T0 + 5, (RuleBytes("r-alice", "alice", 130, 0),)))
    writer.flush()
    assert w.used() == 130  # cumulative counters: nothing of the dropped report is lost


def test_a_full_queue_drops_the_oldest_report(w):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 10 * MiB})
    writer = ReportWriter(w.traffic, max_queue=2)
    for n in (10, 20, 30):
        writer.enqueue(TrafficReport(w.edge, T0, (RuleBytes("r-alice", "alice", n, 0),)))
    assert writer.pending() == 2 and writer.dropped == 1
    writer.flush()
    assert w.used() == 30


def test_the_writer_thread_applies_queued_reports_before_it_stops(w):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 10 * MiB})
    writer = ReportWriter(w.traffic, interval_secs=3600)
    writer.start()
    writer.enqueue(TrafficReport(w.edge, T0, (RuleBytes("r-alice", "alice", 70, 0),)))
    writer.stop()
    assert w.used() == 70 and writer.pending() == 0


def test_report_from_stats_keeps_only_known_rules():
    report = report_from_stats("C1", 12.7, [{"rule_id": "a", "bytes_in": 1, "bytes_out": 2},
                                            {"rule_id": "ghost", "bytes_in": 9, "bytes_out": 9},
                                            {"rule_id": "b"}], {"a": "alice", "b": None})
    assert report == TrafficReport("C1", 12, (RuleBytes("a", "alice", 1, 2), RuleBytes("b", "", 0, 0)))


def test_owners_are_looked_up_off_the_loop_when_the_hub_does_not_know_them(w):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 10 * MiB})
    rules = [{"rule_id": "r-alice", "bytes_in": 10, "bytes_out": 1}, {"rule_id": "r-bob", "bytes_in": 5},
             {"rule_id": "r-gone", "bytes_in": 2, "bytes_out": 2}]
    report = report_from_stats(w.edge, T0, rules)
    assert [r.owner for r in report.rules] == [None, None, None]
    w.traffic.apply([report])
    assert w.used() == 11
    by_user = dict(w.store.read().execute("SELECT user_id, bytes_in FROM traffic_samples_1m").fetchall())
    assert by_user == {"alice": 10, "bob": 5, "": 2}  # a rule already removed counts as global traffic


# ------------------------------------------------------------------ rollup and retention

HOUR = calendar.timegm((2026, 1, 31, 10, 0, 0))


def test_hourly_rollup_runs_at_h_plus_one_minute(w, clock):
    for minute, n in ((0, 100), (30, 250), (59, 400)):
        clock.t = HOUR + minute * 60 + 10
        w.report(r_alice=(n, n // 10))
    clock.t = HOUR + 3600 + 59
    assert w.traffic.roll_up() == 0
    clock.t = HOUR + 3600 + 60
    assert w.traffic.roll_up() == 1
    rows = w.store.read().execute("SELECT user_id, ts, bytes_in, bytes_out FROM traffic_samples_1h").fetchall()
    assert [tuple(r) for r in rows] == [("alice", HOUR, 400, 40)]
    assert w.traffic.roll_up() == 0  # nothing twice
    # a late report for the rolled hour lands in its 1h row too
    clock.t = HOUR + 3599
    w.report(r_alice=(410, 40))
    assert tuple(w.store.read().execute("SELECT bytes_in FROM traffic_samples_1h").fetchone()) == (410,)


def test_rollup_catches_up_after_downtime_and_survives_a_rewind(w, clock):
    for h in range(3):
        clock.t = HOUR + h * 3600
        w.report(r_bob=(100 * (h + 1), 0))
    clock.t = HOUR + 10 * 3600
    assert w.traffic.roll_up() == 3
    clock.t = HOUR
    assert w.traffic.roll_up() == 0
    assert store_traffic.rolled_until(w.store) == HOUR + 9 * 3600


def test_catch_up_commits_hour_by_hour(w, clock):
    """A backlog is rolled one hour per transaction: rolled_until advances as each hour commits,
    so other writers never wait for the whole backlog (the busy timeout is 5 s)."""
    for h in range(5):
        clock.t = HOUR + h * 3600
        w.report(r_bob=(100 * (h + 1), 0))
    seen = []
    real = store_traffic.roll_up_hours

    def spy(store, since, until):
        seen.append((since, until, store_traffic.rolled_until(store)))
        return real(store, since, until)

    store_traffic.roll_up_hours = spy
    try:
        clock.t = HOUR + 6 * 3600
        assert w.traffic.roll_up() == 5
    finally:
        store_traffic.roll_up_hours = real
    assert [(a, b) for a, b, _ in seen] == [(HOUR + h * 3600, HOUR + (h + 1) * 3600) for h in range(5)]
    # when hour h is rolled, hours before it are already committed as rolled
    assert [mark for _, _, mark in seen[1:]] == [HOUR + h * 3600 for h in range(1, 5)]


def test_retention_boundaries(w, clock):
    now = int(clock())
    day_ago_minute = now - now % 60
    store_traffic.add_samples(w.store, "1m", [("alice", w.edge, day_ago_minute - 7 * DAY, 1, 1),
                                              ("alice", w.edge, day_ago_minute - 7 * DAY - 60, 2, 2)])
    hour = now - now % 3600
    store_traffic.add_samples(w.store, "1h", [("alice", w.edge, hour - 90 * DAY, 1, 1),
                                              ("alice", w.edge, hour - 90 * DAY - 3600, 2, 2)])
    clock.t = day_ago_minute  # exactly 7 days after the first 1m row
    removed = w.traffic.prune()
    assert (removed["1m"], removed["1h"]) == (1, 1)
    left = w.store.read().execute("SELECT COUNT(*) FROM traffic_samples_1m").fetchone()[0]
    assert left == 1


def test_counters_of_removed_rules_are_forgotten_after_a_week(w, clock):
    w.report(r_alice=(1, 1), r_bob=(1, 1))
    with w.store.write() as conn:
        conn.execute("DELETE FROM rules WHERE rule_id = 'r-bob'")
    clock.advance(7 * DAY)
    assert w.traffic.prune()["counters"] == 0
    clock.advance(1)
    assert w.traffic.prune()["counters"] == 1
    assert set(store_traffic.load_counters(w.store, w.edge)) == {"r-alice"}


# ------------------------------------------------------------------ history

def test_history_shape_filters_and_default_bucket(w, clock):
    clock.t = HOUR
    w.report(r_alice=(100, 10), r_bob=(5, 1))
    clock.t = HOUR + 120
    w.report(r_alice=(300, 20), r_bob=(5, 1))
    clock.t = HOUR + 2 * 3600
    result = w.traffic.history(from_=HOUR - 600, to=HOUR + 3600, user_id="alice")
    assert result == {"bucket": "1m", "samples": [{"ts": HOUR, "bytes_in": 100, "bytes_out": 10},
                                                  {"ts": HOUR + 120, "bytes_in": 200, "bytes_out": 10}],
                      "total_bytes_in": 300, "total_bytes_out": 20}
    everyone = w.traffic.history(from_=str(HOUR), to=str(HOUR + 60))
    assert everyone["samples"] == [{"ts": HOUR, "bytes_in": 105, "bytes_out": 11}]
    assert w.traffic.history(from_=HOUR, to=HOUR + 600, client_ref="edge-osaka")["samples"] == []
    assert w.traffic.history(from_=HOUR, to=HOUR + 600, client_ref="edge-tokyo")["total_bytes_in"] == 305
    w.traffic.roll_up()
    long = w.traffic.history(from_=HOUR - DAY, to=HOUR + 3600)
    assert long["bucket"] == "1h" and long["samples"] == [{"ts": HOUR, "bytes_in": 305, "bytes_out": 21}]
    # an unaligned from still includes the bucket it falls in
    assert w.traffic.history(from_=HOUR + 30, to=HOUR + 3600, bucket="1h")["total_bytes_in"] == 305
    # the defaults: the last 24 hours at 1m
    assert w.traffic.history()["bucket"] == "1m" and w.traffic.history()["total_bytes_in"] == 305


@pytest.mark.parametrize("kwargs", [{"from_": 10, "to": 10}, {"from_": 20, "to": 10}, {"from_": "abc"},
                                    {"from_": -5, "to": 10}, {"to": "1e9"}, {"from_": True, "to": 5},
                                    {"from_": 1.5, "to": 5}, {"to": 1 << 41}])
def test_invalid_time_range(w, kwargs):
    e = refused("invalid_time_range", w.traffic.history, **kwargs)
    assert (e.http_status, e.exit_code) == (400, 2)


@pytest.mark.parametrize("bucket", ["5m", "1d", "1M", 60])
def test_invalid_bucket(w, clock, bucket):
    e = refused("invalid_bucket", w.traffic.history, from_=int(clock()) - 60, to=int(clock()), bucket=bucket)
    assert (e.http_status, e.exit_code) == (400, 2)


def test_windows_older_than_retention(w, clock):
    now = int(clock())
    assert w.traffic.history(from_=now - 7 * DAY, to=now - 7 * DAY + 60)["samples"] == []
    e = refused("quota_bucket_out_of_retention", w.traffic.history, from_=now - 7 * DAY - 1, to=now - 6 * DAY,
                bucket="1m")
    assert (e.http_status, e.exit_code) == (422, 3) and "bucket=1h" in e.message
    assert w.traffic.history(from_=now - 7 * DAY - 1, to=now - 6 * DAY, bucket="1h")["bucket"] == "1h"
    assert w.traffic.history(from_=now - 90 * DAY, to=now)["bucket"] == "1h"
    refused("quota_bucket_out_of_retention", w.traffic.history, from_=now - 90 * DAY - 1, to=now)


def test_more_than_ten_thousand_rows(w, clock):
    now = int(clock())
    start = now - 7 * DAY  # now is on a minute: the oldest window 1m rows may be asked for
    rows = [("alice", w.edge, start + 60 * i, 1, 0) for i in range(MAX_ROWS)]
    store_traffic.add_samples(w.store, "1m", rows)
    ok = w.traffic.history(from_=start, to=now, bucket="1m")
    assert len(ok["samples"]) == MAX_ROWS and ok["total_bytes_in"] == MAX_ROWS
    store_traffic.add_samples(w.store, "1m", [("bob", w.edge, start + 60 * MAX_ROWS, 1, 0)])
    e = refused("traffic_too_many_rows", w.traffic.history, from_=start, to=now, bucket="1m")
    assert (e.http_status, e.exit_code) == (422, 3)
    # the same window for one user fits
    assert len(w.traffic.history(from_=start, to=now, bucket="1m", user_id="alice")["samples"]) == MAX_ROWS


# ------------------------------------------------------------------ metrics, replay, pure state

def test_metric_samples(w):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 1000})
    w.quotas.put("bob", w.edge, {"monthly_bytes": 0})
    w.report(r_alice=(100, 20))
    m = w.quotas.metric_samples()
    alice, bob = {"user": "alice", "client": "edge-tokyo"}, {"user": "bob", "client": "edge-tokyo"}
    assert m["portunus_traffic_quota_bytes_used"] == [(alice, 120), (bob, 0)]
    assert m["portunus_traffic_quota_bytes_limit"] == [(alice, 1000), (bob, 0)]
    assert m["portunus_traffic_quota_exhausted"] == [(alice, 0), (bob, 1)]
    assert m["portunus_traffic_quota_exhausted_total"] == [(alice, 0), (bob, 1)]
    assert m["portunus_traffic_quota_period_resets_total"] == [(alice, 0), (bob, 0)]
    w.quotas.delete("bob", w.edge)
    assert [labels for labels, _ in w.quotas.metric_samples()["portunus_traffic_quota_exhausted"]] == [alice]
    # a second client under the same name is labelled the way every other family labels it
    twin = clients.create_client(w.store, "edge-tokyo")["client_id"]
    store_grants.insert_grant(w.store, "Gt", "alice", twin, 1, 2, ["tcp"], None, "2026-01-01T00:00:00Z")
    w.quotas.put("alice", twin, {"monthly_bytes": 5})
    assert [labels["client"] for labels, _ in w.quotas.metric_samples()["portunus_traffic_quota_bytes_limit"]] \
        == ["edge-tokyo", f"edge-tokyo ({twin})"]


def test_replay_sets_every_quota_and_removes_quotas_deleted_while_offline(w):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 1000})
    w.quotas.put("bob", w.edge, {"monthly_bytes": 5})
    w.quotas.delete("bob", w.edge)
    replay = w.quotas.replay_messages(w.edge)
    assert [(m["user_id"], m["action"]) for m in replay] == [("alice", "set"), ("bob", "remove")]
    assert replay[0]["state"]["budget_remaining_bytes"] == 1000
    assert w.quotas.replay_messages(w.other) == []


def test_client_state_is_a_pure_function_of_the_view():
    view = {"monthly_bytes": 10, "budget_remaining_bytes": 0, "current_period_started_at": 1,
            "current_period_ends_at": 2, "exhausted": True, "user_id": "u"}
    assert client_state(view) == {"monthly_bytes": 10, "budget_remaining_bytes": 0, "period_started_at": 1,
                                  "period_ends_at": 2, "exhausted": True}


def test_a_failing_publish_does_not_undo_the_change(w, logs):
    def broken(push):
        raise ConnectionError("loop gone")

    w.quotas.publish = broken
    assert w.quotas.put("alice", w.edge, {"monthly_bytes": 1}).created
    assert w.quotas.status("alice", w.edge)["monthly_bytes"] == 1
    assert events(logs, "traffic_quota.push_failed")


# ------------------------------------------------------------------ the housekeeping thread

def test_housekeeping_rolls_periods_and_hours_and_survives_a_failing_job(w, clock, logs):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 100})
    w.report(r_alice=(100, 0))
    clock.t = calendar.timegm((2026, 2, 28, 10, 0, 0))

    def broken():
        raise RuntimeError("store busy")

    w.quotas.tick = broken
    keeper = TrafficHousekeeper(w.quotas, w.traffic)
    keeper.run_once()
    assert events(logs, "traffic.housekeeping_failed")[0]["job"] == "broken"
    assert w.store.read().execute("SELECT COUNT(*) FROM traffic_samples_1h").fetchone()[0] == 1  # maintain ran
    del w.quotas.tick
    keeper.run_once()
    assert w.quotas.status("alice", w.edge)["current_period_bytes_used"] == 0


def test_housekeeping_thread_runs_a_pass_before_it_stops(w, clock):
    w.quotas.put("alice", w.edge, {"monthly_bytes": 100})
    clock.t = calendar.timegm((2026, 2, 28, 10, 0, 0))
    keeper = TrafficHousekeeper(w.quotas, w.traffic, interval_secs=3600)
    keeper.start()
    keeper.stop()
    assert w.quotas.status("alice", w.edge)["current_period_started_at"] == clock.t


# ------------------------------------------------------------------ migration 003

def test_a_002_store_upgrades_in_place_and_its_rules_start_accounting(data_dir, clock, monkeypatch):
    before = [m for m in load_migrations() if m.version <= 2]
    monkeypatch.setattr(db, "load_migrations", lambda: before)
    old = Store.open(data_dir)
    world = World(old, clock)  # users, clients, grants and rules written by the release before quotas
    assert "traffic_quotas" not in {r[0] for r in old.read().execute("SELECT name FROM sqlite_master")}
    old.close()
    monkeypatch.setattr(db, "load_migrations", load_migrations)
    with Store.open(data_dir) as new:
        assert new.schema_version() == max(m.version for m in load_migrations())
        quotas = QuotaService(new, clock=clock)
        quotas.put("alice", "edge-tokyo", {"monthly_bytes": 100})
        TrafficAccounting(new, quotas, clock=clock).apply(
            [TrafficReport(world.edge, int(clock()), (RuleBytes("r-alice", "alice", 60, 60),))])
        assert quotas.status("alice", world.edge)["exhausted"]
        # the tables keep their own invariants whatever code writes them
        for sql in ("UPDATE traffic_quotas SET monthly_bytes = -1",
                    "INSERT INTO traffic_samples_1m VALUES ('alice', 'c', 61, 1, 1)",
                    "INSERT INTO traffic_samples_1h VALUES ('alice', 'c', 60, 1, 1)",
                    "INSERT INTO traffic_quotas (user_id, client_id, monthly_bytes, billing_anchor, "
                    "period_started_at, period_ends_at, created_at, updated_at) VALUES ('nobody', 'c', 1, 0, 0, 1, "
                    "'x', 'x')"):
            with pytest.raises(sqlite3.IntegrityError):
                with new.write() as conn:
                    conn.execute(sql)
        # a removed user's quotas go with it
        store_users.delete_user(new, "alice")
        assert quotas.list_for_client(world.edge) == []


def test_a_clear_first_applies_the_reports_already_queued(w, clock):
    """The client reports its counters, then the trip; an operator's clear that lands before the writer
    thread ran must not be undone by that report a moment later (serve wires before_change to flush)."""
    writer = ReportWriter(w.traffic)  # not started: only the flush below applies its queue
    w.quotas.before_change = writer.flush
    w.quotas.put("alice", w.edge, {"monthly_bytes": 1000})
    writer.enqueue(report_from_stats(w.edge, clock(), [{"rule_id": "r-alice", "bytes_in": 900, "bytes_out": 300}],
                                     {"r-alice": "alice"}))
    assert w.used() == 0  # still queued
    view = w.quotas.patch("alice", w.edge, {"clear_period_usage": True}).view
    assert writer.pending() == 0
    assert view["current_period_bytes_used"] == 0 and view["exhausted"] is False
    # the next report carries only what came after: no double count, no resurrected usage
    clock.advance(60)
    w.report(r_alice=(950, 300))
    assert w.used() == 50
