"""Reading the product's JSON-lines logs after a run: problems and event counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

PROBLEM_LEVELS = ("warn", "warning", "error", "critical", "fatal")


def log_events(path: Path) -> dict[str, int]:
    """event name -> count, for every JSON line of a log."""
    ev: dict[str, int] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ev
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "event" in rec:
            ev[str(rec["event"])] = ev.get(str(rec["event"]), 0) + 1
    return ev


def scan_json_log(path: Path, limit: int = 30,
                  benign: Callable[[dict], bool] | None = None) -> list[str]:
    """Warn/error events and non-JSON lines (tracebacks) from a JSON-lines log."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return scan_json_lines(text, limit, benign)


def iperf_udp_icmp(targets: set[str]) -> Callable[[dict], bool]:
    """The benign warning of the iperf3 UDP test: a one-shot iperf3 server exits at the
    end of its test while the last datagrams are still on their way, the kernel answers
    them with ICMP port unreachable, and the product evicts the flow and logs
    rule.target_failed (SPEC §2.4). Only for those targets."""
    def benign(rec: dict) -> bool:
        return (rec.get("event") == "rule.target_failed" and rec.get("reason") == "ICMP error"
                and rec.get("target") in targets)
    return benign


def scan_json_lines(text: str, limit: int = 30,
                    benign: Callable[[dict], bool] | None = None) -> list[str]:
    """One line per warn/error event kind (count and first example), then the
    first `limit` lines that are not a JSON object, joined. An event for which
    `benign(record)` is true is not a problem."""
    counts: dict[str, int] = {}
    examples: dict[str, str] = {}
    raw: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError
        except ValueError:
            if len(raw) < limit:
                raw.append(line)
            continue
        lvl = str(rec.get("level", "")).lower()
        if lvl in PROBLEM_LEVELS and not (benign is not None and benign(rec)):
            key = f"{lvl}:{rec.get('event')}"
            counts[key] = counts.get(key, 0) + 1
            examples.setdefault(key, line[:400])
    out = [f"{k} x{n}: {examples[k]}" for k, n in counts.items()]
    if raw:
        out.append("non-JSON stderr: " + " | ".join(raw)[:2000])
    return out
