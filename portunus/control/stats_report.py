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

# SNI (SPEC §2.8, docs/sni.md): per-rule routes by result, and the port's shared listener counters
SNI_RESULTS = ("exact", "wildcard", "fallback")
SNI_MODES = ("sni", "plain")
SNI_LISTENER_COUNTERS = ("routes_active", "hellos_in_flight", "misses", "parse_failures", "hello_timeouts",
                         "reads_reset")
# the peek-duration histogram's upper bounds (seconds); the same tuple as relay.sni_listener.PEEK_BUCKETS
# (the control layer may not import the relay; tests/unit/test_sni_metrics.py keeps the two equal)
PEEK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0)
MAX_SNI_PATTERN = 253

# rate limits (SPEC §2.9, docs/rate-limits.md): the per-rule limiter counters, and the owner envelope rows
RATE_LIMIT_KEY = "rate_limit"  # the snapshot key the relay runtime fills (relay/enforce.py rule_snapshot)
RATE_LIMIT_REASONS = ("conn_concurrent", "conn_rate", "udp_flow_rate", "owner_concurrent", "owner_conn_rate",
                      "owner_udp_flow_rate")
DIRECTIONS = ("in", "out")
LIMITER_COUNTERS = ("active", "bandwidth_dropped_in", "bandwidth_dropped_out")

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
    sni_pattern: str | None = None
    owner: str | None = None

    @classmethod
    def of(cls, rule) -> "RuleShape":
        """From a ``Rule`` or its ``to_dict()``."""
        if isinstance(rule, dict):
            return cls(int(rule["listen_port"]), int(rule.get("listen_port_end") or rule["listen_port"]),
                       len(rule.get("targets") or ()) or 1, rule.get("sni_pattern"), rule.get("owner"))
        return cls(rule.listen_port, rule.listen_port_end, len(rule.targets) or 1, rule.sni_pattern, rule.owner)


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


def _seconds(value, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and 0 <= value < COUNTER_LIMIT:
        return value
    raise StatsRejected(MALFORMED, f"{where} must be a number of seconds >= 0, got {_shown(value)}")


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise StatsRejected(MALFORMED, f"{where} must be an object, got {_shown(value)}")
    return value


def _histogram(value, where: str) -> dict:
    """``{buckets: [[le, cumulative]…], sum, count}`` with exactly the ``PEEK_BUCKETS`` bounds."""
    value = _object(value, where)
    rows = value.get("buckets")
    if not isinstance(rows, list) or len(rows) != len(PEEK_BUCKETS):
        raise StatsRejected(MALFORMED, f"{where}.buckets must be {len(PEEK_BUCKETS)} [le, count] pairs")
    buckets, last = [], 0
    for row, le in zip(rows, PEEK_BUCKETS):
        if not (isinstance(row, list) and len(row) == 2 and row[0] == le and not isinstance(row[0], bool)
                and is_counter(row[1]) and row[1] >= last):
            raise StatsRejected(MALFORMED, f"{where}.buckets row {_shown(row)} must be [{le}, cumulative count]")
        last = row[1]
        buckets.append([le, row[1]])
    count = value.get("count")
    if not is_counter(count) or count < last:
        raise StatsRejected(MALFORMED, f"{where}.count {_shown(count)} must be a counter >= the last bucket")
    return {"buckets": buckets, "sum": _seconds(value.get("sum"), f"{where}.sum"), "count": count}


def _sni_listener(value, shape: RuleShape) -> dict:
    value = _object(value, "sni_listener")
    if value.get("listen_port") != shape.listen_port or isinstance(value.get("listen_port"), bool):
        raise StatsRejected(MALFORMED, f"sni_listener listen_port {_shown(value.get('listen_port'))} is not the "
                                       f"rule's port {shape.listen_port}")
    if value.get("mode") not in SNI_MODES or not isinstance(value.get("fallback"), bool):
        raise StatsRejected(MALFORMED, f"sni_listener mode must be one of {', '.join(SNI_MODES)} and fallback a "
                                       f"boolean, got {_shown(value.get('mode'))}, {_shown(value.get('fallback'))}")
    return {"listen_host": _text(value.get("listen_host")), "listen_port": shape.listen_port,
            "mode": value["mode"], "fallback": value["fallback"],
            **_counters(value, SNI_LISTENER_COUNTERS, MALFORMED, "sni_listener"),
            "peek_duration_seconds": _histogram(value.get("peek_duration_seconds"),
                                                "sni_listener.peek_duration_seconds")}


def _sni(snap: dict, shape: RuleShape, out: dict) -> None:
    """The SNI fields of a rule on an SNI port (its pattern, routes by result, the listener's counters)."""
    if "sni_pattern" not in snap and snap.get("sni_routes") is None and snap.get("sni_listener") is None:
        return
    pattern = snap.get("sni_pattern")
    if pattern != shape.sni_pattern:
        raise StatsRejected(MALFORMED, f"sni_pattern {_shown(pattern)} is not the rule's "
                                       f"({_shown(shape.sni_pattern)})")
    out["sni_pattern"] = pattern
    routes = snap.get("sni_routes")
    out["sni_routes"] = _counters(_object(routes, "sni_routes") if routes is not None else {},
                                  SNI_RESULTS, MALFORMED, "sni_routes")
    if snap.get("sni_listener") is not None:
        out["sni_listener"] = _sni_listener(snap["sni_listener"], shape)


def _directions(value, where: str) -> dict:
    value = _object(value if value is not None else {}, where)
    return {d: _seconds(value.get(d, 0) if value.get(d) is not None else 0, f"{where}.{d}") for d in DIRECTIONS}


def _limiter(value, where: str) -> dict:
    """A rule's limiter counters: ``{rejects: {reason: n}, throttle_seconds: {in, out}, active,
    bandwidth_dropped_in, bandwidth_dropped_out}`` (docs/rate-limits.md)."""
    value = _object(value, where)
    rejects = _object(value.get("rejects") if value.get("rejects") is not None else {}, f"{where}.rejects")
    unknown = sorted(str(k) for k in rejects if k not in RATE_LIMIT_REASONS)
    if unknown:
        raise StatsRejected(MALFORMED, f"{where}.rejects reason {_shown(unknown[0])} is not one of "
                                       f"{', '.join(RATE_LIMIT_REASONS)}")
    return {"rejects": _counters(rejects, RATE_LIMIT_REASONS, MALFORMED, f"{where}.rejects"),
            "throttle_seconds": _directions(value.get("throttle_seconds"), f"{where}.throttle_seconds"),
            **_counters(value, LIMITER_COUNTERS, MALFORMED, where)}


def clean_owner_rows(rows, shapes: dict[str, RuleShape]) -> list[dict]:
    """The owner envelope rows of a report (``[{owner, active, throttle_seconds, bandwidth_dropped_in,
    bandwidth_dropped_out}]``): at most one per owner of the client's rules, or ``StatsRejected``."""
    if rows is None:
        return []
    owners = {s.owner for s in shapes.values() if s.owner}
    if not isinstance(rows, list) or len(rows) > len(owners):
        raise StatsRejected(MALFORMED, "owners must be a list with at most one row per owner of the client's rules")
    out, seen = [], set()
    for row in rows:
        row = _object(row, "owners row")
        owner = row.get("owner")
        if owner not in owners or owner in seen:
            raise StatsRejected(UNKNOWN_RULE if isinstance(owner, str) and owner not in owners else MALFORMED,
                                f"owners row {_shown(owner)} is not an owner of this client's rules, or repeats")
        seen.add(owner)
        out.append({"owner": owner, "throttle_seconds": _directions(row.get("throttle_seconds"), "owners.throttle"),
                    **_counters(row, LIMITER_COUNTERS, MALFORMED, f"owners[{owner[:64]}]")})
    return out


def api_stats_extras(snap: dict) -> dict:
    """The SNI and rate-limit parts of a kept snapshot for ``GET rules/{id}/stats`` (present only
    when the client reported them): ``sni_pattern``, ``sni_routes``, ``sni_listener`` and
    ``rate_limit_stats`` (the limiter counters; ``rate_limit`` in a rule is its caps)."""
    out = {key: snap[key] for key in ("sni_pattern", "sni_routes", "sni_listener") if key in snap}
    if RATE_LIMIT_KEY in snap:
        out["rate_limit_stats"] = snap[RATE_LIMIT_KEY]
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
    _sni(snap, shape, out)
    if snap.get(RATE_LIMIT_KEY) is not None:
        out[RATE_LIMIT_KEY] = _limiter(snap[RATE_LIMIT_KEY], RATE_LIMIT_KEY)
    return out
