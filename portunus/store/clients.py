"""Clients, their bearer tokens and their one-time enrollment codes (SPEC §3.2).

Plaintext tokens and codes leave these functions once, as return values; the
database holds only their sha256. Looking a secret up by its hash is the
constant-time comparison: timing reveals nothing about the plaintext.
"""

from __future__ import annotations

import json
from datetime import timedelta

from ..errors import PortunusError
from .db import Store, now_rfc3339, parse_rfc3339, rfc3339, utc_now
from .ids import hash_token, is_ulid, new_code, new_token, new_ulid, normalize_code

MAX_ENROLLMENT_TTL_SECS = 86400
MAX_NAME_LEN = 128
MAX_ADDRESS_LEN = 255


def clean_label(value, what: str, max_len: int, code: str) -> str:
    """A one-line, non-empty display string."""
    if not isinstance(value, str) or not value.strip():
        raise PortunusError(code, f"{what} must be a non-empty string, got {value!r}")
    value = value.strip()
    if len(value) > max_len or any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise PortunusError(code, f"{what} must be one line of at most {max_len} characters, got {value!r}")
    return value


def check_client_name(name) -> str:
    """The one client-name rule (API, CLI, store): one line, 1..128 characters, trimmed."""
    return clean_label(name, "client name", MAX_NAME_LEN, "validation.invalid_client_name")


def check_enrollment_ttl(ttl_secs) -> int:
    """The one enrollment-TTL rule (API, CLI, store): whole seconds 1..86400 (24 h)."""
    if isinstance(ttl_secs, bool) or not isinstance(ttl_secs, int) or not 1 <= ttl_secs <= MAX_ENROLLMENT_TTL_SECS:
        raise PortunusError("validation.invalid_ttl", f"ttl_secs must be 1..{MAX_ENROLLMENT_TTL_SECS} (24 h), "
                                                      f"got {ttl_secs!r}")
    return ttl_secs


def _client(row) -> dict:
    return {
        "client_id": row["client_id"],
        "client_name": row["client_name"],
        "address": row["address"],
        "revoked": row["revoked_at"] is not None,
        "revoked_at": row["revoked_at"],
        "created_at": row["created_at"],
        "last_seen_at": row["last_seen_at"],
        "client_version": row["client_version"],
        "capabilities": json.loads(row["capabilities_json"]),
    }


def _not_found(client_id) -> PortunusError:
    return PortunusError("not_found", f"client {client_id!r} not found", client_id=client_id)


def _row(conn, client_id):
    if not is_ulid(client_id):
        raise _not_found(client_id)
    row = conn.execute("SELECT * FROM clients WHERE client_id = ?", (client_id.upper(),)).fetchone()
    if row is None:
        raise _not_found(client_id)
    return row


# ------------------------------------------------------------------ clients

def create_client(store: Store, name: str, address: str | None = None) -> dict:
    name = check_client_name(name)
    if address is not None:
        address = clean_label(address, "client address", MAX_ADDRESS_LEN, "validation.invalid_client_address")
    client_id = new_ulid()
    with store.write() as conn:
        conn.execute("INSERT INTO clients (client_id, client_name, address, created_at) VALUES (?, ?, ?, ?)",
                     (client_id, name, address, now_rfc3339()))
        return _client(_row(conn, client_id))


def get_client(store: Store, client_id: str) -> dict:
    return _client(_row(store.read(), client_id))


def list_clients(store: Store) -> list[dict]:
    rows = store.read().execute("SELECT * FROM clients ORDER BY created_at, client_id").fetchall()
    return [_client(r) for r in rows]


def resolve_client_ref(store: Store, ref: str) -> dict:
    """An exact client id, else a name that matches exactly one client."""
    conn = store.read()
    if is_ulid(ref):
        row = conn.execute("SELECT * FROM clients WHERE client_id = ?", (ref.upper(),)).fetchone()
        if row is not None:
            return _client(row)
    if not isinstance(ref, str):
        raise PortunusError("not_found", f"client {ref!r} not found")
    rows = conn.execute("SELECT * FROM clients WHERE client_name = ? ORDER BY created_at, client_id",
                        (ref,)).fetchall()
    if not rows:
        raise PortunusError("not_found", f"no client has the id or name {ref!r}", client=ref)
    if len(rows) > 1:
        ids = [r["client_id"] for r in rows]
        raise PortunusError("client_ambiguous",
                            f"{len(ids)} clients are named {ref!r}: {', '.join(ids)}; use an id", ids=ids)
    return _client(rows[0])


def rename_client(store: Store, client_id: str, name: str) -> dict:
    name = check_client_name(name)
    with store.write() as conn:
        row = _row(conn, client_id)
        conn.execute("UPDATE clients SET client_name = ? WHERE client_id = ?", (name, row["client_id"]))
        return _client(_row(conn, row["client_id"]))


def set_address(store: Store, client_id: str, address: str | None) -> dict:
    if address is not None:
        address = clean_label(address, "client address", MAX_ADDRESS_LEN, "validation.invalid_client_address")
    with store.write() as conn:
        row = _row(conn, client_id)
        conn.execute("UPDATE clients SET address = ? WHERE client_id = ?", (address, row["client_id"]))
        return _client(_row(conn, row["client_id"]))


def revoke_client(store: Store, client_id: str) -> dict:
    """Mark the client, every token and every unused code of it revoked (idempotent: the first time stays).

    Only a code created after the revocation (reenroll-client) can bring the client back.
    """
    now = now_rfc3339()
    with store.write() as conn:
        cid = _row(conn, client_id)["client_id"]
        conn.execute("UPDATE clients SET revoked_at = ? WHERE client_id = ? AND revoked_at IS NULL", (now, cid))
        conn.execute("UPDATE client_tokens SET revoked_at = ? WHERE client_id = ? AND revoked_at IS NULL",
                     (now, cid))
        conn.execute("UPDATE enrollments SET superseded_at = ? "
                     "WHERE client_id = ? AND used_at IS NULL AND superseded_at IS NULL", (now, cid))
        return _client(_row(conn, cid))


def delete_client(store: Store, client_id: str) -> list[str]:
    """Remove a revoked client with its rules, tokens and codes; returns the removed rule ids."""
    with store.write() as conn:
        row = _row(conn, client_id)
        cid = row["client_id"]
        if row["revoked_at"] is None:
            raise PortunusError("conflict.client_not_revoked",
                                f"client {cid} ({row['client_name']}) is not revoked; revoke it before deleting it",
                                client_id=cid)
        rule_ids = [r[0] for r in conn.execute("SELECT rule_id FROM rules WHERE client_id = ?", (cid,))]
        conn.execute("DELETE FROM rules WHERE client_id = ?", (cid,))  # rule_targets cascade
        conn.execute("DELETE FROM clients WHERE client_id = ?", (cid,))  # tokens, enrollments cascade
        return rule_ids


def record_connection(store: Store, client_id: str, client_version: str | None, capabilities) -> dict:
    """A client said hello: remember when, which version, and what it can run."""
    caps = sorted({str(c) for c in (capabilities or [])})
    with store.write() as conn:
        cid = _row(conn, client_id)["client_id"]
        conn.execute("UPDATE clients SET last_seen_at = ?, client_version = ?, capabilities_json = ? "
                     "WHERE client_id = ?", (now_rfc3339(), client_version, json.dumps(caps), cid))
        return _client(_row(conn, cid))


# ------------------------------------------------------------------ tokens

def authenticate_client(store: Store, token: str) -> dict:
    """The client a bearer token belongs to; ``token_revoked`` or ``unauthenticated`` otherwise."""
    if not isinstance(token, str) or not token:
        raise PortunusError("unauthenticated", "no client token presented")
    row = store.read().execute(
        "SELECT c.*, t.revoked_at AS token_revoked_at FROM client_tokens t "
        "JOIN clients c ON c.client_id = t.client_id WHERE t.token_hash = ?", (hash_token(token),)).fetchone()
    if row is None:
        raise PortunusError("unauthenticated", "unknown client token")
    if row["revoked_at"] is not None:
        raise PortunusError("token_revoked", f"client {row['client_id']} has been revoked",
                            client_id=row["client_id"])
    if row["token_revoked_at"] is not None:
        raise PortunusError("token_revoked", f"this token of client {row['client_id']} was revoked "
                                             f"(re-enrolled or revoked at {row['token_revoked_at']})",
                            client_id=row["client_id"])
    return _client(row)


# ------------------------------------------------------------------ enrollment codes

def create_enrollment(store: Store, client_id: str, ttl_secs: int, endpoint: str | None) -> str:
    """A new one-time code for the client; older unused codes of that client stop working.

    ``endpoint`` is the advertised host:port resolved now (SPEC §3.3); None stores a
    legacy enrollment whose endpoint is resolved at redeem. A revoked client may get
    a code: redeeming it lifts the revocation (seed 004: "generate a re-enrollment
    command and run it on the edge host").
    """
    check_enrollment_ttl(ttl_secs)
    code = new_code()
    now = utc_now()
    with store.write() as conn:
        cid = _row(conn, client_id)["client_id"]
        conn.execute("UPDATE enrollments SET superseded_at = ? "
                     "WHERE client_id = ? AND used_at IS NULL AND superseded_at IS NULL", (rfc3339(now), cid))
        conn.execute("INSERT INTO enrollments (code_hash, client_id, created_at, expires_at, endpoint) "
                     "VALUES (?, ?, ?, ?, ?)",
                     (hash_token(code), cid, rfc3339(now), rfc3339(now + timedelta(seconds=ttl_secs)), endpoint))
    return code


def _invalid(reason: str, message: str) -> PortunusError:
    # the message never repeats the code: it is a secret until used
    return PortunusError("enrollment_invalid", message, reason=reason)


def _usable_enrollment(conn, code):
    """The enrollment row joined with its client, or ``enrollment_invalid`` saying why not."""
    row = None
    if isinstance(code, str) and code.strip():
        row = conn.execute(
            "SELECT e.*, c.client_name, c.revoked_at AS client_revoked_at FROM enrollments e "
            "JOIN clients c ON c.client_id = e.client_id WHERE e.code_hash = ?",
            (hash_token(normalize_code(code)),)).fetchone()
    if row is None:
        raise _invalid("unknown", "enrollment code is not recognised; check the enroll URI or create a new code")
    if row["used_at"] is not None:
        raise _invalid("used", f"enrollment code was already used at {row['used_at']}; codes are single-use, "
                               f"create a new one with reenroll-client")
    if row["superseded_at"] is not None:
        if row["client_revoked_at"] is not None and row["superseded_at"] <= row["client_revoked_at"]:
            raise _invalid("client_revoked", f"client {row['client_id']} was revoked after this code was created; "
                                             f"create a new one with reenroll-client")
        raise _invalid("superseded", "enrollment code was replaced by a newer code for the same client; "
                                     "use the most recent enroll URI")
    if utc_now() >= parse_rfc3339(row["expires_at"]):
        raise _invalid("expired", f"enrollment code expired at {row['expires_at']}; "
                                  f"create a new one with reenroll-client")
    return row


def peek_enrollment(store: Store, code: str) -> dict:
    """Check a code without consuming it: {client_id, client_name, endpoint, expires_at}.

    For the legacy case (endpoint None) the server resolves an endpoint first and, if
    that fails, refuses without consuming the code (SPEC §3.3).
    """
    row = _usable_enrollment(store.read(), code)
    return {"client_id": row["client_id"], "client_name": row["client_name"],
            "endpoint": row["endpoint"], "expires_at": row["expires_at"]}


def redeem_enrollment(store: Store, code: str) -> tuple[dict, str]:
    """Consume a code: rotate the client's token and lift a revocation. Returns (client, plaintext token).

    The id and every rule stay; older tokens stay revoked.
    """
    token = new_token()
    now = now_rfc3339()
    with store.write() as conn:
        row = _usable_enrollment(conn, code)
        cid = row["client_id"]
        conn.execute("UPDATE enrollments SET used_at = ? WHERE code_hash = ?", (now, row["code_hash"]))
        conn.execute("UPDATE client_tokens SET revoked_at = ? WHERE client_id = ? AND revoked_at IS NULL",
                     (now, cid))
        conn.execute("INSERT INTO client_tokens (token_hash, client_id, created_at) VALUES (?, ?, ?)",
                     (hash_token(token), cid, now))
        conn.execute("UPDATE clients SET revoked_at = NULL WHERE client_id = ?", (cid,))
        return _client(_row(conn, cid)), token
