"""`portunus-server`: serve, and the operator CLI (SPEC §7.1).

Online commands call the HTTP API with PORTUNUS_OPERATOR_TOKEN; the URL comes
from --server, PORTUNUS_SERVER, or the running server's data dir. Offline
commands open the store directly and refuse while `serve` runs.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from ..errors import PortunusError
from .api_client import operator_api, operator_api_url, quote


# output.py (and decimal, through units.py) only for the commands that print tables: not at serve's start
def print_json(obj) -> None:
    from .output import print_json as _print_json
    _print_json(obj)


def table(*args, **kwargs) -> None:
    from .output import table as _table
    _table(*args, **kwargs)


# ---------------------------------------------------------------- commands

def cmd_serve(args) -> int:
    from ..server.app import serve
    return serve(args.data_dir, advertised_endpoint=args.advertised_endpoint)


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(keep=args.keep)


def cmd_gen_token(args) -> int:
    print(secrets.token_urlsafe(32))
    return 0


def _store_backup():
    """store.backup (and with it sqlite3), imported by the commands that open the store, not by --help."""
    from ..store import backup
    return backup


def _open_store(args):
    return _store_backup().open_offline(args.data_dir)


def cmd_bootstrap_superadmin(args) -> int:
    from ..store import operators
    store = _open_store(args)
    try:
        token = operators.bootstrap_superadmin(store, args.name)
    finally:
        store.close()
    print(token)
    print("This bearer token is shown once. Use it as PORTUNUS_OPERATOR_TOKEN.", file=sys.stderr)
    return 0


def cmd_enroll_client(args) -> int:
    if operator_api_url(args) is not None:
        body = {"name": args.name}
        if args.address:
            body["address"] = args.address
        if args.ttl_secs is not None:
            body["ttl_secs"] = args.ttl_secs
        _, res = operator_api(args).call("POST", "/v1/client-enrollments", body)
    else:
        res = _offline_enroll(args)
    return _print_enrollment(args, res)


def _offline_enroll(args) -> dict:
    from ..control.enrollment import seed_san_hosts
    from ..control.tls import ensure_server_cert
    from ..server import config as server_config
    from ..server.control_hub import OfflineHub
    from ..server.core import ServerCore, validate_seed_endpoint
    cfg = server_config.load(args.data_dir)
    store = _open_store(args)
    try:
        seed = os.environ.get("PORTUNUS_ADVERTISED_ENDPOINT")
        cert = ensure_server_cert(cfg.cert_path, cfg.key_path, extra_hosts=seed_san_hosts(seed))
        if seed:
            seed = validate_seed_endpoint(seed, cert)
        elif cfg.control_addr[1] == 0:
            # checked before the client row is created: a refused enrollment leaves nothing behind
            raise PortunusError("failed_precondition",
                                "control_listen has port 0 (picked when serve starts), so an offline enrollment "
                                "cannot name the control port; run enroll-client while serve runs, or set a fixed "
                                "control_listen port or PORTUNUS_ADVERTISED_ENDPOINT")
        core = ServerCore(cfg, store, OfflineHub(), cert, advertised_seed=seed)
        return core.enroll_client(args.name, address=args.address, ttl_secs=args.ttl_secs)
    finally:
        store.close()


def _print_enrollment(args, res: dict) -> int:
    if getattr(args, "format", "text") == "json":
        print_json(res)
        return 0
    client = res["client"]
    print(f"client {client['client_name']} ({client['client_id']})", file=sys.stderr)
    print(f"one-time code expires at {res['expires_at']}; run this on the edge host:", file=sys.stderr)
    print(res["command"])
    return 0


def cmd_reenroll_client(args) -> int:
    body = {} if args.ttl_secs is None else {"ttl_secs": args.ttl_secs}
    _, res = operator_api(args).call("POST", f"/v1/clients/{quote(args.client)}/enrollment", body)
    return _print_enrollment(args, res)


def cmd_list_clients(args) -> int:
    _, res = operator_api(args).call("GET", "/v1/clients")
    clients = res["clients"]
    if args.format == "json":
        print_json(clients)
        return 0
    rows = [[c["client_id"], c["client_name"], "revoked" if c["revoked"] else ("yes" if c["connected"] else "no"),
             c.get("remote_addr") or "-", c.get("client_version") or "-", ",".join(c.get("capabilities") or []) or "-"]
            for c in clients]
    table(rows, ["CLIENT_ID", "NAME", "CONNECTED", "REMOTE", "VERSION", "CAPABILITIES"])
    return 0


def cmd_revoke(args) -> int:
    _, res = operator_api(args).call("POST", f"/v1/clients/{quote(args.client)}/revoke")
    print(f"revoked {res['client_name']} ({res['client_id']})")
    return 0


def cmd_delete_client(args) -> int:
    operator_api(args).call("DELETE", f"/v1/clients/{quote(args.client)}")
    print(f"deleted {args.client} and its rules")
    return 0


def cmd_rename_client(args) -> int:
    _, res = operator_api(args).call("PATCH", f"/v1/clients/{quote(args.client)}/name", {"name": args.name})
    print(f"renamed {res['client_id']} to {res['client_name']}")
    return 0


# ---- certificate ---------------------------------------------------------------

def cmd_rotate_cert(args) -> int:
    from ..control.enrollment import parse_advertised_endpoint
    from ..control.tls import PREVIOUS_SUFFIX, rotate_self_signed_cert, validate_san_host
    from ..server import config as server_config
    from ..store import clients as store_clients
    cfg = server_config.load(args.data_dir)
    seed = args.advertised_endpoint or os.environ.get("PORTUNUS_ADVERTISED_ENDPOINT")
    hosts = [parse_advertised_endpoint(seed)[0]] if seed else []
    hosts += [validate_san_host(h) for h in args.san]
    store = _open_store(args)  # holds the store lock: refuses with store_in_use while serve runs
    try:
        info, old_fingerprint = rotate_self_signed_cert(cfg.cert_path, cfg.key_path, extra_hosts=hosts)
        to_reenroll = [c for c in store_clients.list_clients(store) if not c["revoked"]]
    finally:
        store.close()
    print(f"new self-signed certificate {info.cert_path} (key {info.key_path}, mode 0600)")
    print(f"  fingerprint  sha256:{info.fingerprint}")
    print(f"  SAN          {', '.join(info.sans_dns + info.sans_ip)}")
    if old_fingerprint:
        print(f"  replaces     sha256:{old_fingerprint} (kept as {os.path.basename(info.cert_path)}{PREVIOUS_SUFFIX}"
              f" and {os.path.basename(info.key_path)}{PREVIOUS_SUFFIX})")
    print("\nEvery enrolled client pins the old certificate and can no longer connect: re-enroll each one\n"
          "(start serve, run `portunus-server reenroll-client REF`, then the printed command on its host).")
    if to_reenroll:
        print("Clients to re-enroll: " + ", ".join(f"{c['client_name']} ({c['client_id']})" for c in to_reenroll))
    return 0


# ---- storage -----------------------------------------------------------------

def cmd_backup(args) -> int:
    print(_store_backup().backup(args.data_dir, args.out))
    return 0


def cmd_restore(args) -> int:
    db_path = _store_backup().restore(args.data_dir, args.input, force=args.force)
    print(f"restored {args.input} into {db_path}")
    return 0


def cmd_audit_prune(args) -> int:
    import sqlite3
    from ..store import audit as store_audit
    store_backup = _store_backup()
    try:
        store = _open_store(args)  # deleting is offline: refuses with store_in_use while serve runs
    except PortunusError as exc:
        if exc.code != "store_in_use" or not args.dry_run:
            raise
        store = store_backup.ReadOnlyStore(args.data_dir)  # a dry run only counts
    try:
        n = store_audit.prune(store, args.before, dry_run=args.dry_run)
    except sqlite3.Error as exc:
        raise PortunusError("io_error", f"cannot read the audit trail in {args.data_dir}: {exc}") from None
    finally:
        store.close()
    print(f"{'would delete' if args.dry_run else 'deleted'} {n} audit row(s) older than {args.before}")
    return 0


def cmd_reset(args) -> int:
    store_backup = _store_backup()
    files = store_backup.database_files(args.data_dir)
    if not files:
        print(f"nothing to reset: {os.path.join(args.data_dir, store_backup.DB_NAME)} does not exist")
        return 0
    if not args.confirm:
        print("dry run; would remove:")
        for p in files:
            print(f"  {p}")
        print("pass --confirm to remove them (certificates and server.toml are kept)")
        return 0
    print("removed: " + ", ".join(store_backup.reset(args.data_dir)))
    return 0


# ---------------------------------------------------------------- parser

GLOBAL_OPTIONS = ("--data-dir", "--server")  # each takes a value


def build_parser(only_serve: bool = False) -> argparse.ArgumentParser:
    """The whole command tree; ``only_serve``: the global options and ``serve`` alone (what
    ``serve`` parses with: the other ~50 subcommands and their modules cost ~25 ms at every start)."""
    from ..server.config import default_data_dir
    p = argparse.ArgumentParser(prog="portunus-server",
                                description="Portunus control plane: serve, and operate clients and rules.")
    p.add_argument(GLOBAL_OPTIONS[0], metavar="DIR",
                   help=f"state directory (default: $PORTUNUS_DATA_DIR, else {default_data_dir()})")
    p.add_argument(GLOBAL_OPTIONS[1], metavar="URL", help="operator API URL (default: $PORTUNUS_SERVER or the "
                                                          "running server of --data-dir)")
    sub = p.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    _add_serve_command(sub)
    if only_serve:
        return p
    from . import caps as caps_cli
    from . import identity as identity_cli
    from . import quota as quota_cli
    from . import rules as rules_cli
    _add_server_commands(sub)
    _add_client_commands(sub)
    rules_cli.add_parsers(sub)
    _add_storage_commands(sub)
    from ..doctor.cli import add_server_parser
    add_server_parser(sub)
    identity_cli.add_parsers(sub)
    quota_cli.add_parsers(sub)
    caps_cli.add_parsers(sub)
    return p


def _add_serve_command(sub) -> None:
    s = sub.add_parser("serve", help="run the server")
    s.add_argument("--advertised-endpoint", metavar="HOST:PORT",
                   help="host:port written into enrollment commands (or PORTUNUS_ADVERTISED_ENDPOINT)")
    s.set_defaults(fn=cmd_serve)


def is_serve(argv: list[str]) -> bool:
    """Whether ``argv`` names ``serve`` after nothing but the global options (``--data-dir DIR``,
    ``--server=URL``): then the serve-only parser parses it exactly as the whole tree would. Anything
    else (help, an abbreviation, another command) takes the whole tree."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "serve":
            return True
        if arg in GLOBAL_OPTIONS:
            i += 2
        elif arg.split("=", 1)[0] in GLOBAL_OPTIONS and "=" in arg:
            i += 1
        else:
            return False
    return False


def _add_server_commands(sub) -> None:
    s = sub.add_parser("rotate-cert", help="replace the self-signed control certificate (server stopped); "
                                           "every client must then be re-enrolled")
    s.add_argument("--san", action="append", default=[], metavar="HOST",
                   help="another DNS name or IP for the certificate (repeatable); the hostname, localhost, "
                        "127.0.0.1 and the advertised endpoint's host are always in it")
    s.add_argument("--advertised-endpoint", metavar="HOST:PORT",
                   help="the endpoint serve will advertise (default: $PORTUNUS_ADVERTISED_ENDPOINT)")
    s.set_defaults(fn=cmd_rotate_cert)
    sub.add_parser("gen-token", help="print a fresh 43-char random token").set_defaults(fn=cmd_gen_token)
    s = sub.add_parser("demo", help="run server, client and a sample rule on loopback until Ctrl-C")
    s.add_argument("--keep", action="store_true", help="keep the temporary data dir afterwards")
    s.set_defaults(fn=cmd_demo)
    s = sub.add_parser("bootstrap-superadmin", help="create the superadmin bearer token (offline, once)")
    s.add_argument("--name", required=True, help="display name")
    s.set_defaults(fn=cmd_bootstrap_superadmin)


def _add_client_commands(sub) -> None:
    s = sub.add_parser("enroll-client", help="create a client and print its one-time enroll command")
    s.add_argument("name")
    s.add_argument("--address", help="the edge host's address (informational)")
    s.add_argument("--ttl-secs", type=int, help="code lifetime (default 600, max 86400)")
    s.add_argument("--format", choices=("text", "json"), default="text")
    s.set_defaults(fn=cmd_enroll_client)
    s = sub.add_parser("reenroll-client",
                       help="new one-time code for an existing client (keeps id and rules; lifts a revocation)")
    s.add_argument("client", help="client id or unique name")
    s.add_argument("--ttl-secs", type=int)
    s.add_argument("--format", choices=("text", "json"), default="text")
    s.set_defaults(fn=cmd_reenroll_client)
    s = sub.add_parser("list-clients", help="list clients")
    s.add_argument("--format", choices=("text", "json"), default="text")
    s.set_defaults(fn=cmd_list_clients)
    s = sub.add_parser("revoke", help="revoke a client's token and disconnect it now")
    s.add_argument("client")
    s.set_defaults(fn=cmd_revoke)
    s = sub.add_parser("delete-client", help="delete a revoked client and its rules")
    s.add_argument("client")
    s.set_defaults(fn=cmd_delete_client)
    s = sub.add_parser("rename-client", help="rename a client (keeps id and session)")
    s.add_argument("client")
    s.add_argument("--name", required=True)
    s.set_defaults(fn=cmd_rename_client)


def _add_storage_commands(sub) -> None:
    s = sub.add_parser("backup", help="online backup of the state database")
    s.add_argument("--out", required=True, metavar="PATH", help="file (not overwritten) or directory")
    s.set_defaults(fn=cmd_backup)
    s = sub.add_parser("restore", help="restore a backup into the data dir (server stopped)")
    s.add_argument("--in", dest="input", required=True, metavar="PATH")
    s.add_argument("--force", action="store_true", help="replace an existing database")
    s.set_defaults(fn=cmd_restore)
    s = sub.add_parser("audit", help="audit trail maintenance (offline)")
    audit_sub = s.add_subparsers(dest="audit_command", metavar="<action>")
    audit_sub.required = True
    a = audit_sub.add_parser("prune", help="delete audit rows older than a time (server stopped)")
    a.add_argument("--before", required=True, metavar="RFC3339", help="e.g. 2026-01-01T00:00:00Z")
    a.add_argument("--dry-run", action="store_true",
                   help="only count what would be deleted (works while the server runs)")
    a.set_defaults(fn=cmd_audit_prune)
    s = sub.add_parser("reset", help="delete the state database (dry run without --confirm)")
    s.add_argument("--confirm", action="store_true")
    s.set_defaults(fn=cmd_reset)


# these create the data dir when it is missing (or never use it); the others need it to exist
CREATES_DATA_DIR = {"serve", "bootstrap-superadmin", "restore", "demo", "gen-token", "onboarding-token"}
# these open the store itself, so --server does not stand in for the data dir
OFFLINE_COMMANDS = {"backup", "audit", "reset", "rotate-cert", "onboarding-token", "reset-password"}


def resolve_data_dir(args) -> None:
    """--data-dir, else $PORTUNUS_DATA_DIR, else the default; a named dir that does not exist is an error."""
    from ..server.config import default_data_dir
    flag = args.data_dir
    named = flag or os.environ.get("PORTUNUS_DATA_DIR")
    args.data_dir = named or default_data_dir()
    url_given = bool(args.server or os.environ.get("PORTUNUS_SERVER")) and args.command not in OFFLINE_COMMANDS
    if named and args.command not in CREATES_DATA_DIR and not url_given and not os.path.isdir(named):
        source = "--data-dir" if flag else "$PORTUNUS_DATA_DIR"
        raise PortunusError("io_error", f"data dir {named} ({source}) does not exist; check the path, or run "
                                        f"`portunus-server --data-dir {named} serve` once to create it",
                            data_dir=named)


def main(argv: list[str]) -> int:
    parser = build_parser(only_serve=is_serve(argv))
    args = parser.parse_args(argv)
    resolve_data_dir(args)
    return args.fn(args)
