"""Doctor results and their rendering (sans-IO): one ``Check`` per finding, text or JSON out."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
STATUSES = (OK, WARN, FAIL, SKIP)
SYMBOLS = {OK: "✓", WARN: "⚠", FAIL: "✗", SKIP: "–"}
_COLOURS = {OK: "\x1b[32m", WARN: "\x1b[33m", FAIL: "\x1b[31m", SKIP: "\x1b[2m"}
_RESET = "\x1b[0m"
_BOLD = "\x1b[1m"

# the section each id prefix is printed under, in this order; unknown prefixes follow, titled by the prefix
GROUP_TITLES = {
    "bundle": "Bundle", "endpoint": "Server endpoint", "tls": "TLS pin", "auth": "Token",
    "datadir": "Data directory", "store": "State database", "cert": "Certificate",
    "limits": "File descriptors", "splice": "Splice fast path", "ports": "Listen ports", "dns": "Resolver",
    "http": "Web UI and operator HTTP", "server": "Running server", "clients": "Clients", "rules": "Rules",
    "quotas": "Traffic quotas", "sni": "SNI routing",
}


@dataclass
class Check:
    """One finding: ``id`` is ``group.name``; ``details`` holds the values found (never a secret)."""

    id: str
    status: str
    summary: str
    details: dict = field(default_factory=dict)
    fix: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    @property
    def group(self) -> str:
        return self.id.split(".", 1)[0]

    def to_json(self) -> dict:
        return {"id": self.id, "status": self.status, "summary": self.summary, "details": self.details,
                "fix": self.fix}


def ok(check_id: str, summary: str, details: dict | None = None) -> Check:
    return Check(check_id, OK, summary, details or {})


def warn(check_id: str, summary: str, fix: str | None, details: dict | None = None) -> Check:
    return Check(check_id, WARN, summary, details or {}, fix)


def fail(check_id: str, summary: str, fix: str | None, details: dict | None = None) -> Check:
    return Check(check_id, FAIL, summary, details or {}, fix)


def skip(check_id: str, summary: str, details: dict | None = None) -> Check:
    return Check(check_id, SKIP, summary, details or {})


def exit_code(checks: list[Check]) -> int:
    """0 when nothing failed (warnings and skips included), else 1."""
    return 1 if any(c.status == FAIL for c in checks) else 0


def render_json(checks: list[Check]) -> str:
    return json.dumps([c.to_json() for c in checks], indent=2, ensure_ascii=False, default=str)


def _value_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_value_text(v) for v in value) if value else "(none)"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_value_text(v)}" for k, v in value.items()) if value else "(none)"
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _grouped(checks: list[Check]) -> list[tuple[str, list[Check]]]:
    order = list(GROUP_TITLES)
    groups: dict[str, list[Check]] = {}
    for c in checks:
        groups.setdefault(c.group, []).append(c)
    keys = sorted(groups, key=lambda g: (order.index(g) if g in order else len(order), list(groups).index(g)))
    return [(GROUP_TITLES.get(k, k.capitalize()), groups[k]) for k in keys]


def render_text(checks: list[Check], colour: bool = False, title: str | None = None) -> str:
    """Grouped, one line per check with its values and fix indented below; ANSI colour only if asked."""
    def paint(status: str, text: str) -> str:
        return f"{_COLOURS[status]}{text}{_RESET}" if colour else text

    lines = []
    if title:
        lines += [f"{_BOLD}{title}{_RESET}" if colour else title, ""]
    for group_title, members in _grouped(checks):
        lines.append(f"{_BOLD}{group_title}{_RESET}" if colour else group_title)
        for c in members:
            lines.append(f"  {paint(c.status, SYMBOLS[c.status])} {c.summary}  [{c.id}]")
            for key, value in c.details.items():
                lines.append(f"      {key}: {_value_text(value)}")
            if c.fix and c.status in (WARN, FAIL):
                fix_lines = c.fix.splitlines() or [c.fix]
                lines.append("      " + paint(c.status, "fix: ") + fix_lines[0])
                lines += ["           " + extra for extra in fix_lines[1:]]
        lines.append("")
    counts = {s: sum(1 for c in checks if c.status == s) for s in STATUSES}
    tally = (f"{counts[OK]} ok, {counts[WARN]} warning(s), {counts[FAIL]} failed"
             + (f", {counts[SKIP]} skipped" if counts[SKIP] else ""))
    lines.append(paint(FAIL if counts[FAIL] else (WARN if counts[WARN] else OK), tally))
    return "\n".join(lines) + "\n"


def use_colour(stream, env) -> bool:
    """Colour on a terminal only, and never when NO_COLOR is set (no-color.org)."""
    if env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
