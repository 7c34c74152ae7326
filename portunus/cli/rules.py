"""`portunus-server` rule commands: push-rule, remove-rule, list-rules, rule-stats (SPEC §7.1).

Online only: they call the running server's API with ``PORTUNUS_OPERATOR_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import PortunusError
from . import caps as caps_cli
from .api_client import operator_api, quote
from .output import human_bytes, listen_text, print_json, rule_caps, sni_ports, table, target_text

PUSH_RULE_CAPABILITIES = """\
[needs CAPABILITY]: the flag uses a feature the client must have (list-clients shows its
CAPABILITIES). A client without it is never sent the rule: the push fails with exit 3
(e.g. rate_limit_unsupported_by_client; for udp, unsupported_protocol) and nothing is stored."""


def add_parsers(sub) -> None:
    """Register the rule commands on portunus-server's subparsers."""
    s = sub.add_parser("push-rule", help="push a forwarding rule to a client; prints the rule id",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Push a forwarding rule to a client and wait for its ack; prints the rule id.\n"
                                   "The rule listens on all interfaces (0.0.0.0) unless --listen-host is given.",
                       epilog=PUSH_RULE_CAPABILITIES)
    s.add_argument("client", help="client id or unique name")
    s.add_argument("listen", help="listen port or range, e.g. 8080 or 30000-30099 [a range needs port_range]")
    s.add_argument("target", nargs="?", help="host:port or host:start-end")
    s.add_argument("--listen-host", metavar="ADDR",
                   help="bind only this address of the edge host, e.g. 127.0.0.1 or ::1 (default: all "
                        "interfaces, 0.0.0.0)")
    s.add_argument("--protocol", choices=("tcp", "udp"), default="tcp", help="default tcp [udp needs udp]")
    s.add_argument("--target", dest="targets", action="append", default=[], metavar="HOST:PORT@PRIO",
                   help="a failover target (repeatable) [more than one needs multi_target]")
    s.add_argument("--targets-json", metavar="JSON", help='e.g. [{"host":"a","port":80,"priority":1}] '
                                                          '[more than one needs multi_target, "proxy_protocol" '
                                                          'needs proxy_protocol]')
    s.add_argument("--sni", metavar="PATTERN", help="TLS SNI pattern (exact or *.domain) [needs sni]")
    s.add_argument("--prefer-ipv6", action="store_true")
    s.add_argument("--health-check-interval-secs", type=int, metavar="N")
    caps_cli.add_cap_flags(s, note=" [needs rate_limit]")
    s.add_argument("--ack-timeout", type=float, default=2.0, metavar="S",
                   help="how long to wait for the client's ack (default 2)")
    s.set_defaults(fn=cmd_push_rule)
    s = sub.add_parser("remove-rule", help="drain and remove a rule")
    s.add_argument("rule_id")
    s.set_defaults(fn=cmd_remove_rule)
    s = sub.add_parser("list-rules", help="list rules")
    s.add_argument("--client")
    s.add_argument("--format", choices=("text", "json"), default="text")
    s.set_defaults(fn=cmd_list_rules)
    s = sub.add_parser("rule-stats", help="a rule's latest counters")
    s.add_argument("rule_id")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--per-port", action="store_true")
    g.add_argument("--per-target", action="store_true")
    s.add_argument("--format", choices=("text", "json"), default="text")
    s.set_defaults(fn=cmd_rule_stats)


def _parse_target_flag(text: str, index: int) -> dict:
    from ..model import parse_target_spec
    t = parse_target_spec(text, index, f"--target {text!r}")
    out = {"host": t.host, "port": t.port, "priority": t.priority}
    if t.port_end is not None:
        out["port_end"] = t.port_end
    return out


def cmd_push_rule(args) -> int:
    body: dict = {"client": args.client, "listen": args.listen, "protocol": args.protocol}
    if args.listen_host:
        body["listen_host"] = args.listen_host
    given = sum(x is not None and x != [] for x in (args.target, args.targets, args.targets_json))
    if given != 1:
        raise PortunusError("usage", "give exactly one of TARGET, --target (repeatable) or --targets-json")
    if args.target:
        body["target"] = args.target
    elif args.targets:
        body["targets"] = [_parse_target_flag(t, i) for i, t in enumerate(args.targets)]
    else:
        try:
            body["targets"] = json.loads(args.targets_json)
        except ValueError as exc:
            raise PortunusError("usage", f"--targets-json is not valid JSON: {exc}") from None
        except RecursionError:
            raise PortunusError("usage", "--targets-json is nested too deeply; give a list of target "
                                         "objects, e.g. [{\"host\":\"a\",\"port\":80}]") from None
    if args.sni:
        body["sni_pattern"] = args.sni
    if args.prefer_ipv6:
        body["prefer_ipv6"] = True
    if args.health_check_interval_secs is not None:
        body["health_check_interval_secs"] = args.health_check_interval_secs
    caps = caps_cli.rate_limit_from_args(args)  # human units: --bandwidth-in-bps 10M
    if caps:
        body["rate_limit"] = caps
    body["ack_timeout_secs"] = args.ack_timeout
    try:
        status, res = operator_api(args).call("POST", "/v1/rules", body, timeout=args.ack_timeout + 30)
    except PortunusError as exc:
        rule_id = exc.fields.get("rule_id")
        if exc.code == "activation_failed" and rule_id:
            print(exc.cli_line(), file=sys.stderr)
            print(f"rule {rule_id} is kept as failed and blocks its ports; remove it with "
                  f"`portunus-server remove-rule {rule_id}`", file=sys.stderr)
            return exc.exit_code
        raise
    print(res["rule_id"])
    if status == 202:
        print(f"warning: the client did not acknowledge within {args.ack_timeout:g} s; the rule is pending",
              file=sys.stderr)
    return 0


def cmd_remove_rule(args) -> int:
    operator_api(args).call("DELETE", f"/v1/rules/{quote(args.rule_id)}")
    print(f"removed {args.rule_id}")
    return 0


def cmd_list_rules(args) -> int:
    path = "/v1/rules" + (f"?client={quote(args.client)}" if args.client else "")
    _, res = operator_api(args).call("GET", path)
    rules = res["rules"]
    if args.format == "json":
        print_json(rules)
        return 0
    rows, on_sni_ports = [], sni_ports(rules)
    for r in rules:
        listen = listen_text(r)
        state = r["state"] if not r.get("reason") else f"{r['state']}({r['reason']})"
        rows.append([r["rule_id"], r.get("client_name") or r["client_id"], r["protocol"], listen,
                     target_text(r), state, rule_caps(r, on_sni_ports), r.get("owner") or "-"])
    table(rows, ["RULE_ID", "CLIENT", "PROTO", "LISTEN", "TARGET", "STATE", "CAPS", "OWNER"])
    return 0


def cmd_rule_stats(args) -> int:
    q = "?per_port=true" if args.per_port else ("?per_target=true" if args.per_target else "")
    _, res = operator_api(args).call("GET", f"/v1/rules/{quote(args.rule_id)}/stats{q}")
    if args.format == "json":
        print_json(res)
        return 0
    name = res.get("client_name")
    if name is None:  # the stats shape carries the id only; the rule names its client
        name = operator_api(args).call("GET", f"/v1/rules/{quote(args.rule_id)}")[1].get("client_name")
    client = f"{name} ({res['client']})" if name else res["client"]
    print(f"rule {res['rule_id']} ({res['protocol']}, {res['state']}) on client {client}")
    print(f"  bytes in {human_bytes(res['bytes_in'])} ({res['bytes_in']}), "
          f"out {human_bytes(res['bytes_out'])} ({res['bytes_out']})")
    if res["protocol"] == "tcp":
        print(f"  active connections {res['active_connections']}, dns failures {res['dns_failures']}")
    else:
        print(f"  datagrams in {res['datagrams_in']}, out {res['datagrams_out']}, active flows "
              f"{res['active_flows']}, overflow drops {res['flows_dropped_overflow']}")
    print(f"  updated {res.get('updated_at') or 'never (no report yet)'}")
    for line in caps_cli.stats_lines(res):  # SNI routes and listener, rate-limit counters
        print(line)
    if args.per_port:
        rows = [[p["listen_port"], p["bytes_in"], p["bytes_out"], p["active_connections"],
                 p["datagrams_in"], p["datagrams_out"]] for p in res.get("per_port", [])]
        table(rows, ["PORT", "BYTES_IN", "BYTES_OUT", "CONNS", "DGRAMS_IN", "DGRAMS_OUT"])
    if args.per_target:
        rows = [[t["index"], f"{t['host']}:{t['port']}", t["priority"], t["health"], t["consecutive_failures"],
                 t["bytes_in"], t["bytes_out"], t["connections"]] for t in res.get("per_target", [])]
        table(rows, ["#", "TARGET", "PRIO", "HEALTH", "FAILS", "BYTES_IN", "BYTES_OUT", "CONNS"])
    return 0
