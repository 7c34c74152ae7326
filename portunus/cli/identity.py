"""`portunus-server` users, grants and recovery commands (SPEC §5, §7.1).

Offline only (they open the store, so they refuse with ``store_in_use`` while serve runs):
``onboarding-token`` and ``reset-password`` (the 3 a.m. recovery path needs no working login;
``reset-password --online`` asks the running server instead, as a superadmin bearer).

Users and grants go through the running server's API (``PORTUNUS_OPERATOR_TOKEN``) when one
is found, else straight to the store. Offline, removing a user or revoking a grant commits
the identity change first, then deletes the dependent rules; their clients drop them at the
next connect (the server replays only the rules it still has).

Secrets (passwords, setup tokens) are read from stdin or printed once to stdout, never put
on a command line or into an error message.
"""

from __future__ import annotations

import sys

from ..errors import PortunusError
from .api_client import operator_api, operator_api_url, quote
from .output import print_json, table

FORMATS = ("text", "json")


def add_parsers(sub) -> None:
    """Register the identity commands on portunus-server's subparsers."""
    s = sub.add_parser("onboarding-token", help="print a fresh onboarding setup token (offline, server stopped)")
    s.set_defaults(fn=cmd_onboarding_token)

    s = sub.add_parser("reset-password", help="reset a user's password (offline, server stopped)")
    s.add_argument("user_id", metavar="USER")
    how = s.add_mutually_exclusive_group(required=True)
    how.add_argument("--temporary", action="store_true", help="generate a temporary password and print it once")
    how.add_argument("--password-stdin", action="store_true", help="read the new password from stdin")
    s.add_argument("--keep-api-tokens", action="store_true", help="do not revoke the user's API bearer tokens")
    s.add_argument("--online", action="store_true",
                   help="reset through the running server instead (POST /v1/users/ID/password with "
                        "PORTUNUS_OPERATOR_TOKEN; API tokens are kept)")
    s.add_argument("--format", choices=FORMATS, default="text")
    s.set_defaults(fn=cmd_reset_password)

    s = sub.add_parser("user-add", help="create a user (password read from stdin)")
    s.add_argument("user_id", metavar="ID")
    s.add_argument("--display-name", required=True, metavar="N")
    s.add_argument("--role", choices=("superadmin", "user"), default="user")
    s.add_argument("--password-stdin", action="store_true", required=True, help="read the password from stdin")
    s.add_argument("--format", choices=FORMATS, default="text")
    s.set_defaults(fn=cmd_user_add)
    s = sub.add_parser("user-list", help="list users")
    s.add_argument("--format", choices=FORMATS, default="text")
    s.set_defaults(fn=cmd_user_list)
    s = sub.add_parser("user-get", help="show one user")
    s.add_argument("user_id", metavar="ID")
    s.add_argument("--format", choices=FORMATS, default="text")
    s.set_defaults(fn=cmd_user_get)
    s = sub.add_parser("user-remove", help="remove a user, then the rules they own")
    s.add_argument("user_id", metavar="ID")
    s.add_argument("--format", choices=FORMATS, default="text")
    s.set_defaults(fn=cmd_user_remove)

    s = sub.add_parser("grant-add", help="let a user push to a client's port range; prints the grant id")
    s.add_argument("--user-id", required=True, metavar="U")
    s.add_argument("--client", required=True, metavar="C", help="client id, unique name, or * for every client")
    s.add_argument("--listen-port-start", required=True, type=int, metavar="A")
    s.add_argument("--listen-port-end", required=True, type=int, metavar="B")
    s.add_argument("--protocols", required=True, metavar="tcp,udp")
    s.add_argument("--note", metavar="TEXT")
    s.add_argument("--format", choices=FORMATS, default="text")
    s.set_defaults(fn=cmd_grant_add)
    s = sub.add_parser("grant-list", help="list grants")
    s.add_argument("--user-id", metavar="U", help="only this user's grants")
    s.add_argument("--format", choices=FORMATS, default="text")
    s.set_defaults(fn=cmd_grant_list)
    s = sub.add_parser("grant-revoke", help="revoke a grant, then the rules it no longer covers")
    s.add_argument("grant_id", metavar="ID")
    s.add_argument("--format", choices=FORMATS, default="text")
    s.set_defaults(fn=cmd_grant_revoke)


# ---------------------------------------------------------------- plumbing

class _Offline:
    """The store and the identity service for one offline command; closes the store (and its lock)."""

    def __init__(self, args):
        from ..log import log
        from ..server.identity import IdentityService
        log.configure(level="warn")  # the command prints what happened; info events are for serve's log
        from ..store.backup import open_offline
        self.store = open_offline(args.data_dir)
        self.identity = IdentityService(self.store)

    def __enter__(self) -> "_Offline":
        return self

    def __exit__(self, *exc) -> None:
        self.store.close()


def _online(args):
    """The API client when a server is running (or named), else None."""
    return operator_api(args) if operator_api_url(args) is not None else None


def read_password_stdin() -> str:
    """One line from stdin (the trailing newline dropped); never echoed anywhere."""
    # bounded read: anything cut here is still far over the 1024-byte limit, so it is refused, not shortened
    text = sys.stdin.read(4 * 1024 + 2) if sys.stdin is not None else ""
    if text.endswith("\n"):
        text = text[:-1]
    if text.endswith("\r"):
        text = text[:-1]
    if not text:
        raise PortunusError("usage", "--password-stdin: no password on stdin")
    if "\n" in text:
        raise PortunusError("usage", "--password-stdin: give the password as one line")
    return text


def _print_as(args, value, text) -> int:
    """``--format json`` prints the value as it is; text prints it with ``text(value)``."""
    if args.format == "json":
        print_json(value)
    else:
        text(value)
    return 0


def _user_rows(users: list[dict]) -> None:
    rows = [[u["user_id"], u["display_name"], u["role"], "yes" if u["disabled"] else "no",
             "yes" if u["password_change_required"] else "no", u["created_at"]] for u in users]
    table(rows, ["USER_ID", "DISPLAY_NAME", "ROLE", "DISABLED", "CHANGE_REQUIRED", "CREATED_AT"])


def _user_fields(user: dict) -> None:
    for key in ("user_id", "display_name", "role", "disabled", "password_change_required", "created_at"):
        print(f"{key}: {user[key]}")


def _grant_rows(grants: list[dict]) -> None:
    rows = [[g["grant_id"], g["user_id"], g["client"], f"{g['listen_port_start']}-{g['listen_port_end']}",
             ",".join(g["protocols"]), g.get("note") or "-"] for g in grants]
    table(rows, ["GRANT_ID", "USER", "CLIENT", "PORTS", "PROTOCOLS", "NOTE"])


def _print_removed(args, what: str, rule_ids: list[str]) -> int:
    if args.format == "json":
        print_json({"removed_rule_ids": rule_ids})
        return 0
    print(what)
    print(f"removed rules: {', '.join(rule_ids)}" if rule_ids else "removed rules: none")
    return 0


def _remove_with_rules(args, path: str, offline_remove, what: str) -> int:
    """Remove a user or a grant, then the rules it held: the API's DELETE ``path`` online, else
    ``offline_remove(identity)`` (which returns the rule ids) and their deletion from the store."""
    api = _online(args)
    if api is not None:
        rule_ids = api.call("DELETE", path)[1]["removed_rule_ids"]
    else:
        with _Offline(args) as off:
            rule_ids = offline_remove(off.identity)  # committed before the rules go
            _delete_rules(off.store, rule_ids)
    return _print_removed(args, what, rule_ids)


def _delete_rules(store, rule_ids: list[str]) -> None:
    from ..store import rules as store_rules
    for rule_id in rule_ids:
        store_rules.delete_rule(store, rule_id)


# ---------------------------------------------------------------- offline-only commands

def cmd_onboarding_token(args) -> int:
    with _Offline(args) as off:
        token = off.identity.issue_setup_token("cli")
        expires_at = off.identity.cli_setup_token_expires_at()
    print(token)
    print(f"Onboarding setup token, shown once, valid until {expires_at} (a serve start keeps it). Use it in "
          f"the Web UI onboarding or POST /v1/auth/onboarding.", file=sys.stderr)
    return 0


def cmd_reset_password(args) -> int:
    new_password = read_password_stdin() if args.password_stdin else None
    if args.online:
        body = {} if new_password is None else {"new_password": new_password}
        out = operator_api(args).call("POST", f"/v1/users/{quote(args.user_id)}/password", body)[1]
        out.setdefault("api_tokens_revoked", 0)
    else:
        with _Offline(args) as off:
            out = off.identity.reset_password(args.user_id, new_password,
                                              revoke_api_tokens=not args.keep_api_tokens)
    if args.format == "json":
        print_json(out)
        return 0
    if "temporary_password" in out:
        print(f"temporary_password={out['temporary_password']}")
    print(f"reset the password of {out['user_id']}: revoked {out['sessions_revoked']} Web session(s) and "
          f"{out['api_tokens_revoked']} API token(s); the password must be changed at the next login",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------- users

def cmd_user_add(args) -> int:
    password = read_password_stdin()
    api = _online(args)
    if api is not None:
        _, user = api.call("POST", "/v1/users", {"user_id": args.user_id, "display_name": args.display_name,
                                                  "role": args.role, "password": password})
    else:
        with _Offline(args) as off:
            user = off.identity.create_user(args.user_id, args.display_name, args.role, password)
    return _print_as(args, user, lambda u: print(f"created {u['role']} {u['user_id']} ({u['display_name']})"))


def cmd_user_list(args) -> int:
    api = _online(args)
    if api is not None:
        users = api.call("GET", "/v1/users")[1]["users"]
    else:
        with _Offline(args) as off:
            users = off.identity.list_users()
    return _print_as(args, users, _user_rows)


def cmd_user_get(args) -> int:
    api = _online(args)
    if api is not None:
        user = api.call("GET", f"/v1/users/{quote(args.user_id)}")[1]
    else:
        with _Offline(args) as off:
            user = off.identity.get_user(args.user_id)
    return _print_as(args, user, _user_fields)


def cmd_user_remove(args) -> int:
    return _remove_with_rules(args, f"/v1/users/{quote(args.user_id)}",
                              lambda identity: identity.remove_user(args.user_id), f"removed user {args.user_id}")


# ---------------------------------------------------------------- grants

def _protocols(text: str) -> list[str]:
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    if not parts:
        raise PortunusError("validation.invalid_protocols", f"--protocols must list tcp and/or udp, got {text!r}")
    return parts


def cmd_grant_add(args) -> int:
    body = {"user_id": args.user_id, "client": args.client, "listen_port_start": args.listen_port_start,
            "listen_port_end": args.listen_port_end, "protocols": _protocols(args.protocols), "note": args.note}
    api = _online(args)
    if api is not None:
        grant = api.call("POST", "/v1/grants", body)[1]  # the server resolves a client name
    else:
        with _Offline(args) as off:
            if args.client != "*":
                from ..store import clients as store_clients
                body["client"] = store_clients.resolve_client_ref(off.store, args.client)["client_id"]
            grant = off.identity.add_grant(**body)
    return _print_as(args, grant, lambda g: print(g["grant_id"]))


def cmd_grant_list(args) -> int:
    api = _online(args)
    if api is not None:
        path = "/v1/grants" + (f"?user_id={quote(args.user_id)}" if args.user_id else "")
        grants = api.call("GET", path)[1]["grants"]
    else:
        with _Offline(args) as off:
            grants = off.identity.list_grants(args.user_id)
    return _print_as(args, grants, _grant_rows)


def cmd_grant_revoke(args) -> int:
    return _remove_with_rules(args, f"/v1/grants/{quote(args.grant_id)}",
                              lambda identity: identity.revoke_grant(args.grant_id), f"revoked grant {args.grant_id}")
