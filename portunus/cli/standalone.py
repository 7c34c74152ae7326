"""`portunus-standalone`: run the data plane from a TOML file (SPEC §7.4)."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from ..errors import PortunusError

DEFAULT_CONFIG = "./portunus.toml"


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
                                description="Show live per-rule counters from a running standalone instance "
                                            "(needs [stats] socket_path in its config).")
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                   help="the running instance's config, to find [stats] socket_path")
    p.add_argument("--socket", metavar="PATH", help="stats socket path (overrides the config)")
    p.add_argument("--once", action="store_true", help="print one JSON snapshot and exit")
    return p


def main(argv: list[str]) -> int:
    from ..standalone import config as cfgmod

    if argv and argv[0] == "stats":
        return _stats(_stats_parser().parse_args(argv[1:]))
    args = _main_parser().parse_args(argv)
    cfg = cfgmod.load(args.config)
    if args.log_level:
        cfg.log_level = args.log_level
    if args.log_format:
        cfg.log_format = cfgmod.log_format_name(args.log_format)
    if args.check:
        print("ok")
        return 0
    from ..standalone.app import run
    return run(cfg)


def _fetch(path: str) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(path)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    except OSError as exc:
        raise PortunusError("io_error", f"cannot read stats socket {path}: {exc.strerror or exc} "
                                        "(is portunus-standalone running with [stats] socket_path?)") from None
    finally:
        s.close()
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise PortunusError("io_error", f"stats socket {path} answered with something that is not JSON") from None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _stats(args) -> int:
    from ..standalone import config as cfgmod
    refresh = 1.0
    path = args.socket
    if path is None:
        cfg = cfgmod.load(args.config)
        if not cfg.stats_socket_path:
            raise PortunusError("config_invalid", f"{args.config}: no [stats] socket_path; pass --socket PATH")
        path = cfg.stats_socket_path
        refresh = cfg.stats_refresh_ms / 1000
    if args.once:
        print(json.dumps(_fetch(path), indent=2))
        return 0
    prev: dict = {}
    prev_t = time.monotonic()
    try:
        while True:
            snap = _fetch(path)
            now = time.monotonic()
            dt = max(now - prev_t, 1e-6)
            lines = [f"portunus-standalone — {snap.get('label', '')}   (Ctrl-C to quit)", "",
                     f"{'RULE':<20} {'PROTO':<5} {'STATE':<8} {'IN':>10} {'OUT':>10} {'IN/s':>10} {'OUT/s':>10} "
                     f"{'CONNS':>6} {'FLOWS':>6} {'DROPS':>6}"]
            for r in snap.get("rules", []):
                p = prev.get(r["rule_id"], r)
                lines.append(
                    f"{r['rule_id'][:20]:<20} {r['protocol']:<5} {r['state']:<8} {_human(r['bytes_in']):>10} "
                    f"{_human(r['bytes_out']):>10} {_human((r['bytes_in'] - p['bytes_in']) / dt):>10} "
                    f"{_human((r['bytes_out'] - p['bytes_out']) / dt):>10} {r['active_connections']:>6} "
                    f"{r['active_flows']:>6} {r['flows_dropped_overflow']:>6}")
            prev = {r["rule_id"]: r for r in snap.get("rules", [])}
            prev_t = now
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
            time.sleep(refresh)
    except KeyboardInterrupt:
        return 0
