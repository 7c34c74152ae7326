"""How the operator CLI prints: JSON, aligned tables, byte counts, and the rule columns of list-rules."""

from __future__ import annotations

import json

from .units import caps_text

ALL_INTERFACES = "0.0.0.0"  # a rule's listen_host unless --listen-host is given (SPEC §2.1)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def table(rows: list[list], headers: list[str]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def sni_ports(rules: list[dict]) -> set[tuple]:
    """The (client, listen host, port) of every SNI rule listed: a plain rule there is the fallback."""
    return {(r["client_id"], r.get("listen_host") or ALL_INTERFACES, r["listen_port"])
            for r in rules if r.get("sni_pattern")}


def rule_caps(rule: dict, sni_ports_listed: set[tuple] = frozenset()) -> str:
    """Features (``range``, ``multi``, ``proxy``, ``sni=<pattern>`` or ``sni=fallback``), then the
    rate-limit caps as ``units.caps_text`` shows them (``↓1.0M ↑512K 100/s ≤1000``)."""
    caps = []
    if rule["listen_port_end"] != rule["listen_port"]:
        caps.append("range")
    if len(rule.get("targets") or []) > 1:
        caps.append("multi")
    if any(t.get("proxy_protocol") for t in rule.get("targets") or []):
        caps.append("proxy")
    if rule.get("sni_pattern"):
        caps.append(f"sni={rule['sni_pattern']}")
    elif (rule["client_id"], rule.get("listen_host") or ALL_INTERFACES, rule["listen_port"]) in sni_ports_listed:
        caps.append("sni=fallback")
    shown = [",".join(caps)] if caps else []
    if rule.get("rate_limit"):
        shown.append(caps_text(rule["rate_limit"]))
    return " ".join(shown) or "-"


def target_text(rule: dict) -> str:
    out = []
    for t in rule.get("targets") or []:
        host = f"[{t['host']}]" if ":" in t["host"] else t["host"]
        port = f"{t['port']}-{t['port_end']}" if t.get("port_end") else str(t["port"])
        if rule["listen_port_end"] != rule["listen_port"] and not t.get("port_end"):
            port = f"{t['port']}-{t['port'] + rule['listen_port_end'] - rule['listen_port']}"
        out.append(f"{host}:{port}")
    return ",".join(out)


def listen_text(rule: dict) -> str:
    """`8080`, `30000-30099`, or with the address in front when the rule binds only one."""
    listen = str(rule["listen_port"]) if rule["listen_port"] == rule["listen_port_end"] else \
        f"{rule['listen_port']}-{rule['listen_port_end']}"
    host = rule.get("listen_host") or ALL_INTERFACES
    if host == ALL_INTERFACES:
        return listen
    return f"[{host}]:{listen}" if ":" in host else f"{host}:{listen}"
