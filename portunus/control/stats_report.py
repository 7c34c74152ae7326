"""What the server accepts from a client's ``stats_report`` (SPEC §3.1, §8.3), sans-IO.

A client reports counters for the rules it runs. The server stores only what it can
trust the shape of: snapshots of rules *that client* owns, counters that are
non-negative integers below 2^63, per-port rows inside the rule's listen range and
per-target rows inside its target list. Everything else is rejected with a stable
reason, so one client can neither break a renderer nor make the server hold more
than one bounded snapshot per rule it owns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .frames import short_repr

COUNTER_LIMIT = 1 << 63  # Prometheus and SQLite both top out at int64
MAX_TEXT = 256  # longest reported string kept (a target host name, a health word)

RULE_COUNTERS = ("bytes_in", "bytes_out", "active_connections", "connections_total", "dns_failures",
                 "datagrams_in", "datagrams_out", "active_flows", "flows_dropped_overflow", "send_dropped",
                 "connect_failures", "target_failovers_total")
PORT_COUNTERS = ("bytes_in", "bytes_out", "active_connections", "datagrams_in", "datagrams_out")
TARGET_COUNTERS = ("bytes_in", "bytes_out", "connections", "consecutive_failures")
TARGET_HEALTH = ("healthy", "failed")

# stable reasons, also the label values of portunus_control_rejected_messages_total
# (the detail of a malformed snapshot, e.g. which per-port row, is in the log line, not the label)
UNKNOWN_RULE = "stats_unknown_rule"
BAD_COUNTER = "stats_bad_counter"
MALFORMED = "stats_malformed"
REASONS = (UNKNOWN_RULE, BAD_COUNTER, MALFORMED)


@dataclass(frozen=True)
class RuleShape:
    """What the server knows about a rule when it checks a report about it."""

    listen_port: int
    listen_port_end: int
    target_count: int

    @classmethod
    def of(cls, rule) -> "RuleShape":
        """From a ``Rule`` or its ``to_dict()``."""
        if isinstance(rule, dict):
            return cls(int(rule["listen_port"]), int(rule.get("listen_port_end") or rule["listen_port"]),
                       len(rule.get("targets") or ()) or 1)
        return cls(rule.listen_port, rule.listen_port_end, len(rule.targets) or 1)


class StatsRejected(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def is_counter(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < COUNTER_LIMIT


def _counters(row: dict, names: tuple[str, ...], reason: str, where: str) -> dict:
    out = {}
    for name in names:
        value = row.get(name, 0)
        if value is None:
            value = 0
        if not is_counter(value):
            raise StatsRejected(reason, f"{where} {name} must be an integer 0..2^63-1, got {_shown(value)}")
        out[name] = value
    return out


def _shown(value) -> str:
    return short_repr(value)


LATEST_TIME = 253402300799  # 9999-12-31T23:59:59Z: beyond it time.gmtime() and RFC 3339 give up


def _timestamp(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and 0 <= value <= LATEST_TIME:
        return value
    return None


def report_time(at, received_at: float) -> float:
    """The report's own ``at`` when it is a usable epoch time, else when the server received it."""
    value = _timestamp(at)
    return received_at if value is None else value


def _text(value, default=None):
    return value[:MAX_TEXT] if isinstance(value, str) else default


def _per_port(rows, shape: RuleShape) -> list[dict]:
    if not isinstance(rows, list) or len(rows) > shape.listen_port_end - shape.listen_port + 1:
        raise StatsRejected(MALFORMED, "per_port must be a list with at most one row per listen port")
    out, seen = [], set()
    for row in rows:
        if not isinstance(row, dict):
            raise StatsRejected(MALFORMED, f"per_port rows must be objects, got {_shown(row)}")
        port = row.get("listen_port")
        if not (isinstance(port, int) and not isinstance(port, bool)
                and shape.listen_port <= port <= shape.listen_port_end) or port in seen:
            raise StatsRejected(MALFORMED, f"per_port listen_port {_shown(port)} is not a port of the rule "
                                              f"({shape.listen_port}-{shape.listen_port_end}) or repeats")
        seen.add(port)
        out.append({"listen_port": port, **_counters(row, PORT_COUNTERS, MALFORMED, f"per_port[{port}]")})
    return out


def _per_target(rows, shape: RuleShape) -> list[dict]:
    if not isinstance(rows, list) or len(rows) > shape.target_count:
        raise StatsRejected(MALFORMED, "per_target must be a list with at most one row per target")
    out, seen = [], set()
    for row in rows:
        if not isinstance(row, dict):
            raise StatsRejected(MALFORMED, f"per_target rows must be objects, got {_shown(row)}")
        index = row.get("index")
        if not (isinstance(index, int) and not isinstance(index, bool) and 0 <= index < shape.target_count) \
                or index in seen:
            raise StatsRejected(MALFORMED, f"per_target index {_shown(index)} is not a target of the rule "
                                                f"(0-{shape.target_count - 1}) or repeats")
        seen.add(index)
        port = row.get("port")
        priority = row.get("priority")
        out.append({
            "index": index,
            "host": _text(row.get("host"), ""),
            "port": port if isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535 else None,
            "priority": priority if is_counter(priority) else 0,
            "proxy_protocol": _text(row.get("proxy_protocol")),
            "health": row.get("health") if row.get("health") in TARGET_HEALTH else "healthy",
            "last_failure_at": _timestamp(row.get("last_failure_at")),
            "last_success_at": _timestamp(row.get("last_success_at")),
            **_counters(row, TARGET_COUNTERS, MALFORMED, f"per_target[{index}]"),
        })
    return out


def clean_snapshot(snap, shapes: dict[str, RuleShape]) -> dict:
    """The trusted copy of one reported rule snapshot, or ``StatsRejected``.

    ``shapes`` maps the rule ids the reporting client owns to their shapes. Unknown
    extra fields are dropped, so what is kept per rule is bounded by the rule itself.
    """
    if not isinstance(snap, dict) or not isinstance(snap.get("rule_id"), str):
        raise StatsRejected(MALFORMED, "a rule snapshot must be an object with a string rule_id")
    rule_id = snap["rule_id"]
    shape = shapes.get(rule_id)
    if shape is None:
        raise StatsRejected(UNKNOWN_RULE, f"rule {_shown(rule_id)} is not a rule of this client")
    out = {"rule_id": rule_id, **_counters(snap, RULE_COUNTERS, BAD_COUNTER, "rule")}
    out["updated_at"] = _timestamp(snap.get("updated_at"))
    if snap.get("per_port") is not None:
        out["per_port"] = _per_port(snap["per_port"], shape)
    if snap.get("per_target") is not None:
        out["per_target"] = _per_target(snap["per_target"], shape)
    return out
