"""Traffic quotas per (user, client), below HTTP and the control hub (SPEC §2.10, §3.4, §4.4).

The service owns the quota rules: CRUD with the §4.4 view and errors, PATCH semantics, what
un-exhausts a pair, the state a client gets, the period tick, exhaustion marking, the reconnect
replay and the quota metrics. It never touches a socket: every change the client must hear about
goes to the injected ``publish(QuotaPush)`` after its transaction committed; the wiring sends it
on the loop (and a client that is offline gets the current state from ``replay_messages``).

    quotas = QuotaService(store, clock=time.time, publish=hub_post)
    quotas.put("alice", "edge-tokyo", {"monthly_bytes": 4 << 20})
    quotas.patch("alice", "edge-tokyo", {"clear_period_usage": True})
    quotas.tick()                      # every 60 s, off the loop thread

Every time comes from ``clock`` (unix seconds), so tests move time instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from ..control import messages
from ..errors import PortunusError
from ..log import log
from ..store import clients as store_clients
from ..store import grants as store_grants
from ..store import quotas as store_quotas
from ..store import users as store_users
from ..store.db import Store, rfc3339
from .billing import MAX_ANCHOR, billing_period
from .metrics import Family, client_labels

COUNTER_LIMIT = 1 << 63
QUOTA_CAPABILITY = "traffic_quota"
PUT_FIELDS = ("monthly_bytes", "billing_anchor")
PATCH_FIELDS = ("monthly_bytes", "clear_period_usage")
METRIC_HELP = {
    "portunus_traffic_quota_bytes_used": ("gauge", "Bytes the pair delivered in its current billing period."),
    "portunus_traffic_quota_bytes_limit": ("gauge", "The pair's monthly_bytes."),
    "portunus_traffic_quota_exhausted": ("gauge", "1 while the pair's quota is exhausted (forwarding cut), else 0."),
    "portunus_traffic_quota_period_resets_total": ("counter", "Billing periods rolled since the server started."),
    "portunus_traffic_quota_exhausted_total": ("counter", "Times the pair's quota ran out since the server started."),
}


@dataclass(frozen=True)
class QuotaPush:
    """One ``traffic_quota_update`` for a client: ``set`` with the state, or ``remove``."""

    user_id: str
    client_id: str
    action: str
    state: dict | None = None

    def message(self) -> dict:
        return messages.traffic_quota_update(self.user_id, self.client_id, self.action, self.state)


@dataclass(frozen=True)
class QuotaChange:
    view: dict
    created: bool = False


def _shown(value, limit: int = 64) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_monthly_bytes(value) -> int:
    if not _is_int(value) or not 0 <= value < COUNTER_LIMIT:
        raise PortunusError("invalid_quota_size",
                            f"monthly_bytes must be a whole number of bytes from 0 to 2^63-1, got {_shown(value)}")
    return value


def parse_billing_anchor(value) -> int:
    if not _is_int(value) or not 0 <= value <= MAX_ANCHOR:
        raise PortunusError("invalid_billing_anchor",
                            f"billing_anchor must be unix seconds from 0 to {MAX_ANCHOR}, got {_shown(value)}")
    return value


def _check_body(body, allowed: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise PortunusError("bad_request", f"the body must be a JSON object, got {_shown(body)}")
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise PortunusError("validation.unknown_field",
                            f"unknown field {_shown(unknown[0])}; allowed: {', '.join(allowed)}", field=unknown[0])
    return body


def client_state(row) -> dict:
    """The state pushed to the client (SPEC §3.4) for a quota row or view."""
    view = row if isinstance(row, dict) else store_quotas.quota_view(row)
    return {
        "monthly_bytes": view["monthly_bytes"],
        "budget_remaining_bytes": view["budget_remaining_bytes"],
        "period_started_at": view["current_period_started_at"],
        "period_ends_at": view["current_period_ends_at"],
        "exhausted": view["exhausted"],
    }


def _stamp(now: int) -> str:
    """created_at / updated_at text from the injected clock."""
    return rfc3339(datetime.fromtimestamp(now, timezone.utc))


def settle_exhaustion(limit: int, used: int, exhausted_at: int | None, now: int, *, may_resume: bool):
    """``exhausted_at`` after a change: set at the first time usage reaches the limit; cleared only by
    a change that may resume the pair (a new limit, cleared usage, a new period)."""
    if used >= limit:
        return exhausted_at if exhausted_at is not None else now
    return None if may_resume else exhausted_at


class QuotaService:
    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time,
                 publish: Callable[[QuotaPush], None] | None = None):
        self.store = store
        self.clock = clock
        self.publish = publish
        # called before every quota change (serve: apply the stats reports queued so far)
        self.before_change: Callable[[], object] = lambda: None
        self._lock = threading.Lock()
        # cumulative counters since this process started (Prometheus counters may reset on restart)
        self._period_resets: dict[tuple[str, str], int] = {}
        self._exhaustions: dict[tuple[str, str], int] = {}

    def _now(self) -> int:
        return int(self.clock())

    # ---------------------------------------------------------------- lookups

    def _quota_target(self, user_id, client_ref) -> tuple[str, dict]:
        """(user id, client) for a new quota: both exist and a grant gives the user the client."""
        if store_users.find_user_row(self.store, user_id) is None:
            raise PortunusError("quota_target_not_found", f"user {_shown(user_id)} not found", user_id=user_id)
        try:
            client = store_clients.resolve_client_ref(self.store, client_ref)
        except PortunusError as e:
            if e.code != "not_found":
                raise
            raise PortunusError("quota_target_not_found", f"client {_shown(client_ref)} not found",
                                client=client_ref) from None
        if not store_grants.grants_covering_client(self.store, user_id, client["client_id"]):
            raise PortunusError("quota_target_not_found",
                                f"user {user_id!r} has no grant on client {client['client_name']!r} "
                                f"({client['client_id']}); add a grant first",
                                user_id=user_id, client_id=client["client_id"])
        return user_id, client

    def _existing(self, user_id, client_ref):
        """The quota row of (user, client ref) or ``quota_not_found``."""
        try:
            client_id = store_clients.resolve_client_ref(self.store, client_ref)["client_id"]
        except PortunusError as e:
            if e.code != "not_found":
                raise
            client_id = None
        row = None
        if isinstance(user_id, str) and client_id is not None:
            row = store_quotas.find_quota(self.store, user_id, client_id)
        if row is None:
            raise PortunusError("quota_not_found", f"no quota for user {_shown(user_id)} on client "
                                                   f"{_shown(client_ref)}", user_id=user_id, client=client_ref)
        return row

    def status(self, user_id, client_ref) -> dict:
        return store_quotas.quota_view(self._existing(user_id, client_ref))

    def list_for_user(self, user_id) -> list[dict]:
        if not isinstance(user_id, str) or store_users.find_user_row(self.store, user_id) is None:
            raise store_users.not_found(user_id)
        return [store_quotas.quota_view(r) for r in store_quotas.list_quotas(self.store, user_id=user_id)]

    def list_for_client(self, client_ref) -> list[dict]:
        client_id = store_clients.resolve_client_ref(self.store, client_ref)["client_id"]
        return [store_quotas.quota_view(r) for r in store_quotas.list_quotas(self.store, client_id=client_id)]

    # ---------------------------------------------------------------- changes

    def put(self, user_id, client_ref, body) -> QuotaChange:
        """Create the quota, or replace its limit (the anchor is immutable; usage is kept)."""
        body = _check_body(body, PUT_FIELDS)
        self.before_change()
        if "monthly_bytes" not in body:
            raise PortunusError("invalid_quota_size", "monthly_bytes is required")
        limit = parse_monthly_bytes(body["monthly_bytes"])
        anchor = body.get("billing_anchor")
        if anchor is not None:
            anchor = parse_billing_anchor(anchor)
        user_id, client = self._quota_target(user_id, client_ref)
        if QUOTA_CAPABILITY not in client["capabilities"] and client["client_version"] is not None:
            raise PortunusError("quota_unsupported_by_client",
                                f"client {client['client_name']!r} ({client['client_version']}) does not support "
                                f"traffic quotas; upgrade it first", client_id=client["client_id"])
        client_id, now = client["client_id"], self._now()
        events = []
        with self.store.write():
            row = store_quotas.find_quota(self.store, user_id, client_id)
            if row is None:
                anchor = now if anchor is None else anchor
                exhausted_at = settle_exhaustion(limit, 0, None, now, may_resume=True)
                store_quotas.insert_quota(self.store, user_id, client_id, limit, anchor,
                                          billing_period(anchor, now), exhausted_at, _stamp(now))
                if exhausted_at is not None:
                    events.append(("exhausted", user_id, client_id))
            else:
                if anchor is not None and anchor != row["billing_anchor"]:
                    raise PortunusError("invalid_billing_anchor",
                                        f"billing_anchor is immutable: the quota has {row['billing_anchor']}, "
                                        f"got {anchor}; delete and re-create the quota to move it",
                                        billing_anchor=row["billing_anchor"])
                events += self._rewrite(row, now, limit=limit, clear=False)
            view = store_quotas.quota_view(store_quotas.find_quota(self.store, user_id, client_id))
        self._after_commit(events, view)
        return QuotaChange(view, created=row is None)

    def patch(self, user_id, client_ref, body) -> QuotaChange:
        """``monthly_bytes`` then ``clear_period_usage``, one resulting state, one push."""
        body = _check_body(body, PATCH_FIELDS)
        self.before_change()
        limit = parse_monthly_bytes(body["monthly_bytes"]) if "monthly_bytes" in body else None
        clear = body.get("clear_period_usage", False)
        if not isinstance(clear, bool):
            raise PortunusError("validation.invalid_clear_period_usage",
                                f"clear_period_usage must be true or false, got {_shown(clear)}")
        now = self._now()
        with self.store.write():
            row = self._existing(user_id, client_ref)
            events = self._rewrite(row, now, limit=limit, clear=clear)
            view = store_quotas.quota_view(store_quotas.find_quota(self.store, row["user_id"], row["client_id"]))
        self._after_commit(events, view)
        return QuotaChange(view)

    def delete(self, user_id, client_ref) -> dict:
        """Remove the quota (the pair forwards unmetered again); returns its last view."""
        self.before_change()
        with self.store.write():
            row = self._existing(user_id, client_ref)
            store_quotas.delete_quota(self.store, row["user_id"], row["client_id"])
        key = (row["user_id"], row["client_id"])
        with self._lock:
            self._period_resets.pop(key, None)
            self._exhaustions.pop(key, None)
        log.info("traffic_quota.removed", user_id=key[0], client_id=key[1])
        self._send(QuotaPush(key[0], key[1], "remove"))
        return store_quotas.quota_view(row)

    def _rewrite(self, row, now: int, *, limit: int | None, clear: bool) -> list[tuple]:
        """Apply a limit and/or a usage clear to a row (rolling a due period first); returns events."""
        events = []
        period = (row["period_started_at"], row["period_ends_at"])
        used, exhausted_at = row["period_bytes_used"], row["exhausted_at"]
        if now >= period[1]:
            period, used, exhausted_at = billing_period(row["billing_anchor"], now, period[0]), 0, None
            events.append(("rolled", row["user_id"], row["client_id"], period))
        if clear:
            used = 0
        new_limit = row["monthly_bytes"] if limit is None else limit
        may_resume = limit is not None or clear or bool(events)
        settled = settle_exhaustion(new_limit, used, exhausted_at, now, may_resume=may_resume)
        if settled is not None and exhausted_at is None:  # (after a roll, exhausted_at is None here)
            events.append(("exhausted", row["user_id"], row["client_id"]))
        store_quotas.update_quota(self.store, row["user_id"], row["client_id"], monthly_bytes=new_limit,
                                  period=period, bytes_used=used, exhausted_at=settled, now_text=_stamp(now))
        return events

    # ---------------------------------------------------------------- events, pushes

    def _after_commit(self, events: list[tuple], view: dict | None) -> None:
        """Log and count what happened, then push the one resulting state."""
        for event in events:
            key = (event[1], event[2])
            if event[0] == "rolled":
                with self._lock:
                    self._period_resets[key] = self._period_resets.get(key, 0) + 1
                log.info("traffic_quota.period_rolled", user_id=key[0], client_id=key[1],
                         period_started_at=event[3][0], period_ends_at=event[3][1])
            else:
                with self._lock:
                    self._exhaustions[key] = self._exhaustions.get(key, 0) + 1
                log.info("traffic_quota.exhausted", user_id=key[0], client_id=key[1],
                         monthly_bytes=view["monthly_bytes"] if view else None,
                         bytes_used=view["current_period_bytes_used"] if view else None)
        if view is not None:
            self._send(QuotaPush(view["user_id"], view["client_id"], "set", client_state(view)))

    def _send(self, push: QuotaPush) -> None:
        if self.publish is None:
            return
        try:
            self.publish(push)
        except Exception as e:  # the change is committed; the reconnect replay carries it
            log.error("traffic_quota.push_failed", user_id=push.user_id, client_id=push.client_id, error=str(e))

    def tick(self) -> list[QuotaPush]:
        """Roll every ended period (usage to 0, un-exhausted), log, push; run every 60 s off the loop."""
        now, pushes = self._now(), []
        for due in store_quotas.quotas_due(self.store, now):
            with self.store.write():
                row = store_quotas.find_quota(self.store, due["user_id"], due["client_id"])
                if row is None or row["period_ends_at"] > now:
                    continue  # removed or rolled meanwhile
                events = self._rewrite(row, now, limit=None, clear=False)
                view = store_quotas.quota_view(store_quotas.find_quota(self.store, row["user_id"], row["client_id"]))
            self._after_commit(events, view)
            pushes.append(QuotaPush(view["user_id"], view["client_id"], "set", client_state(view)))
        return pushes

    def charge(self, usage: dict[tuple[str, str], int], report_at: int) -> list[tuple]:
        """Count delivered bytes per (user, client) inside the caller's write transaction.

        Returns the events to hand to ``finish_charge`` after the commit (period rolls, first
        exhaustions). Pairs without a quota are ignored.
        """
        events = []
        for (user_id, client_id), nbytes in usage.items():
            row = store_quotas.find_quota(self.store, user_id, client_id)
            if row is None:
                continue
            if report_at >= row["period_ends_at"]:
                events += self._rewrite(row, report_at, limit=None, clear=False)
            store_quotas.add_usage(self.store, user_id, client_id, nbytes, report_at)
            row = store_quotas.find_quota(self.store, user_id, client_id)
            if row["exhausted_at"] is None and row["period_bytes_used"] >= row["monthly_bytes"]:
                store_quotas.set_exhausted_at(self.store, user_id, client_id, report_at)
                events.append(("exhausted", user_id, client_id))
        return events

    def finish_charge(self, events: list[tuple]) -> None:
        """Log, count and push what ``charge`` found, once its transaction committed."""
        for key in dict.fromkeys((e[1], e[2]) for e in events):
            row = store_quotas.find_quota(self.store, *key)
            view = store_quotas.quota_view(row) if row is not None else None
            self._after_commit([e for e in events if (e[1], e[2]) == key], view)

    def client_exhausted(self, user_id: str, client_id: str) -> dict | None:
        """The client's handle ran dry: mark ``exhausted_at`` now (once) and push; None without a quota."""
        now = self._now()
        with self.store.write():
            marked = store_quotas.set_exhausted_at(self.store, user_id, client_id, now)
            row = store_quotas.find_quota(self.store, user_id, client_id)
        if row is None:
            return None
        view = store_quotas.quota_view(row)
        if marked:
            self._after_commit([("exhausted", user_id, client_id)], view)
        return view

    def replay_messages(self, client_id: str) -> list[dict]:
        """``traffic_quota_update`` messages for a reconnecting client, to send before its rules:
        a ``set`` per quota on it, and a ``remove`` for every other rule owner there (a quota
        deleted while it was offline)."""
        rows = store_quotas.list_quotas(self.store, client_id=client_id)
        with_quota = {r["user_id"] for r in rows}
        out = [QuotaPush(r["user_id"], client_id, "set", client_state(r)).message() for r in rows]
        out += [QuotaPush(owner, client_id, "remove").message()
                for owner in store_quotas.rule_owners_on_client(self.store, client_id) if owner not in with_quota]
        return out

    # ---------------------------------------------------------------- metrics

    def metric_families(self) -> list[Family]:
        """The quota families for ``/metrics``, with HELP and TYPE (one row per quota)."""
        out = []
        for name, samples in self.metric_samples().items():
            kind, help_text = METRIC_HELP[name]
            family = Family(name, kind, help_text)
            for labels, value in samples:
                family.add(labels, value)
            out.append(family)
        return out

    def metric_samples(self) -> dict[str, list[tuple[dict, int]]]:
        """SPEC §8.1 quota families as name -> [(labels {user, client}, value)]; ``client`` is the
        label every other family uses for that client (``metrics.client_labels``)."""
        families = {name: [] for name in (
            "portunus_traffic_quota_bytes_used", "portunus_traffic_quota_bytes_limit",
            "portunus_traffic_quota_exhausted", "portunus_traffic_quota_period_resets_total",
            "portunus_traffic_quota_exhausted_total")}
        with self._lock:
            resets, exhaustions = dict(self._period_resets), dict(self._exhaustions)
        names = client_labels(store_clients.list_clients(self.store))
        for row in store_quotas.list_quotas(self.store):
            key = (row["user_id"], row["client_id"])
            labels = {"user": row["user_id"], "client": names.get(row["client_id"], row["client_name"])}
            families["portunus_traffic_quota_bytes_used"].append((labels, row["period_bytes_used"]))
            families["portunus_traffic_quota_bytes_limit"].append((labels, row["monthly_bytes"]))
            families["portunus_traffic_quota_exhausted"].append((labels, int(row["exhausted_at"] is not None)))
            families["portunus_traffic_quota_period_resets_total"].append((labels, resets.get(key, 0)))
            families["portunus_traffic_quota_exhausted_total"].append((labels, exhaustions.get(key, 0)))
        return families
