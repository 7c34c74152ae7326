"""Failed attempts per (action, subject, remote IP): the login throttle's memory (SPEC §5).

The policy (how many failures lock, for how long) lives in ``server/identity.py``; this
module reads and writes the rows. Rows live in the store so a restart keeps a lockout.
"""

from __future__ import annotations

from .db import Store

ACTIONS = ("login", "onboarding", "password_change")
UNKNOWN_SUBJECT = "?"  # every unknown user id from one IP shares this key; no valid user id is "?"


def get_attempts(store: Store, action: str, subject: str, remote_ip: str):
    """The row (failures, last_failure_at, locked_until, forget_at) or None."""
    return store.read().execute(
        "SELECT failures, last_failure_at, locked_until, forget_at FROM login_attempts "
        "WHERE action = ? AND subject = ? AND remote_ip = ?", (action, subject, remote_ip)).fetchone()


def put_attempts(store: Store, action: str, subject: str, remote_ip: str, *, failures: int, last_failure_at: str,
                 locked_until: str | None, forget_at: str) -> None:
    with store.write() as conn:
        conn.execute(
            "INSERT INTO login_attempts (action, subject, remote_ip, failures, last_failure_at, locked_until, "
            "forget_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (action, subject, remote_ip) DO UPDATE SET "
            "failures = excluded.failures, last_failure_at = excluded.last_failure_at, "
            "locked_until = excluded.locked_until, forget_at = excluded.forget_at",
            (action, subject, remote_ip, failures, last_failure_at, locked_until, forget_at))


def clear_attempts(store: Store, action: str, subject: str, remote_ip: str) -> None:
    with store.write() as conn:
        conn.execute("DELETE FROM login_attempts WHERE action = ? AND subject = ? AND remote_ip = ?",
                     (action, subject, remote_ip))


def clear_subject(store: Store, action: str, subject: str) -> int:
    """Lift every lock of one subject, whatever the address (a superadmin reset the password)."""
    with store.write() as conn:
        return conn.execute("DELETE FROM login_attempts WHERE action = ? AND subject = ?",
                            (action, subject)).rowcount


def prune_forgotten(store: Store, now: str) -> int:
    """Drop rows that no longer count (keeps the table small under a spray from many addresses)."""
    with store.write() as conn:
        return conn.execute("DELETE FROM login_attempts WHERE forget_at <= ?", (now,)).rowcount
