"""Identity and access, below HTTP: onboarding, users, passwords, Web sessions, the throttle,
grants and the push fit check (SPEC §5, §6).

Every time comes from the injected ``clock`` (unix seconds), so tests move time instead of
sleeping. Secrets (passwords, setup tokens, session tokens) are returned to the caller once
and never put into an error message or a log line.

    identity = IdentityService(store)
    token = identity.start_onboarding()            # serve prints it while no superadmin exists
    result = identity.login("alice", password, remote_ip="192.0.2.7")
    session = identity.authenticate_session(result.session_token)
"""

from __future__ import annotations

import hmac
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from ..errors import PortunusError
from ..log import log
from ..store import grants as store_grants
from ..store import throttle as store_throttle
from ..store import users as store_users
from ..store import web_sessions as store_sessions
from ..store.clients import clean_label
from ..store.db import Store, parse_rfc3339, rfc3339
from ..store.ids import hash_token, is_ulid, new_token, new_ulid
from . import passwords
from .identity_checks import (ANY_CLIENT, MAX_DISPLAY_NAME, MAX_NOTE, PROTOCOLS, ROLES, USER_ID_PATTERN,  # noqa: F401
                              _address, _port, _shown, grant_fits, validate_protocols, validate_role,
                              validate_user_id)

SETUP_TOKEN_TTL_SECS = 30 * 60
SESSION_IDLE_SECS = 8 * 3600
SESSION_ABSOLUTE_SECS = 7 * 86400
# last_seen_at is written at most this often: idle expiry needs minutes, not a write per request
SESSION_TOUCH_SECS = 60

THROTTLE_MAX_FAILURES = 5
THROTTLE_WINDOW_SECS = 15 * 60
THROTTLE_FIRST_LOCK_SECS = 60
THROTTLE_MAX_LOCK_SECS = 15 * 60
ONBOARDING_SUBJECT = "setup"  # one setup token, so one subject per address


def lock_secs(failures: int) -> int:
    """How long the ``failures``-th failure locks the key: 60 s at the 5th, doubling, at most 15 min."""
    if failures < THROTTLE_MAX_FAILURES:
        return 0
    return min(THROTTLE_FIRST_LOCK_SECS << min(failures - THROTTLE_MAX_FAILURES, 16), THROTTLE_MAX_LOCK_SECS)


@dataclass(frozen=True)
class LoginResult:
    user: dict
    session_token: str            # the cookie value; shown once, stored only as a hash
    expires_at: str               # absolute expiry (the cookie's Max-Age may follow it)
    password_change_required: bool


@dataclass(frozen=True)
class SessionInfo:
    user_id: str
    role: str
    display_name: str
    password_change_required: bool
    session_hash: str             # identifies the session for logout / "all other sessions"


class IdentityService:
    def __init__(self, store: Store, clock=time.time):
        self.store = store
        self.clock = clock

    # ------------------------------------------------------------ time

    def _now(self) -> int:
        return int(self.clock())

    def _release_store(self) -> None:
        """Hold no store connection while a hash waits for its slot and runs (tens of ms each, a few
        at once): a login flood would otherwise hold the HTTP threads' whole connection pool, and
        every other request, a rule push too, would wait for it. A no-op inside a transaction."""
        release = getattr(self.store, "release_thread_connection", None)
        if release is not None:
            release()

    @staticmethod
    def _ts(secs: int) -> str:
        return rfc3339(datetime.fromtimestamp(secs, timezone.utc))

    @staticmethod
    def _secs(text: str) -> int:
        return int(parse_rfc3339(text).timestamp())

    # ------------------------------------------------------------ throttle (SPEC §5)

    def _begin_attempt(self, action: str, subject: str, remote_ip: str) -> int:
        """Refuse a locked key (``rate_limited``), else count this attempt as a failure up front.

        Counting before the password check, in the same transaction as the lock check, means
        parallel guesses cannot slip past the limit while hashes run; a success clears the key.
        Returns the lock this attempt set (0 for none), for ``_attempt_failed``.
        """
        now = self._now()
        remote_ip = _address(remote_ip)
        with self.store.write():
            row = store_throttle.get_attempts(self.store, action, subject, remote_ip)
            if row is not None and row["locked_until"] is not None:
                remaining = self._secs(row["locked_until"]) - now
                if remaining > 0:
                    raise PortunusError("rate_limited", f"too many failed attempts; retry in {remaining} s",
                                        retry_after_secs=remaining)
            fresh = row is None or self._secs(row["forget_at"]) <= now
            failures = 1 if fresh else row["failures"] + 1
            lock = lock_secs(failures)
            if lock:
                locked_until = self._ts(now + lock)
                forget_at = now + lock + THROTTLE_WINDOW_SECS  # further failures soon after keep doubling
            else:
                locked_until = None
                # the 15-minute window is counted from the first failure
                forget_at = now + THROTTLE_WINDOW_SECS if fresh else self._secs(row["forget_at"])
            store_throttle.put_attempts(self.store, action, subject, remote_ip, failures=failures,
                                        last_failure_at=self._ts(now), locked_until=locked_until,
                                        forget_at=self._ts(forget_at))
            store_throttle.prune_forgotten(self.store, self._ts(now))
        return lock

    @staticmethod
    def _attempt_failed(action: str, subject: str, remote_ip: str, lock: int) -> None:
        if lock:
            log.warn("auth.throttle_locked", action=action, subject=subject, remote_ip=remote_ip,
                     locked_secs=lock)

    def _clear_throttle(self, action: str, subject: str, remote_ip: str) -> None:
        store_throttle.clear_attempts(self.store, action, subject, _address(remote_ip))

    # ------------------------------------------------------------ onboarding

    def bootstrap_required(self) -> bool:
        """True while no active superadmin exists (protected routes answer 503 bootstrap_required)."""
        return not store_users.active_superadmin_ids(self.store)

    def _onboarding_row(self):
        return self.store.read().execute("SELECT * FROM onboarding_setup WHERE id = 1").fetchone()

    def onboarding_open(self) -> bool:
        row = self._onboarding_row()
        return self.bootstrap_required() and (row is None or row["completed_at"] is None)

    def issue_setup_token(self, issued_by: str = "cli") -> str:
        """A fresh setup token (30 min) replacing any earlier one; ``already_bootstrapped`` once closed.

        ``issued_by`` is ``cli`` for the offline ``onboarding-token`` command, ``serve`` at a start.
        """
        if not self.onboarding_open():
            raise PortunusError("already_bootstrapped",
                                "onboarding is closed: a superadmin exists; recover access with "
                                "`portunus-server reset-password USER --temporary` (server stopped)")
        token = new_token()
        now = self._now()
        with self.store.write() as conn:
            conn.execute("INSERT INTO onboarding_setup (id, token_hash, issued_by, created_at, expires_at) "
                         "VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET token_hash = excluded.token_hash, "
                         "issued_by = excluded.issued_by, created_at = excluded.created_at, "
                         "expires_at = excluded.expires_at",
                         (hash_token(token), issued_by, self._ts(now), self._ts(now + SETUP_TOKEN_TTL_SECS)))
        return token

    def cli_setup_token_expires_at(self) -> str | None:
        """When the still-valid token from ``onboarding-token`` expires (None when there is none)."""
        row = self._onboarding_row()
        if (row is None or row["token_hash"] is None or row["issued_by"] != "cli"
                or self._secs(row["expires_at"]) <= self._now()):
            return None
        return row["expires_at"]

    def start_onboarding(self) -> str | None:
        """At every serve start while onboarding is open: a fresh setup token for serve to print.

        None when onboarding is closed, or when a token from ``onboarding-token`` is still valid
        (serve then says so instead: that token was printed to the operator, not to the log).
        """
        if not self.onboarding_open() or self.cli_setup_token_expires_at() is not None:
            return None
        return self.issue_setup_token("serve")

    def complete_onboarding(self, setup_token, user_id, display_name, password, *, remote_ip: str) -> dict:
        """Create the first superadmin with a valid setup token; closes onboarding for good."""
        if not self.onboarding_open():
            raise PortunusError("already_bootstrapped", "onboarding is closed: a superadmin already exists")
        if not isinstance(setup_token, str) or not setup_token.strip():
            raise PortunusError("setup_token_required", "setup_token is required (printed by serve on stderr, "
                                                        "or by `portunus-server onboarding-token`)")
        lock = self._begin_attempt("onboarding", ONBOARDING_SUBJECT, remote_ip)
        row = self._onboarding_row()
        valid = (row is not None and row["token_hash"] is not None
                 and hmac.compare_digest(hash_token(setup_token.strip()), row["token_hash"]))
        if not valid or self._secs(row["expires_at"]) <= self._now():
            self._attempt_failed("onboarding", ONBOARDING_SUBJECT, remote_ip, lock)
            why = "has expired (30 minutes)" if valid else "does not match the current one"
            raise PortunusError("setup_token_invalid", f"the setup token {why}; restart serve or run "
                                                       f"`portunus-server onboarding-token` for a fresh one")
        self._clear_throttle("onboarding", ONBOARDING_SUBJECT, remote_ip)  # the token was right
        user_id = validate_user_id(user_id)
        display_name = clean_label(display_name, "display name", MAX_DISPLAY_NAME, "validation.invalid_display_name")
        self._release_store()
        password_hash = passwords.hash_password(password)
        now = self._ts(self._now())
        with self.store.write() as conn:
            if not self.onboarding_open():  # a concurrent onboarding won the race
                raise PortunusError("already_bootstrapped", "onboarding is closed: a superadmin already exists")
            user = store_users.insert_user(self.store, user_id, display_name, "superadmin", password_hash, now)
            conn.execute("UPDATE onboarding_setup SET token_hash = NULL, completed_at = ?, completed_by = ? "
                         "WHERE id = 1", (now, user_id))
        log.info("identity.onboarding_completed", user_id=user_id)
        return user

    # ------------------------------------------------------------ users

    def create_user(self, user_id, display_name, role, password, *, password_change_required: bool = False) -> dict:
        user_id = validate_user_id(user_id)
        display_name = clean_label(display_name, "display name", MAX_DISPLAY_NAME, "validation.invalid_display_name")
        role = validate_role(role)
        if store_users.find_user_row(self.store, user_id) is not None:  # before paying for the hash
            raise PortunusError("conflict.user_exists", f"user {user_id!r} already exists", user_id=user_id)
        self._release_store()
        password_hash = passwords.hash_password(password)
        return store_users.insert_user(self.store, user_id, display_name, role, password_hash,
                                       self._ts(self._now()), password_change_required=password_change_required)

    def get_user(self, user_id) -> dict:
        return store_users.get_user(self.store, user_id)

    def list_users(self) -> list[dict]:
        return store_users.list_users(self.store)

    def update_user(self, user_id, *, display_name=None, role=None, disabled=None) -> dict:
        if display_name is not None:
            display_name = clean_label(display_name, "display name", MAX_DISPLAY_NAME,
                                       "validation.invalid_display_name")
        if role is not None:
            validate_role(role)
        if disabled is not None and not isinstance(disabled, bool):
            raise PortunusError("validation.invalid_disabled", f"disabled must be true or false, got {_shown(disabled)}")
        self.get_user(user_id)
        return store_users.update_user(self.store, user_id, display_name=display_name, role=role, disabled=disabled)

    def remove_user(self, user_id) -> list[str]:
        """Delete the user (committed first); returns the rule ids the caller must now remove."""
        self.get_user(user_id)
        rule_ids = store_users.delete_user(self.store, user_id)
        log.info("identity.user_removed", user_id=user_id, dependent_rules=len(rule_ids))
        return rule_ids

    # ------------------------------------------------------------ login and sessions

    def login(self, user_id, password, *, remote_ip: str) -> LoginResult:
        """Check the password (throttled, uniform ``invalid_login``) and open a Web session."""
        row = store_users.find_user_row(self.store, user_id)
        subject = row["user_id"] if row is not None else store_throttle.UNKNOWN_SUBJECT
        lock = self._begin_attempt("login", subject, remote_ip)
        self._release_store()
        ok = False
        if row is not None and row["password_hash"]:
            ok = self._verify(row, password)
        else:
            passwords.verify_unknown_user(password)  # the same cost as a real check
        if not ok or row["disabled"]:
            self._attempt_failed("login", subject, remote_ip, lock)
            raise PortunusError("invalid_login", "unknown user or wrong password")
        self._clear_throttle("login", subject, remote_ip)
        return self._open_session(row)

    def _verify(self, row, password) -> bool:
        try:
            result = passwords.verify_password(password, row["password_hash"])
        except passwords.InvalidPasswordHash as exc:
            log.error("identity.password_hash_unreadable", user_id=row["user_id"], reason=str(exc))
            passwords.verify_unknown_user(password)
            return False
        if result.ok and result.needs_rehash:
            store_users.replace_password_hash(self.store, row["user_id"], row["password_hash"],
                                              passwords.hash_password(password, enforce_policy=False))
        return result.ok

    def _open_session(self, row) -> LoginResult:
        token = new_token()  # 256 random bits
        now = self._now()
        expires_at = self._ts(now + SESSION_ABSOLUTE_SECS)
        store_sessions.prune_expired(self.store, self._ts(now), self._ts(now - SESSION_IDLE_SECS))
        store_sessions.insert_session(self.store, hash_token(token), row["user_id"], self._ts(now), expires_at)
        user = store_users.get_user(self.store, row["user_id"])
        return LoginResult(user, token, expires_at, user["password_change_required"])

    def authenticate_session(self, token) -> SessionInfo | None:
        """The live session behind a cookie value, else None (expired ones are deleted on sight)."""
        if not isinstance(token, str) or not token or len(token) > 256:
            return None
        session_hash = hash_token(token)
        row = store_sessions.find_session(self.store, session_hash)
        if row is None:
            return None
        now = self._now()
        last_seen = self._secs(row["last_seen_at"])
        if self._secs(row["expires_at"]) <= now or last_seen + SESSION_IDLE_SECS <= now or row["disabled"]:
            store_sessions.delete_session(self.store, session_hash)
            return None
        if now - last_seen >= SESSION_TOUCH_SECS:
            store_sessions.touch_session(self.store, session_hash, self._ts(now))
        return SessionInfo(row["user_id"], row["role"], row["display_name"], bool(row["password_change_required"]),
                           session_hash)

    def logout(self, token) -> bool:
        if not isinstance(token, str) or not token:
            return False
        return store_sessions.delete_session(self.store, hash_token(token))

    # ------------------------------------------------------------ passwords

    def change_password(self, user_id: str, current_password, new_password, *, remote_ip: str,
                        keep_session_hash: str | None = None) -> None:
        """Self-service change: the current password (throttled), then the policy; other sessions end."""
        row = store_users.find_user_row(self.store, user_id)
        if row is None:
            raise store_users.not_found(user_id)
        lock = self._begin_attempt("password_change", user_id, remote_ip)
        self._release_store()
        if not row["password_hash"] or not self._verify(row, current_password):
            if not row["password_hash"]:
                passwords.verify_unknown_user(current_password)
            self._attempt_failed("password_change", user_id, remote_ip, lock)
            raise PortunusError("invalid_login", "the current password is wrong")
        self._clear_throttle("password_change", user_id, remote_ip)
        passwords.check_password_policy(new_password)
        if hmac.compare_digest(new_password.encode("utf-8", "surrogatepass"),
                               current_password.encode("utf-8", "surrogatepass")):
            raise PortunusError("validation.password_unchanged", "the new password must differ from the current one")
        self._release_store()
        store_users.set_password_hash(self.store, user_id, passwords.hash_password(new_password),
                                      change_required=False)
        store_sessions.delete_user_sessions(self.store, user_id, keep_hash=keep_session_hash)

    def reset_password(self, user_id, new_password=None, *, revoke_api_tokens: bool = True) -> dict:
        """Set a password for someone (a generated temporary one when none is given): the user must
        change it at next login; their Web sessions (and by default API tokens) are revoked."""
        self.get_user(user_id)
        temporary = new_password is None
        if temporary:
            new_password = passwords.new_temporary_password()
        self._release_store()
        password_hash = passwords.hash_password(new_password)
        with self.store.write():
            store_users.set_password_hash(self.store, user_id, password_hash, change_required=True)
            sessions = store_sessions.delete_user_sessions(self.store, user_id)
            tokens = store_users.revoke_api_tokens(self.store, user_id, self._ts(self._now())) \
                if revoke_api_tokens else 0
            store_throttle.clear_subject(self.store, "login", user_id)
        log.info("identity.password_reset", user_id=user_id, sessions_revoked=sessions, bearers_revoked=tokens)
        out = {"user_id": user_id, "sessions_revoked": sessions, "api_tokens_revoked": tokens}
        if temporary:
            out["temporary_password"] = new_password
        return out

    # ------------------------------------------------------------ grants

    def add_grant(self, user_id, client, listen_port_start, listen_port_end, protocols, note=None) -> dict:
        self.get_user(user_id)
        if client == ANY_CLIENT:
            client_id = None
        elif is_ulid(client):
            client_id = client.upper()
        else:
            raise PortunusError("not_found", f"client {_shown(client)} not found (a grant names a client id or *)",
                                client=client if isinstance(client, str) else None)
        start = _port(listen_port_start, "listen_port_start")
        end = _port(listen_port_end, "listen_port_end")
        if start > end:
            raise PortunusError("validation.grant_port_range_invalid",
                                f"listen_port_start {start} is above listen_port_end {end}")
        protocols = validate_protocols(protocols)
        if isinstance(note, str) and not note.strip():
            note = None
        elif note is not None:
            note = clean_label(note, "note", MAX_NOTE, "validation.invalid_note")
        return store_grants.insert_grant(self.store, new_ulid(), user_id, client_id, start, end, protocols, note,
                                         self._ts(self._now()))

    def get_grant(self, grant_id) -> dict:
        return store_grants.get_grant(self.store, grant_id)

    def list_grants(self, user_id: str | None = None) -> list[dict]:
        return store_grants.list_grants(self.store, user_id)

    def revoke_grant(self, grant_id) -> list[str]:
        """Delete the grant (committed first); returns the ids of the owner's rules no grant covers now."""
        with self.store.write():
            grant = store_grants.delete_grant(self.store, grant_id)
            row = store_users.find_user_row(self.store, grant["user_id"])
            if row is None or row["role"] == "superadmin":
                return []  # superadmins push without grants
            remaining = store_grants.list_grants(self.store, grant["user_id"])
            orphaned = []
            for rule in store_grants.owned_rules(self.store, grant["user_id"]):
                if not any(g["client"] in (ANY_CLIENT, rule["client_id"]) and
                           grant_fits(g, rule["protocol"], rule["listen_port"], rule["listen_port_end"])
                           for g in remaining):
                    orphaned.append(rule["rule_id"])
        return orphaned

    def check_push(self, user_id: str, role: str, client_id: str, protocol: str, listen_port: int,
                   listen_port_end: int) -> dict | None:
        """The one grant a push fits entirely inside (None for superadmins), else the first failing check:
        ``client_not_granted`` > ``protocol_not_granted`` > ``port_outside_grant``."""
        if role == "superadmin":
            return None
        covering = store_grants.grants_covering_client(self.store, user_id, client_id)
        if not covering:
            raise PortunusError("client_not_granted", f"user {user_id!r} has no grant on client {client_id}",
                                client_id=client_id)
        with_protocol = [g for g in covering if protocol in g["protocols"]]
        if not with_protocol:
            raise PortunusError("protocol_not_granted",
                                f"no grant of user {user_id!r} on client {client_id} allows {protocol}",
                                client_id=client_id, protocol=protocol)
        for grant in with_protocol:
            if grant_fits(grant, protocol, listen_port, listen_port_end):
                return grant
        ports = str(listen_port) if listen_port == listen_port_end else f"{listen_port}-{listen_port_end}"
        ranges = ", ".join(f"{g['listen_port_start']}-{g['listen_port_end']}" for g in with_protocol)
        raise PortunusError("port_outside_grant",
                            f"listen port {ports}/{protocol} is not inside one grant of user {user_id!r} on client "
                            f"{client_id} (granted: {ranges})", client_id=client_id, port=listen_port)

    def granted_client_ids(self, user_id: str) -> set[str] | None:
        """The clients a user's grants cover; None means every client (a "*" grant)."""
        ids = set()
        for grant in store_grants.list_grants(self.store, user_id):
            if grant["client"] == ANY_CLIENT:
                return None
            ids.add(grant["client"])
        return ids


def retry_after_header(error: PortunusError) -> str | None:
    """The ``Retry-After`` value for a ``rate_limited`` error (whole seconds, at least 1)."""
    secs = error.fields.get("retry_after_secs")
    if error.code != "rate_limited" or secs is None:
        return None
    return str(max(1, math.ceil(secs)))
