"""Reading the product's JSON-lines logs after a run: problems and event counts."""

from __future__ import annotations

import json
from pathlib import Path

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


def scan_json_log(path: Path, limit: int = 30) -> list[str]:
    """Warn/error events and non-JSON lines (tracebacks) from a JSON-lines log."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return scan_json_lines(text, limit)


def scan_json_lines(text: str, limit: int = 30) -> list[str]:
    """One line per warn/error event kind (count and first example), then the
    first `limit` lines that are not a JSON object, joined."""
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
        if lvl in PROBLEM_LEVELS:
            key = f"{lvl}:{rec.get('event')}"
            counts[key] = counts.get(key, 0) + 1
            examples.setdefault(key, line[:400])
    out = [f"{k} x{n}: {examples[k]}" for k, n in counts.items()]
    if raw:
        out.append("non-JSON stderr: " + " | ".join(raw)[:2000])
    return out
