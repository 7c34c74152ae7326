"""Structured logging: JSON lines (default) or compact/pretty text on stderr.

Field names containing ``token``, ``secret``, ``password`` or ``private_key`` are a
tripwire: their value is never printed, and the violation itself is logged as
``audit.redaction_violation``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone

LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40}
_SENSITIVE = ("token", "secret", "password", "private_key")
# how many (event, key) pairs ``Logger.limited`` remembers; the oldest is forgotten first, so a
# flood of distinct keys (e.g. source IPs) costs bounded memory
LIMITED_MAX_KEYS = 4096


def _is_sensitive(name: str) -> bool:
    lname = str(name).lower()
    return any(s in lname for s in _SENSITIVE)


_MAX_DEPTH = 16  # a logged peer value may nest ~1000 deep; deeper levels are cut, never a RecursionError


def _redact(value, path: str, violations: list, depth: int = 0):
    """Copy ``value`` with sensitive keys of nested dicts (e.g. a logged message) redacted."""
    if isinstance(value, (dict, list, tuple)) and depth >= _MAX_DEPTH:
        return "[too deep]"
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if _is_sensitive(k):
                out[k] = "[redacted]"
                violations.append(f"{path}.{k}")
            else:
                out[k] = _redact(v, f"{path}.{k}", violations, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_redact(v, f"{path}[{i}]", violations, depth + 1) for i, v in enumerate(value)]
    return value


def _text_value(v) -> str:
    # quote anything that could split the line or blur where the value ends (log forging)
    if isinstance(v, str) and v and v.isprintable() and " " not in v and '"' not in v:
        return v
    return json.dumps(v, default=str)


class _LimitedEntry:
    """One (event, key) of ``Logger.limited``: when it last wrote a line, what it swallowed since."""

    __slots__ = ("written_at", "suppressed", "level", "fields")

    def __init__(self, written_at: float, level: str, fields: dict):
        self.written_at = written_at
        self.suppressed = 0
        self.level = level
        self.fields = fields


class Logger:
    def __init__(self, stream=None, fmt: str = "json", level: str = "info", *,
                 clock=time.monotonic, limited_max_keys: int = LIMITED_MAX_KEYS, **context):
        self.stream = stream
        self.fmt = fmt
        self.level = LEVELS.get(level, 20)
        self.context = context
        self.clock = clock  # settable: rate-limit tests inject a fake clock
        self.limited_max_keys = limited_max_keys
        self._lock = threading.Lock()
        self._limited: OrderedDict[tuple[str, str], _LimitedEntry] = OrderedDict()
        self._limited_lock = threading.Lock()

    def configure(self, fmt: str | None = None, level: str | None = None, **context) -> None:
        if fmt is not None:
            self.fmt = fmt
        if level is not None:
            self.level = LEVELS.get(level, 20)
        self.context.update(context)

    def enabled(self, level: str) -> bool:
        return LEVELS.get(level, 20) >= self.level

    def log(self, level: str, event: str, **fields) -> None:
        if not self.enabled(level):
            return
        record = {
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": level,
            "event": event,
        }
        violations = []
        for key, value in {**self.context, **fields}.items():
            if _is_sensitive(key):
                record[key] = "[redacted]"
                violations.append(key)
            else:
                record[key] = _redact(value, key, violations)
        self._write(record)
        if violations:
            self._write({
                "timestamp": record["timestamp"],
                "level": "error",
                "event": "audit.redaction_violation",
                "fields": violations,
                "source_event": event,
            })

    def _write(self, record: dict) -> None:
        if self.fmt == "json":
            line = json.dumps(record, default=str, separators=(",", ":"))
        else:
            extras = " ".join(
                f"{k}={_text_value(v)}"
                for k, v in record.items()
                if k not in ("timestamp", "level", "event")
            )
            line = f"{record['timestamp']} {record['level'].upper():5} {record['event']} {extras}".rstrip()
        stream = self.stream or sys.stderr
        with self._lock:
            try:
                stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError):
                pass  # a closed stderr must never take the data plane down

    def limited(self, level: str, event: str, *, key: str = "", every: float = 60.0, **fields) -> None:
        """Log ``event`` at most once per ``every`` seconds per (event, key).

        The first occurrence is written at once; later ones inside the window are only counted;
        the first one after the window is written with ``suppressed=<count since the last line>``
        (only when something was swallowed). ``flush_limited`` reports pending counts.
        """
        if not self.enabled(level):
            return
        now = self.clock()
        ident = (event, str(key))
        with self._limited_lock:
            entry = self._limited.get(ident)
            if entry is not None and now - entry.written_at < every:
                entry.suppressed += 1
                entry.level, entry.fields = level, fields
                return
            suppressed = entry.suppressed if entry is not None else 0
            self._limited[ident] = _LimitedEntry(now, level, fields)
            self._limited.move_to_end(ident)
            while len(self._limited) > self.limited_max_keys:
                # forgetting a key loses at most its pending count, never a first occurrence
                self._limited.popitem(last=False)
        if suppressed:
            fields = {**fields, "suppressed": suppressed}
        self.log(level, event, **fields)

    def flush_limited(self) -> None:
        """Write one ``suppressed=N`` summary line per (event, key) with a pending count."""
        now = self.clock()
        pending = []
        with self._limited_lock:
            for (event, _key), entry in self._limited.items():
                if entry.suppressed:
                    pending.append((entry.level, event, {**entry.fields, "suppressed": entry.suppressed}))
                    entry.suppressed = 0
                    entry.written_at = now
        for level, event, fields in pending:
            self.log(level, event, **fields)

    def debug(self, event: str, **fields) -> None:
        self.log("debug", event, **fields)

    def info(self, event: str, **fields) -> None:
        self.log("info", event, **fields)

    def warn(self, event: str, **fields) -> None:
        self.log("warn", event, **fields)

    def error(self, event: str, **fields) -> None:
        self.log("error", event, **fields)


# The process-wide logger; roles configure it at start.
log = Logger()

