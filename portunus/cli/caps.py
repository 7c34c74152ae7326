"""`portunus-server owner-cap …` and the rate-limit cap flags of `push-rule` (SPEC §2.9, §7.1; issue 13).

Online only, like the other rule commands: the caps must reach the client at once.

    portunus-server owner-cap set edge-tokyo alice --bandwidth-in-bps 10M --concurrent-connections 100
    portunus-server owner-cap get edge-tokyo alice [--format json]
    portunus-server owner-cap list edge-tokyo [--format json]
    portunus-server owner-cap delete edge-tokyo alice

The cap flags take human units (``cli/units.py``): bandwidth caps and bursts are bytes per second
(``10M``, ``512KiB``, ``100Mbit``), connection caps are counts (``100``, ``2K``). ``set`` without
a cap is ``validation.rate_limit_no_caps_provided`` (exit 3) before anything is sent; the one
validator (``model.RateLimit``, on the server) answers for zeros and bursts.
"""

from __future__ import annotations

from ..errors import PortunusError
from .api_client import operator_api, quote
from .output import print_json, table
from .units import caps_from_flags, caps_text

FORMATS = ("text", "json")
CAP_FLAGS = (
    ("bandwidth_in_bps", "SIZE", "inbound bytes/s (towards the target), e.g. 10M, 512KiB, 100Mbit"),
    ("bandwidth_out_bps", "SIZE", "outbound bytes/s (back to the peer)"),
    ("new_connections_per_sec", "N", "new TCP connections / UDP flows per second"),
    ("concurrent_connections", "N", "live connections and flows at once"),
    ("bandwidth_in_burst", "SIZE", "inbound burst in bytes (default one second of rate)"),
    ("bandwidth_out_burst", "SIZE", "outbound burst in bytes (default one second of rate)"),
    ("new_connections_burst", "N", "connection burst (default one second of rate)"),
)


def add_cap_flags(parser, *, note: str = "") -> None:
    """The seven ``--bandwidth-in-bps …`` flags; values are parsed by ``rate_limit_from_args``."""
    for name, metavar, help_text in CAP_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, metavar=metavar, help=help_text + note)


def rate_limit_from_args(args) -> dict:
    """The ``rate_limit`` body of the cap flags given (``{}`` when none was)."""
    return caps_from_flags({name: getattr(args, name, None) for name, _, _ in CAP_FLAGS})


def add_parsers(sub) -> None:
    """Register `owner-cap` on portunus-server's subparsers."""
    p = sub.add_parser("owner-cap", help="rate-limit envelope per (client, owner): set, get, list, delete "
                                         "(superadmin)")
    actions = p.add_subparsers(dest="owner_cap_command", metavar="<action>")
    actions.required = True
    s = actions.add_parser("set", help="set or replace an owner's caps on a client (at least one cap)")
    _pair(s)
    add_cap_flags(s)
    s.set_defaults(fn=cmd_owner_cap_set)
    for name, help_text, fn in (("get", "show an owner's caps on a client", cmd_owner_cap_get),
                                ("delete", "remove an owner's caps on a client", cmd_owner_cap_delete)):
        s = actions.add_parser(name, help=help_text)
        _pair(s)
        s.set_defaults(fn=fn)
    s = actions.add_parser("list", help="the rule owners on a client, with their caps")
    s.add_argument("client", metavar="CLIENT", help="client id or name")
    s.add_argument("--format", choices=FORMATS, default="text")
    s.set_defaults(fn=cmd_owner_cap_list)


def _pair(parser) -> None:
    parser.add_argument("client", metavar="CLIENT", help="client id or name")
    parser.add_argument("owner", metavar="OWNER", help="the user id owning rules on the client")
    parser.add_argument("--format", choices=FORMATS, default="text")


def _cap_path(client: str, owner: str) -> str:
    return f"/v1/clients/{quote(client)}/owners/{quote(owner)}/rate-limit"


def _print_cap(view: dict, fmt: str) -> None:
    if fmt == "json":
        print_json(view)
        return
    print(f"{view['owner_id']} on {view['client_id']}: {caps_text(view['rate_limit'])}")
    for key, value in sorted((view["rate_limit"] or {}).items()):
        print(f"  {key} = {value}")


def cmd_owner_cap_set(args) -> int:
    caps = rate_limit_from_args(args)
    if not caps:
        raise PortunusError("validation.rate_limit_no_caps_provided",
                            "owner-cap set needs at least one cap flag, e.g. --bandwidth-in-bps 10M; "
                            "use `owner-cap delete` to remove the caps")
    _print_cap(operator_api(args).call("PUT", _cap_path(args.client, args.owner), {"rate_limit": caps})[1], args.format)
    return 0


def cmd_owner_cap_get(args) -> int:
    _print_cap(operator_api(args).call("GET", _cap_path(args.client, args.owner))[1], args.format)
    return 0


def cmd_owner_cap_delete(args) -> int:
    answer = operator_api(args).call("DELETE", _cap_path(args.client, args.owner))[1]
    if args.format == "json":
        print_json(answer)
    else:
        print(f"removed the caps of {args.owner} on {args.client}")
    return 0


def cmd_owner_cap_list(args) -> int:
    api = operator_api(args)
    owners = api.call("GET", f"/v1/clients/{quote(args.client)}/owners")[1]["owners"]
    if args.format == "json":
        print_json(owners)
        return 0
    rows = []
    for o in owners:
        caps = api.call("GET", _cap_path(args.client, o["owner_id"]))[1]["rate_limit"] \
            if o["has_rate_limit"] else None
        rows.append([o["owner_id"], o["rule_count"], caps_text(caps)])
    table(rows, ["OWNER", "RULES", "CAPS"])
    return 0


def stats_lines(stats: dict) -> list[str]:
    """The SNI and rate-limit lines of `rule-stats` text (present only when the client reported them)."""
    out = []
    if "sni_routes" in stats:
        routes = stats["sni_routes"]
        out.append(f"  sni {stats.get('sni_pattern') or 'fallback'}: routed exact {routes['exact']}, "
                   f"wildcard {routes['wildcard']}, fallback {routes['fallback']}")
    listener = stats.get("sni_listener")
    if listener:
        out.append(f"  sni listener port {listener['listen_port']} ({listener['mode']}, "
                   f"{listener['routes_active']} patterns, fallback {'yes' if listener['fallback'] else 'no'}): "
                   f"misses {listener['misses']}, parse failures {listener['parse_failures']}, "
                   f"hello timeouts {listener['hello_timeouts']}, resets {listener['reads_reset']}, "
                   f"hellos in flight {listener['hellos_in_flight']}")
    limiter = stats.get("rate_limit_stats")
    if limiter:
        rejects = " ".join(f"{k}={v}" for k, v in sorted(limiter["rejects"].items()) if v) or "none"
        out.append(f"  rate limit: active {limiter['active']}, rejects {rejects}, throttled in "
                   f"{limiter['throttle_seconds']['in']:g} s out {limiter['throttle_seconds']['out']:g} s, "
                   f"udp drops in {limiter['bandwidth_dropped_in']} out {limiter['bandwidth_dropped_out']}")
    return out
