"""`portunus-server quota …` and `portunus-server traffic …` (SPEC §4.4, §7.1; issue 14).

Online only: they call the running server's API with ``PORTUNUS_OPERATOR_TOKEN`` like the
other online commands (the quota state lives with the server's accounting, and a change must
reach the client at once).

    portunus-server quota set alice edge-tokyo --monthly 2TiB [--anchor 2026-01-31T10:00:00Z]
    portunus-server quota get|clear|delete alice edge-tokyo
    portunus-server quota list alice            (or: quota list --client edge-tokyo)
    portunus-server traffic alice [--client edge-tokyo] [--from 24h] [--to now] [--bucket 1m|1h]
    portunus-server traffic --client edge-tokyo
    portunus-server traffic                     (global)

``--monthly`` takes human units (``units.parse_bytes``: ``4MiB``, ``2TiB``, ``500G``, ``0``).
Times (``--anchor``, ``--from``, ``--to``) are unix seconds, RFC 3339 (``2026-01-31T10:00:00Z``),
``now``, or a duration before now (``90s``, ``15m``, ``24h``, ``7d``).
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from urllib.parse import urlencode

from ..errors import PortunusError
from .api_client import operator_api, quote
from .output import human_bytes, print_json, table
from .units import parse_bytes

FORMATS = ("text", "json")
_AGO = re.compile(r"([0-9]{1,9})([smhd])")
_AGO_SECS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_parsers(sub) -> None:
    """Register `quota` and `traffic` on portunus-server's subparsers."""
    q = sub.add_parser("quota", help="traffic quotas per (user, client): set, get, list, clear, delete")
    actions = q.add_subparsers(dest="quota_command", metavar="<action>")
    actions.required = True

    s = actions.add_parser("set", help="create or replace a (user, client) monthly quota")
    _pair(s)
    s.add_argument("--monthly", required=True, metavar="SIZE",
                   help="monthly budget, bytes with optional units: 4MiB, 500G, 2TiB (0 blocks at once)")
    s.add_argument("--anchor", metavar="TIME",
                   help="billing anchor (unix seconds or RFC 3339; default now; immutable once set)")
    s.set_defaults(fn=cmd_quota_set)

    for name, help_text, fn in (("get", "show a quota's status", cmd_quota_get),
                                ("clear", "clear the period's usage (a one-shot credit; resumes forwarding)",
                                 cmd_quota_clear),
                                ("delete", "remove the quota (the pair forwards unmetered)", cmd_quota_delete)):
        s = actions.add_parser(name, help=help_text)
        _pair(s)
        s.set_defaults(fn=fn)

    s = actions.add_parser("list", help="list a user's quotas, or a client's (--client)")
    s.add_argument("user_id", metavar="USER", nargs="?")
    s.add_argument("--client", metavar="CLIENT", help="list the quotas on this client (id or name)")
    s.add_argument("--format", choices=FORMATS, default="text")
    s.set_defaults(fn=cmd_quota_list)

    t = sub.add_parser("traffic", help="traffic history of a user, a client (--client), or everything")
    t.add_argument("user_id", metavar="USER", nargs="?")
    t.add_argument("--client", metavar="CLIENT", help="a client id or name")
    t.add_argument("--from", dest="from_", metavar="TIME", help="window start (default: 24 h before --to)")
    t.add_argument("--to", metavar="TIME", help="window end (default: now)")
    t.add_argument("--bucket", choices=("1m", "1h"), help="default: 1m up to 24 h, else 1h")
    t.add_argument("--format", choices=FORMATS, default="text")
    t.set_defaults(fn=cmd_traffic)


def _pair(parser) -> None:
    parser.add_argument("user_id", metavar="USER")
    parser.add_argument("client", metavar="CLIENT", help="client id or name")
    parser.add_argument("--format", choices=FORMATS, default="text")


def _quota_path(args) -> str:
    return f"/v1/users/{quote(args.user_id)}/quotas/{quote(args.client)}"


# ---------------------------------------------------------------- times

def parse_time(text: str, what: str, *, code: str, now: float | None = None) -> int:
    """Unix seconds from unix seconds, RFC 3339, ``now`` or a duration before now (``24h``)."""
    now = time.time() if now is None else now
    text = text.strip()
    if text.isascii() and text.isdigit() and len(text) <= 13:
        return int(text)
    if text == "now":
        return int(now)
    ago = _AGO.fullmatch(text)
    if ago:
        return int(now) - int(ago[1]) * _AGO_SECS[ago[2]]
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise PortunusError(code, f"{what} must be unix seconds, RFC 3339 (2026-01-31T10:00:00Z), now, or a "
                                  f"duration before now (24h, 7d), got {text[:40]!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


def _when(ts) -> str:
    if ts is None:
        return "-"
    from ..store.db import rfc3339  # the store's one formatter; imported here, not by every --help
    return rfc3339(ts)


# ---------------------------------------------------------------- output

def _pct(view: dict) -> str:
    if not view["monthly_bytes"]:
        return "100%" if view["exhausted"] else "0%"
    return f"{100 * view['current_period_bytes_used'] / view['monthly_bytes']:.1f}%"


def _print_view(view: dict, fmt: str) -> None:
    if fmt == "json":
        print_json(view)
        return
    exhausted = f"yes, since {_when(view['exhausted_at'])}" if view["exhausted"] else "no"
    rows = [
        ("user", view["user_id"]),
        ("client", f"{view['client_name']} ({view['client_id']})"),
        ("monthly", f"{human_bytes(view['monthly_bytes'])} ({view['monthly_bytes']} bytes)"),
        ("used", f"{human_bytes(view['current_period_bytes_used'])} ({_pct(view)}; "
                 f"{view['current_period_bytes_used']} bytes)"),
        ("remaining", f"{human_bytes(view['budget_remaining_bytes'])} ({view['budget_remaining_bytes']} bytes)"),
        ("period", f"{_when(view['current_period_started_at'])} .. {_when(view['current_period_ends_at'])}"),
        ("billing anchor", _when(view["billing_anchor"])),
        ("exhausted", exhausted),
        ("last report", _when(view["last_report_at"])),
    ]
    for key, value in rows:
        print(f"{key + ':':<16}{value}")


def _print_list(views: list[dict], fmt: str) -> None:
    if fmt == "json":
        print_json(views)
        return
    table([[v["user_id"], v["client_name"], human_bytes(v["monthly_bytes"]),
            f"{human_bytes(v['current_period_bytes_used'])} ({_pct(v)})", human_bytes(v["budget_remaining_bytes"]),
            "EXHAUSTED" if v["exhausted"] else "-", _when(v["current_period_ends_at"])] for v in views],
          ["USER", "CLIENT", "MONTHLY", "USED", "REMAINING", "STATE", "PERIOD_ENDS"])


# ---------------------------------------------------------------- commands

def cmd_quota_set(args) -> int:
    body = {"monthly_bytes": parse_bytes(args.monthly, "--monthly")}
    if args.anchor is not None:
        body["billing_anchor"] = parse_time(args.anchor, "--anchor", code="invalid_billing_anchor")
    status, view = operator_api(args).call("PUT", _quota_path(args), body)
    if args.format == "text":
        print("created" if status == 201 else "updated", f"quota of {view['user_id']} on {view['client_name']}")
    _print_view(view, args.format)
    return 0


def cmd_quota_get(args) -> int:
    _print_view(operator_api(args).get(_quota_path(args) + "/status"), args.format)
    return 0


def cmd_quota_clear(args) -> int:
    view = operator_api(args).call("PATCH", _quota_path(args), {"clear_period_usage": True})[1]
    if args.format == "text":
        print(f"cleared the period's usage of {view['user_id']} on {view['client_name']}")
    _print_view(view, args.format)
    return 0


def cmd_quota_delete(args) -> int:
    answer = operator_api(args).call("DELETE", _quota_path(args))[1]
    if args.format == "json":
        print_json(answer)
    else:
        q = answer["quota"]
        print(f"removed the quota of {q['user_id']} on {q['client_name']}: the pair forwards unmetered")
    return 0


def cmd_quota_list(args) -> int:
    if (args.user_id is None) == (args.client is None):
        raise PortunusError("usage", "quota list: give a USER or --client CLIENT (one of them)")
    path = (f"/v1/users/{quote(args.user_id)}/quotas" if args.user_id is not None
            else f"/v1/clients/{quote(args.client)}/quotas")
    _print_list(operator_api(args).get(path)["quotas"], args.format)
    return 0


def cmd_traffic(args) -> int:
    query = {}
    if args.from_ is not None:
        query["from"] = parse_time(args.from_, "--from", code="invalid_time_range")
    if args.to is not None:
        query["to"] = parse_time(args.to, "--to", code="invalid_time_range")
    if args.bucket is not None:
        query["bucket"] = args.bucket
    if args.user_id is not None:
        path = f"/v1/users/{quote(args.user_id)}/traffic"
        if args.client is not None:
            query["client_id"] = args.client
    elif args.client is not None:
        path = f"/v1/clients/{quote(args.client)}/traffic"
    else:
        path = "/v1/traffic/global"
    history = operator_api(args).get(path + ("?" + urlencode(query) if query else ""))
    if args.format == "json":
        print_json(history)
        return 0
    table([[_when(s["ts"]), human_bytes(s["bytes_in"]), human_bytes(s["bytes_out"])] for s in history["samples"]],
          [f"TIME ({history['bucket']})", "IN", "OUT"])
    print(f"total: in {human_bytes(history['total_bytes_in'])} ({history['total_bytes_in']} bytes), "
          f"out {human_bytes(history['total_bytes_out'])} ({history['total_bytes_out']} bytes)")
    return 0
