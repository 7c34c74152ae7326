"""argparse registration of `doctor` for both roles, and the shared output step."""

from __future__ import annotations

import argparse
import os
import sys

from . import report as r

DESCRIPTION = ("Run the troubleshooting guide's checks on this host: each prints ✓ / ⚠ / ✗, the values found "
               "and the fix. Read-only; sends no secret to an unproven server; exit 0 unless something is ✗.")


def _add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="json: a list of {id, status, summary, details, fix}")


def _quiet_logs() -> None:
    # findings are the output; the modules' own log lines (e.g. bundle.permissions_loose) would repeat them
    from ..log import log
    log.level = 100


def emit(checks: list[r.Check], fmt: str, title: str, stream=None) -> int:
    stream = stream or sys.stdout
    if fmt == "json":
        stream.write(r.render_json(checks) + "\n")
    else:
        stream.write(r.render_text(checks, colour=r.use_colour(stream, os.environ), title=title))
    stream.flush()
    return r.exit_code(checks)


# ------------------------------------------------------------------ server

def add_server_parser(subparsers) -> argparse.ArgumentParser:
    """`portunus-server [--data-dir DIR] [--server URL] doctor [--format text|json]`."""
    p = subparsers.add_parser("doctor", help="check this host, the data dir, the certificate and the running server",
                              description=DESCRIPTION)
    _add_format(p)
    p.set_defaults(fn=cmd_server_doctor)
    return p


def cmd_server_doctor(args) -> int:
    from .server import run_checks
    _quiet_logs()
    checks = run_checks(args)
    return emit(checks, args.format, f"portunus-server doctor: {args.data_dir}")


# ------------------------------------------------------------------ client

def _client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", metavar="PATH", help="client bundle (default: the agent's lookup chain)")
    p.add_argument("--dns-server", action="append", default=[], metavar="IP[:PORT]",
                   help="DNS server the agent is started with (repeatable; default: $PORTUNUS_DNS_SERVERS, "
                        "else /etc/resolv.conf)")
    _add_format(p)


def add_client_parser(subparsers) -> argparse.ArgumentParser:
    """For a client CLI built on subparsers; `client_main` serves the current argv-dispatching one."""
    p = subparsers.add_parser("doctor", help="check the bundle, the server, this host's limits, splice, ports, DNS",
                              description=DESCRIPTION)
    _client_arguments(p)
    p.set_defaults(fn=cmd_client_doctor)
    return p


def cmd_client_doctor(args) -> int:
    from .client import run_checks
    _quiet_logs()
    checks = run_checks(args.bundle, args.dns_server)
    return emit(checks, args.format, "portunus-client doctor")


def client_main(argv: list[str]) -> int:
    """`portunus-client doctor [--bundle PATH] [--dns-server IP] [--format text|json]`."""
    p = argparse.ArgumentParser(prog="portunus-client doctor", description=DESCRIPTION)
    _client_arguments(p)
    return cmd_client_doctor(p.parse_args(argv))
