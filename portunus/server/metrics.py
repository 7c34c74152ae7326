"""Prometheus text exposition (format 0.0.4), sans-IO: families in, text out.

``render`` is total: a sample whose value is not a number is skipped (and logged,
rate-limited), and label values are escaped and made encodable, so one bad row can
never take ``/metrics`` down. ``server_families`` assembles the server's families
from plain data, so what rows exist is testable without a server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ..control.stats_report import RATE_LIMIT_KEY
from ..log import log


@dataclass
class Family:
    name: str
    type: str  # counter | gauge | histogram
    help: str
    samples: list = field(default_factory=list)  # (suffix, labels: dict, value)

    def add(self, labels: dict, value: float, suffix: str = "") -> None:
        self.samples.append((suffix, labels, value))


def _encodable(text: str) -> str:
    # a lone surrogate (e.g. in a stored client name) cannot be UTF-8 encoded by the HTTP layer
    return text.encode("utf-8", "replace").decode("utf-8")


def _escape_label(value) -> str:
    return _encodable(str(value)).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return _encodable(text).replace("\\", "\\\\").replace("\n", "\\n")


def _fmt(value) -> str:
    """The sample value as Prometheus text; ``ValueError`` for anything that is not a number."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, float):
        raise ValueError(f"not a number: {type(value).__name__}")
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def render(families: list[Family]) -> str:
    lines = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.type}")
        for suffix, labels, value in fam.samples:
            try:
                text = _fmt(value)
            except (ValueError, OverflowError) as exc:
                log.limited("warn", "metrics.sample_skipped", key=fam.name, family=fam.name, error=str(exc))
                continue
            if labels:
                body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
                lines.append(f"{fam.name}{suffix}{{{body}}} {text}")
            else:
                lines.append(f"{fam.name}{suffix} {text}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the server's families

def client_labels(clients: list[dict]) -> dict[str, str]:
    """The ``client`` label per client id: its name, unique across the list.

    Names may repeat (SPEC: a display label). The oldest unrevoked client with a name
    keeps it bare; each later one, and any revoked one, is shown as ``name (client_id)``.
    So a label does not change when another client is enrolled under the same name,
    and a replacement enrolled after revoking the old edge host gets the bare name.
    ``clients`` must be in enrollment order (``store.clients.list_clients`` is).
    """
    labels: dict[str, str] = {}
    taken: set[str] = set()
    for c in sorted(clients, key=lambda c: bool(c.get("revoked_at"))):  # stable: enrollment order kept
        label = c["client_name"]
        if label in taken:
            label = f"{c['client_name']} ({c['client_id']})"
        taken.add(label)
        labels[c["client_id"]] = label
    return labels


# (family, type, help, snapshot key, protocol or None for both)
PER_RULE = (
    ("portunus_rule_bytes_in_total", "counter", "Bytes delivered from end users to targets.", "bytes_in", "tcp"),
    ("portunus_rule_bytes_out_total", "counter", "Bytes delivered from targets to end users.", "bytes_out", "tcp"),
    ("portunus_rule_active_connections", "gauge", "Open TCP connections.", "active_connections", "tcp"),
    ("portunus_rule_dns_failures_total", "counter", "Target name resolution failures.", "dns_failures", None),
    ("portunus_rule_udp_datagrams_in_total", "counter", "Datagrams forwarded to targets.", "datagrams_in", "udp"),
    ("portunus_rule_udp_datagrams_out_total", "counter", "Datagrams returned to end users.", "datagrams_out", "udp"),
    ("portunus_rule_active_flows", "gauge", "Live UDP flows.", "active_flows", "udp"),
    ("portunus_rule_flows_dropped_overflow_total", "counter", "New UDP flows dropped at the flow cap.",
     "flows_dropped_overflow", "udp"),
)


def _counter_family(name: str, help_text: str, label: str, counts: dict[str, int], always=()) -> Family:
    f = Family(name, "counter", help_text)
    for key in sorted(set(counts) | set(always)):
        f.add({label: key}, counts.get(key, 0))
    return f


def server_families(*, clients: list[dict], connected_ids: set[str], rules: list[dict],
                    snapshot_of: Callable[[str], dict | None], auth_failures: dict[str, int],
                    rejected_messages: dict[str, int], rejected_reasons=(), operator_requests: dict,
                    audit_drops: int = 0, store_busy: int = 0,
                    owner_rows: dict[str, list[dict]] | None = None) -> list[Family]:
    """Every family of the server's ``/metrics``; ``rules`` are the live (active/pending) rules;
    ``owner_rows`` the owner envelope rows of each client's last report (client id -> rows)."""
    labels = client_labels(clients)
    fams = []
    f = Family("portunus_clients_connected", "gauge",
               "Per enrolled, unrevoked client: 1 while it has a live control channel, else 0.")
    for c in clients:
        if not c.get("revoked_at"):
            f.add({"client": labels[c["client_id"]]}, 1 if c["client_id"] in connected_ids else 0)
    fams.append(f)
    fams.append(_counter_family("portunus_auth_failures_total", "Control-channel authentication failures by reason.",
                                "reason", auth_failures, ("invalid_token", "token_revoked")))
    fams.append(_counter_family("portunus_control_rejected_messages_total",
                                "Messages from authenticated clients dropped as not about their own rules, "
                                "or malformed, by reason.", "reason", rejected_messages, rejected_reasons))
    f = Family("portunus_operator_requests_total", "counter", "Operator API requests by outcome and reason.")
    for (outcome, reason), n in sorted(operator_requests.items()):
        f.add({"outcome": outcome, "reason": reason}, n)
    fams.append(f)
    f = Family("portunus_audit_buffer_drops_total", "counter", "Audit rows that could not be written.")
    f.add({}, audit_drops)
    fams.append(f)
    f = Family("portunus_store_busy_total", "counter", "Times the store reported busy.")
    f.add({}, store_busy)
    fams.append(f)

    def rule_labels(r: dict) -> dict:
        return {"client": labels.get(r["client_id"], r["client_id"]), "rule": r["rule_id"],
                "owner": r.get("owner") or ""}

    snaps = {r["rule_id"]: snapshot_of(r["rule_id"]) or {} for r in rules}
    for name, typ, help_text, key, proto in PER_RULE:
        f = Family(name, typ, help_text)
        for r in rules:
            if proto is None or r["protocol"] == proto:
                f.add(rule_labels(r), snaps[r["rule_id"]].get(key, 0))
        fams.append(f)
    f = Family("portunus_rule_target_failovers_total", "counter", "Target health transitions (multi-target rules).")
    for r in rules:
        if len(r.get("targets", [])) > 1:
            f.add(rule_labels(r), snaps[r["rule_id"]].get("target_failovers_total", 0))
    fams.append(f)
    fams += sni_families(rules, snaps, labels, rule_labels)
    fams += rate_limit_families(rules, snaps, labels, rule_labels, owner_rows or {})
    return fams


def _listeners(rules: list[dict], snaps: dict) -> dict[tuple[str, int], dict]:
    """One ``sni_listener`` per (client, port): every rule of the port carries the same counters."""
    out: dict[tuple[str, int], dict] = {}
    for r in rules:
        listener = snaps[r["rule_id"]].get("sni_listener")
        if listener is not None:
            key = (r["client_id"], listener["listen_port"])
            held = out.get(key)
            # reports of the port's rules may come from two ticks: the larger counters are the newer
            if held is None or listener["peek_duration_seconds"]["count"] > held["peek_duration_seconds"]["count"]:
                out[key] = listener
    return out


def sni_families(rules: list[dict], snaps: dict, labels: dict, rule_labels: Callable) -> list[Family]:
    """SPEC §8.1 SNI families from the reported ``sni_routes`` / ``sni_listener`` (docs/sni.md)."""
    routes = Family("portunus_tls_sni_route_total", "counter",
                    "Connections an SNI listener routed to the rule, by result (exact, wildcard, fallback).")
    for r in rules:
        by_result = snaps[r["rule_id"]].get("sni_routes")
        for result, n in (by_result or {}).items():
            routes.add({**rule_labels(r), "result": result}, n)
    misses = Family("portunus_tls_sni_listener_miss_total", "counter",
                    "Connections closed because their hello had no SNI or matched no pattern, and there was "
                    "no fallback.")
    failures = Family("portunus_tls_sni_listener_parse_failures_total", "counter",
                      "Connections closed because they did not send a well-formed TLS ClientHello.")
    active = Family("portunus_tls_sni_routes_active", "gauge", "SNI patterns routed by the client's listeners.")
    peek = Family("portunus_tls_client_hello_peek_duration_seconds", "histogram",
                  "How long reading a ClientHello took (up to the 3 s timeout).")
    per_client: dict[str, int] = {}
    for (client_id, port), listener in sorted(_listeners(rules, snaps).items()):
        where = {"client": labels.get(client_id, client_id), "port": str(port)}
        misses.add(where, listener["misses"])
        failures.add(where, listener["parse_failures"])
        per_client[client_id] = per_client.get(client_id, 0) + listener["routes_active"]
        hist = listener["peek_duration_seconds"]
        for le, n in hist["buckets"]:
            peek.add({**where, "le": repr(float(le))}, n, "_bucket")
        peek.add({**where, "le": "+Inf"}, hist["count"], "_bucket")
        peek.add(where, float(hist["sum"]), "_sum")
        peek.add(where, hist["count"], "_count")
    for client_id, n in sorted(per_client.items()):
        active.add({"client": labels.get(client_id, client_id)}, n)
    return [routes, misses, failures, active, peek]


def rate_limit_families(rules: list[dict], snaps: dict, labels: dict, rule_labels: Callable,
                        owner_rows: dict[str, list[dict]]) -> list[Family]:
    """SPEC §8.1 rate-limit families from the reported limiter counters; an owner envelope's rows
    have ``rule=""`` (docs/rate-limits.md)."""
    rejects = Family("portunus_rate_limit_reject_total", "counter",
                     "Connections or UDP flows refused by a rate-limit cap, by reason.")
    throttle = Family("portunus_rate_limit_throttle_seconds_total", "counter",
                      "Seconds during which at least one reader was parked on a bandwidth cap, by direction.")
    active = Family("portunus_rate_limit_active_connections", "gauge",
                    "Live connections and flows counted by a rule's limiter or an owner envelope (rule=\"\").")
    for r in rules:
        lim = snaps[r["rule_id"]].get(RATE_LIMIT_KEY)
        if lim is None:
            continue
        where = rule_labels(r)
        for reason, n in lim["rejects"].items():
            if n:
                rejects.add({**where, "reason": reason}, n)
        for direction, secs in lim["throttle_seconds"].items():
            throttle.add({**where, "direction": direction}, float(secs))
        active.add(where, lim["active"])
    live_owners = {(r["client_id"], r.get("owner")) for r in rules}
    for client_id, rows in sorted(owner_rows.items()):
        for row in rows:
            if (client_id, row["owner"]) not in live_owners:
                continue  # the owner's last rule went since that report: its envelope went with it
            where = {"client": labels.get(client_id, client_id), "rule": "", "owner": row["owner"]}
            for direction, secs in row["throttle_seconds"].items():
                throttle.add({**where, "direction": direction}, float(secs))
            active.add(where, row["active"])
    return [rejects, throttle, active]
