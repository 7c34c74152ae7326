"""Identifiers and secrets: ULIDs for rows, bearer tokens, enrollment codes, and their hashes."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
_RAND_BITS = 80
CODE_LENGTH = 20  # 100 bits from secrets: unguessable within a code's 24 h maximum life

_lock = threading.Lock()
_last_ms = -1
_last_rand = 0


def _reset_after_fork() -> None:
    # a forked child must not continue the parent's sequence, or both could mint the same id
    global _last_ms, _last_rand
    _last_ms, _last_rand = -1, 0


os.register_at_fork(after_in_child=_reset_after_fork)


def _encode(n: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(CROCKFORD[n & 31])
        n >>= 5
    return "".join(reversed(out))


def new_ulid() -> str:
    """26-char Crockford base32: 48-bit ms timestamp + 80 random bits, strictly increasing in-process."""
    global _last_ms, _last_rand
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            # same millisecond, or the clock stepped back: count up from the last id to keep order
            ms, rand = _last_ms, _last_rand + 1
            if rand >> _RAND_BITS:
                ms, rand = ms + 1, secrets.randbits(_RAND_BITS)
        else:
            rand = secrets.randbits(_RAND_BITS)
        _last_ms, _last_rand = ms, rand
    return _encode((ms << _RAND_BITS) | rand, 26)


def is_ulid(s) -> bool:
    """True for a 26-char Crockford base32 ULID (either case)."""
    return isinstance(s, str) and _ULID.fullmatch(s.upper()) is not None


def ulid_ms(s: str) -> int:
    """The millisecond timestamp inside a ULID."""
    n = 0
    for ch in s.upper():
        n = (n << 5) | CROCKFORD.index(ch)
    return n >> _RAND_BITS


def new_token() -> str:
    """43-char URL-safe base64 (no padding) of 32 random bytes."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # sha256 is enough: tokens and codes are long random secrets, so there is nothing to brute-force.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_code() -> str:
    """A one-time enrollment code: 20 Crockford base32 chars from secrets."""
    return "".join(secrets.choice(CROCKFORD) for _ in range(CODE_LENGTH))


def normalize_code(code: str) -> str:
    """Crockford decoding rules, so a code read aloud or retyped still matches: case, I/L, O, hyphens."""
    return (code.strip().upper().replace("-", "").replace(" ", "")
            .replace("I", "1").replace("L", "1").replace("O", "0"))
