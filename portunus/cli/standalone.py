"""`portunus-standalone`: run the data plane from a TOML file (SPEC §7.4)."""

from __future__ import annotations

import argparse
import json

from ..errors import PortunusError

DEFAULT_CONFIG = "./portunus.toml"
DEFAULT_REFRESH_MS = 1000


def _main_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="portunus-standalone",
        description="Forward TCP/UDP ports from a local TOML file, with no server. "
                    "Subcommand: 'stats [--once]' shows live per-rule counters of a running instance.",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                   help=f"TOML config file (default: {DEFAULT_CONFIG})")
    p.add_argument("--check", action="store_true",
                   help="validate the config, print 'ok' and exit 0, or print the error and exit 2")
    p.add_argument("--log-level", choices=("debug", "info", "warn", "error"),
                   help="override [global] log_level")
    p.add_argument("--log-format", choices=("json", "compact", "pretty"), metavar="json|compact",
                   help="override [global] log_format (pretty is an alias of compact)")
    return p


def _stats_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="portunus-standalone stats",
                                description="Live dashboard of a running standalone instance (needs [stats] "
                                            "socket_path in its config): one row per rule with counters and "
                                            "live rates, totals, and per-port/per-target detail. Keys: up/down "
                                            "or j/k select, Enter opens/closes the detail, q quits.")
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                   help="the running instance's config, to find [stats] socket_path")
    p.add_argument("--socket", metavar="PATH", help="stats socket path (overrides the config)")
    p.add_argument("--once", action="store_true", help="print one JSON snapshot and exit (no terminal needed)")
    p.add_argument("--refresh-ms", type=_refresh_ms, metavar="MS",
                   help=f"redraw interval of the live view (default: [stats] refresh_ms, else {DEFAULT_REFRESH_MS})")
    return p


def _refresh_ms(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 100 <= int(text) <= 60000:
        raise argparse.ArgumentTypeError(f"must be an integer 100..60000, got {text!r}")
    return int(text)


def main(argv: list[str]) -> int:
    from ..standalone import config as cfgmod

    if argv and argv[0] == "stats":
        return _stats(_stats_parser().parse_args(argv[1:]))
    args = _main_parser().parse_args(argv)
    cfg = cfgmod.load(args.config)
    overrides = {}
    if args.log_level:
        overrides["log_level"] = args.log_level
    if args.log_format:
        overrides["log_format"] = cfgmod.log_format_name(args.log_format)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    if args.check:
        print("ok")
        return 0
    from ..standalone.app import run
    return run(cfg, overrides)


def _stats(args) -> int:
    from ..standalone import config as cfgmod
    from ..standalone.tui import fetch_snapshot, run_dashboard
    refresh_ms = args.refresh_ms
    path = args.socket
    if path is None:
        cfg = cfgmod.load(args.config)
        if not cfg.stats_socket_path:
            raise PortunusError("config_invalid", f"{args.config}: no [stats] socket_path; pass --socket PATH")
        path = cfg.stats_socket_path
        refresh_ms = refresh_ms or cfg.stats_refresh_ms
    if args.once:
        print(json.dumps(fetch_snapshot(path), indent=2))
        return 0
    return run_dashboard(path, refresh_ms or DEFAULT_REFRESH_MS)
