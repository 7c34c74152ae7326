"""`portunus-client`: its arguments (enroll, run, doctor); the wiring is `client/app.py` (SPEC §7.3)."""

from __future__ import annotations

import argparse
import os
import sys


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter with the terminal width found the way shutil.get_terminal_size finds it:
    argparse imports shutil (and with it zlib, bz2, lzma) for that alone, at every parser's first
    add_argument, which the client and `enroll` paid at each start for help they never print."""

    def __init__(self, prog, **kwargs):
        kwargs.setdefault("width", _terminal_columns() - 2)
        super().__init__(prog, **kwargs)


def _terminal_columns() -> int:
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="portunus-client", formatter_class=_Formatter,
        description="Edge agent: connects to a Portunus server over pinned TLS, receives rules and forwards "
                    "the ports. First run `portunus-client enroll '<uri>'` with the command the server printed.",
    )
    p.add_argument("--bundle", metavar="PATH",
                   help="client bundle (default: $PORTUNUS_CLIENT_BUNDLE, $XDG_CONFIG_HOME/portunus/"
                        "client.bundle.json, ~/.config/portunus/client.bundle.json, ./client.bundle.json)")
    p.add_argument("--reconnect-initial-delay-ms", type=_positive_int, default=500, metavar="MS",
                   help="first reconnect backoff ceiling (default 500)")
    p.add_argument("--reconnect-max-delay-secs", type=_positive_int, default=30, metavar="S",
                   help="reconnect backoff cap (default 30)")
    p.add_argument("--shutdown-drain-timeout-secs", type=_non_negative_int, default=30, metavar="S",
                   help="how long live connections may finish on SIGTERM (default 30)")
    p.add_argument("--stats-report-interval-secs", type=_positive_int, default=5, metavar="S",
                   help="stats report interval until the server says otherwise (default 5)")
    p.add_argument("--dns-server", action="append", default=[], metavar="IP[:PORT]",
                   help="DNS server for target names (repeatable; default: $PORTUNUS_DNS_SERVERS, "
                        "comma-separated, else /etc/resolv.conf)")
    p.add_argument("--log-format", choices=("json", "compact"), default="json")
    return p


def _enroll_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="portunus-client enroll", formatter_class=_Formatter,
                                description="Redeem a one-time enrollment URI and write the client bundle (0600).")
    p.add_argument("uri", help="portunus://HOST:PORT/enroll?pin=sha256:…&code=…")
    p.add_argument("--out", metavar="PATH", help="where to write the bundle (default: "
                                                 "$XDG_CONFIG_HOME/portunus/client.bundle.json)")
    return p


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return int(text)


def main(argv: list[str]) -> int:
    from ..log import log
    if argv and argv[0] == "doctor":
        from ..doctor.cli import client_main
        return client_main(argv[1:])
    if argv and argv[0] == "enroll":
        args = _enroll_parser().parse_args(argv[1:])
        from ..control.redeem import enroll
        from ..control.enrollment import default_bundle_path
        out = args.out or default_bundle_path()
        bundle = enroll(args.uri, out)
        print(f"enrolled as {bundle['client_name']} ({bundle['client_id']}); bundle written to {out}")
        print(f"start the agent with: portunus-client --bundle {out}")
        return 0
    args = _run_parser().parse_args(argv)
    log.configure(fmt="json" if args.log_format == "json" else "pretty")
    from ..client.app import AgentSettings, capabilities_from_env, dns_servers_from_env, run_agent
    from ..control.enrollment import find_bundle, read_bundle
    path = find_bundle(args.bundle)
    bundle = read_bundle(path)
    settings = AgentSettings(reconnect_initial_delay_ms=args.reconnect_initial_delay_ms,
                             reconnect_max_delay_secs=args.reconnect_max_delay_secs,
                             shutdown_drain_timeout_secs=args.shutdown_drain_timeout_secs,
                             stats_report_interval_secs=args.stats_report_interval_secs,
                             dns_servers=args.dns_server or dns_servers_from_env(),
                             capabilities=capabilities_from_env())
    return run_agent(bundle, path, settings)
