"""Traffic accounting and history (SPEC §4.4): stats reports -> quota usage and samples, the hourly
rollup, retention, and the history query.

A client reports cumulative delivered-byte counters per rule. The delta against the last counters
seen for that (client, rule) is the traffic since; those last counters are stored in the same
transaction as the usage and samples they produced, so a server restart between two reports
neither loses nor repeats a delta. A counter that went down means the client restarted (or the
rule was re-created): the delta is then counted from zero.

Writes never run on the loop thread: the hub hands reports to ``ReportWriter.enqueue`` (cheap,
thread-safe) and its thread applies them in batches, one transaction per batch.

    accounting = TrafficAccounting(store, quotas, clock=time.time)
    writer = ReportWriter(accounting); writer.start()
    writer.enqueue(report_from_stats(client_id, received_at, validated_rules))  # owners: looked up off-loop
    accounting.maintain()              # every 60 s: rollup at H+1 min, retention
    accounting.history(from_=..., to=..., bucket=None, user_id="alice")
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from ..errors import PortunusError
from ..log import log
from ..store import clients as store_clients
from ..store import quotas as store_quotas
from ..store import traffic as store_traffic
from ..store.db import Store
from .quotas import QuotaService

BUCKET_SECS = {"1m": 60, "1h": 3600}
RETENTION_SECS = {"1m": 7 * 86400, "1h": 90 * 86400}
DEFAULT_1M_SPAN_SECS = 86400     # a window up to 24 h defaults to 1-minute buckets, longer to 1-hour
MAX_ROWS = 10_000
ROLLUP_DELAY_SECS = 60           # hour H is rolled up at H + 1 h + 1 min, when its last reports are in
COUNTER_RETENTION_SECS = 7 * 86400
MAX_TIME = 1 << 40               # unix seconds far beyond any real query; keeps SQL integers small
WRITER_BATCH = 512               # reports per transaction
WRITER_INTERVAL_SECS = 1.0
WRITER_MAX_QUEUE = 100_000       # ~20 000 clients' worth of 5 s reports
WRITER_MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class RuleBytes:
    rule_id: str
    owner: str | None   # user id; '' for a rule without owner; None: look it up when applying
    bytes_in: int       # cumulative since the rule started on the client
    bytes_out: int


@dataclass(frozen=True)
class TrafficReport:
    client_id: str
    received_at: int    # server clock: client clocks may be off
    rules: tuple[RuleBytes, ...]


def report_from_stats(client_id: str, received_at: float, rules: list[dict],
                      owners: dict[str, str | None] | None = None) -> TrafficReport:
    """From a validated ``stats_report``'s rule snapshots. With ``owners`` (rule id -> owner),
    snapshots of rules not in it are left out; without, owners are read from the store when the
    report is applied (on the writer thread, not the loop)."""
    rows = tuple(RuleBytes(r["rule_id"], None if owners is None else owners[r["rule_id"]] or "",
                           int(r.get("bytes_in") or 0), int(r.get("bytes_out") or 0))
                 for r in rules if owners is None or r.get("rule_id") in owners)
    return TrafficReport(client_id, int(received_at), rows)


def counter_delta(previous: tuple[int, int] | None, current: tuple[int, int]) -> tuple[int, int]:
    """Bytes since the last counters seen; a counter that went down restarted from zero."""
    if previous is None or current[0] < previous[0] or current[1] < previous[1]:
        return current
    return current[0] - previous[0], current[1] - previous[1]


def _parse_time(value, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 13:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIME:
        raise PortunusError("invalid_time_range", f"{name} must be unix seconds, got {str(value)[:40]!r}")
    return value


class TrafficAccounting:
    def __init__(self, store: Store, quotas: QuotaService, *, clock: Callable[[], float] = time.time):
        self.store = store
        self.quotas = quotas
        self.clock = clock

    def _now(self) -> int:
        return int(self.clock())

    # ---------------------------------------------------------------- reports

    def apply(self, reports: list[TrafficReport]) -> None:
        """Turn a batch of reports into usage and samples in one transaction, in order."""
        if not reports:
            return
        events = []
        with self.store.write():
            rolled_until = store_traffic.rolled_until(self.store)
            counters: dict[str, dict] = {}
            for report in reports:
                if report.client_id not in counters:
                    counters[report.client_id] = store_traffic.load_counters(self.store, report.client_id)
                events += self._apply_one(report, counters[report.client_id], rolled_until)
        self.quotas.finish_charge(events)

    def _apply_one(self, report: TrafficReport, last: dict, rolled_until: int | None) -> list:
        per_pair: dict[tuple[str, str], list[int]] = {}
        seen = {}
        owners = None
        if any(rule.owner is None for rule in report.rules):
            owners = store_quotas.rule_owners(self.store, report.client_id)
        for rule in report.rules:
            owner = rule.owner if rule.owner is not None else owners.get(rule.rule_id, "")
            current = (rule.bytes_in, rule.bytes_out)
            d_in, d_out = counter_delta(last.get(rule.rule_id), current)
            last[rule.rule_id] = seen[rule.rule_id] = current
            pair = per_pair.setdefault((owner, report.client_id), [0, 0])
            pair[0] += d_in
            pair[1] += d_out
        store_traffic.save_counters(self.store, report.client_id, seen, report.received_at)
        minute = report.received_at - report.received_at % 60
        samples = [(user, client, minute, b_in, b_out) for (user, client), (b_in, b_out) in per_pair.items()
                   if b_in or b_out]
        if samples:
            store_traffic.add_samples(self.store, "1m", samples)
            hour = minute - minute % 3600
            if rolled_until is not None and hour < rolled_until:
                # a late report for an hour already rolled up: keep its 1h row whole
                store_traffic.add_samples(self.store, "1h", [(u, c, hour, i, o) for u, c, _, i, o in samples])
        usage = {pair: b_in + b_out for pair, (b_in, b_out) in per_pair.items() if pair[0]}
        return self.quotas.charge(usage, report.received_at)

    # ---------------------------------------------------------------- rollup, retention

    def roll_up(self) -> int:
        """Write the 1h rows of every complete hour not rolled yet (at H+1 min); returns rows written.

        One transaction per hour: a server that missed a day catches up without holding the
        write lock for the whole backlog (other writers only wait up to the busy timeout).
        """
        until = self._now() - ROLLUP_DELAY_SECS
        until -= until % 3600
        with self.store.write():
            since = store_traffic.rolled_until(self.store)
            if since is None:
                earliest = store_traffic.earliest_sample(self.store, "1m")
                since = until if earliest is None else min(until, earliest - earliest % 3600)
            if since >= until:
                # a clock that went back never un-rolls an hour
                store_traffic.set_rolled_until(self.store, max(since, until))
                return 0
        written = 0
        for hour in range(since, until, 3600):
            with self.store.write():
                written += store_traffic.roll_up_hours(self.store, hour, hour + 3600)
                store_traffic.set_rolled_until(self.store, hour + 3600)
        return written

    def prune(self) -> dict[str, int]:
        """Drop samples past retention (1m: 7 days, 1h: 90 days) and counters of long-gone rules."""
        now = self._now()
        removed = {bucket: store_traffic.prune_samples(self.store, bucket, now - RETENTION_SECS[bucket])
                   for bucket in BUCKET_SECS}
        removed["counters"] = store_traffic.prune_counters(self.store, now - COUNTER_RETENTION_SECS)
        return removed

    def maintain(self) -> None:
        """The 60 s housekeeping: rollup first (so nothing is pruned before it is rolled), then retention."""
        rows = self.roll_up()
        removed = self.prune()
        if rows or any(removed.values()):
            log.debug("traffic.maintained", hourly_rows=rows, **{f"pruned_{k}": v for k, v in removed.items()})

    # ---------------------------------------------------------------- history

    def history(self, *, from_=None, to=None, bucket=None, user_id: str | None = None,
                client_ref: str | None = None) -> dict:
        """``{bucket, samples: [{ts, bytes_in, bytes_out}], total_bytes_in, total_bytes_out}``."""
        now = self._now()
        end = _parse_time(to, "to", now)
        start = _parse_time(from_, "from", max(0, end - DEFAULT_1M_SPAN_SECS))
        if start >= end:
            raise PortunusError("invalid_time_range", f"from ({start}) must be before to ({end})")
        if bucket is None or bucket == "":
            bucket = "1m" if end - start <= DEFAULT_1M_SPAN_SECS else "1h"
        elif bucket not in BUCKET_SECS:
            raise PortunusError("invalid_bucket", f"bucket must be 1m or 1h, got {str(bucket)[:20]!r}")
        oldest = now - RETENTION_SECS[bucket]
        if start < oldest:
            days = RETENTION_SECS[bucket] // 86400
            raise PortunusError("quota_bucket_out_of_retention",
                                f"bucket={bucket} rows are kept for {days} days: from ({start}) is before {oldest}; "
                                f"narrow the window" + (" or use bucket=1h" if bucket == "1m" else ""),
                                bucket=bucket, oldest=oldest)
        client_id = None
        if client_ref is not None:
            client_id = store_clients.resolve_client_ref(self.store, client_ref)["client_id"]
        step = BUCKET_SECS[bucket]
        rows = store_traffic.query_samples(self.store, bucket, start - start % step, end, user_id=user_id,
                                           client_id=client_id, limit=MAX_ROWS + 1)
        if len(rows) > MAX_ROWS:
            raise PortunusError("traffic_too_many_rows",
                                f"the window {start}..{end} at bucket={bucket} has more than {MAX_ROWS} rows; "
                                f"narrow it" + (" or use bucket=1h" if bucket == "1m" else ""),
                                bucket=bucket, max_rows=MAX_ROWS)
        return {
            "bucket": bucket,
            "samples": [{"ts": ts, "bytes_in": b_in, "bytes_out": b_out} for ts, b_in, b_out in rows],
            "total_bytes_in": sum(r[1] for r in rows),
            "total_bytes_out": sum(r[2] for r in rows),
        }


class ReportWriter:
    """A thread that applies queued reports in batches, so no sqlite write runs on the loop.

    A batch that fails (the store busy for longer than its timeout) goes back to the front of the
    queue and is retried. After ``MAX_ATTEMPTS`` it is dropped, as are the oldest reports when the
    queue is full: counters are cumulative, so the client's next report still carries those bytes
    (only their minute moves later) — a poison batch must not stall accounting for good.
    """

    def __init__(self, accounting: TrafficAccounting, *, interval_secs: float = WRITER_INTERVAL_SECS,
                 batch: int = WRITER_BATCH, max_queue: int = WRITER_MAX_QUEUE):
        self.accounting = accounting
        self.interval_secs = interval_secs
        self.batch = batch
        self._queue: deque[TrafficReport] = deque(maxlen=max_queue)
        self._failures = 0
        self.dropped = 0
        self._cond = threading.Condition()
        # one flush at a time: a caller that flushes (a quota change) waits for a batch the thread
        # has already taken off the queue, so "everything received so far" really is applied
        self._flush_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def enqueue(self, report: TrafficReport) -> None:
        with self._cond:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1  # the deque drops the oldest
                log.limited("warn", "traffic.reports_dropped", key="full", every=60.0, reason="queue_full",
                            dropped_total=self.dropped)
            self._queue.append(report)
            if len(self._queue) >= self.batch:
                self._cond.notify()

    def enqueue_stats(self, client_id: str, received_at: float, rules: list[dict]) -> None:
        """From the hub, on the loop: a validated report's rule snapshots (owners looked up later)."""
        self.enqueue(report_from_stats(client_id, received_at, rules))

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def flush(self) -> int:
        """Apply everything queued now, batch by batch, on the calling thread; returns reports applied."""
        with self._flush_lock:
            return self._flush()

    def _flush(self) -> int:
        applied = 0
        while True:
            with self._cond:
                batch = [self._queue.popleft() for _ in range(min(self.batch, len(self._queue)))]
            if not batch:
                return applied
            try:
                self.accounting.apply(batch)
            except Exception:
                self._failures += 1
                with self._cond:
                    if self._failures < WRITER_MAX_ATTEMPTS:
                        self._queue.extendleft(reversed(batch))
                    else:
                        self._failures = 0
                        self.dropped += len(batch)
                        log.error("traffic.reports_dropped", reason="apply_failed", reports=len(batch),
                                  dropped_total=self.dropped)
                raise
            self._failures = 0
            applied += len(batch)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="traffic-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after a last flush (a shutdown loses no queued report)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._stopping:
                    self._cond.wait(self.interval_secs)
                stopping = self._stopping
            try:
                self.flush()
            except Exception as e:
                log.limited("error", "traffic.accounting_failed", key="writer", every=60.0, error=str(e),
                            queued=self.pending())
                if stopping:
                    return
            if stopping:
                return


class TrafficHousekeeper:
    """A thread running the 60 s quota tick (period rolls and their pushes) and the traffic
    housekeeping (rollup, retention). ``run_once`` is the whole job, for tests and the first pass."""

    def __init__(self, quotas: QuotaService, accounting: TrafficAccounting, *, interval_secs: float = 60.0):
        self.quotas = quotas
        self.accounting = accounting
        self.interval_secs = interval_secs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> None:
        for job in (self.quotas.tick, self.accounting.maintain):
            try:
                job()
            except Exception as e:  # the next pass retries; one failure must not stop the others
                log.limited("error", "traffic.housekeeping_failed", key=job.__name__, every=300.0,
                            job=job.__name__, error=str(e))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="traffic-housekeeper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while True:
            self.run_once()
            if self._stop.wait(self.interval_secs):
                return


class TrafficServices:
    """What ``serve`` runs for quotas and traffic history, wired to the control hub and the core.

    Quota pushes go to ``hub.post_update`` (any thread -> the loop); the hub replays quotas on
    reconnect and queues validated stats reports here; HTTP handlers reach ``core.quotas`` and
    ``core.traffic``; ``/metrics`` renders ``core.quotas.metric_families()``.
    """

    def __init__(self, store: Store, hub, core=None, *, clock: Callable[[], float] = time.time,
                 housekeeping_secs: float = 60.0):
        self.quotas = QuotaService(store, clock=clock,
                                   publish=lambda push: hub.post_update(push.client_id, push.message()))
        self.accounting = TrafficAccounting(store, self.quotas, clock=clock)
        self.writer = ReportWriter(self.accounting)
        # a quota change first applies the usage already reported: a clear or raise that overtook the
        # report carrying the bytes before the cut would otherwise be undone by it a moment later
        self.quotas.before_change = self.writer.flush
        self.housekeeper = TrafficHousekeeper(self.quotas, self.accounting, interval_secs=housekeeping_secs)
        hub.quotas, hub.report_writer = self.quotas, self.writer
        if core is not None:
            core.quotas, core.traffic = self.quotas, self.accounting

    def start(self) -> "TrafficServices":
        self.writer.start()
        self.housekeeper.start()
        return self

    def stop(self) -> None:
        """After the loop stopped: the last reports are applied before the store closes."""
        self.housekeeper.stop()
        self.writer.stop()


def start_traffic_services(store: Store, hub, core) -> TrafficServices:
    """The one call ``serve`` makes; ``stop()`` the result before closing the store."""
    return TrafficServices(store, hub, core).start()
