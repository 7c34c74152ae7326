"""Password hashing: Argon2id from ``cryptography``, stored as a PHC string (SPEC §5).

    $argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>        (salt and hash: base64, no padding)

We encode and parse the PHC string ourselves (``cryptography`` only derives keys).
At most ``MAX_CONCURRENT_HASHES`` Argon2 computations run at once: each costs
~19 MiB and tens of milliseconds of CPU, so a login flood must queue here instead
of starving the API threads and the control plane. ``verify_unknown_user`` spends
the same work on a dummy hash, so an unknown user id answers as slowly as a known one.
``serve`` calls ``start_hash_workers``: the derivations then run in child processes
(``hashworkers.py``), because in-process Argon2 holds the GIL for each whole hash.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
import secrets
import threading
from dataclasses import dataclass

from ..errors import PortunusError

# OWASP's minimum for Argon2id (m=19 MiB, t=2, p=1); a stored hash with other values gets re-hashed
MEMORY_KIB = 19456
ITERATIONS = 2
LANES = 1
SALT_BYTES = 16
HASH_BYTES = 32
ARGON2_VERSION = 19

MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_BYTES = 1024
MAX_CONCURRENT_HASHES = 2

# bounds for parameters read back from the store: a corrupt or hostile row must not make us
# allocate gigabytes or spin for minutes
_MAX_MEMORY_KIB = 1 << 20
_MAX_ITERATIONS = 16
_MAX_LANES = 16
# [0-9], not \d: \d also matches non-ASCII digits, which int() accepts
# (no leading zeros either: one value, one spelling)
_PHC = re.compile(r"\$argon2id\$v=([1-9][0-9]{0,2})\$m=([1-9][0-9]{0,7}),t=([1-9][0-9]{0,2}),p=([1-9][0-9]{0,2})"
                  r"\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")

_hash_slots = threading.BoundedSemaphore(MAX_CONCURRENT_HASHES)

# cryptography's Argon2id class, imported at the first in-process hash: serve hashes in its children
# (hashworkers) and makes its first certificate without cryptography, so its start does not pay the import
Argon2id = None


def _argon2id():
    global Argon2id
    if Argon2id is None:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id as cls
        Argon2id = cls
    return Argon2id


class InvalidPasswordHash(ValueError):
    """A stored string is not an Argon2id PHC string we can verify against."""


@dataclass(frozen=True)
class PasswordHash:
    memory_kib: int
    iterations: int
    lanes: int
    salt: bytes
    digest: bytes

    def to_phc(self) -> str:
        return (f"$argon2id$v={ARGON2_VERSION}$m={self.memory_kib},t={self.iterations},p={self.lanes}"
                f"${_b64encode(self.salt)}${_b64encode(self.digest)}")

    @property
    def is_current(self) -> bool:
        """True when made with today's parameters (else the caller re-hashes after a good login)."""
        return ((self.memory_kib, self.iterations, self.lanes, len(self.salt), len(self.digest)) ==
                (MEMORY_KIB, ITERATIONS, LANES, SALT_BYTES, HASH_BYTES))


@dataclass(frozen=True)
class Verification:
    ok: bool
    needs_rehash: bool = False


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _b64decode(text: str, what: str) -> bytes:
    if len(text) % 4 == 1:
        raise InvalidPasswordHash(f"{what} has an impossible base64 length")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise InvalidPasswordHash(f"{what} is not base64") from None
    if _b64encode(raw) != text:
        # non-zero trailing bits: two strings would name one value, so refuse the odd one
        raise InvalidPasswordHash(f"{what} is not canonical base64")
    return raw


def parse_phc(text: str) -> PasswordHash:
    """Parse ``$argon2id$v=19$m=…,t=…,p=…$salt$hash``; raises InvalidPasswordHash (never echoing it)."""
    if not isinstance(text, str):
        raise InvalidPasswordHash("a password hash must be a string")
    m = _PHC.fullmatch(text)
    if m is None:
        raise InvalidPasswordHash("not an argon2id PHC string")
    version, memory, iterations, lanes = (int(m.group(i)) for i in range(1, 5))
    if version != ARGON2_VERSION:
        raise InvalidPasswordHash(f"argon2 version {version} is not supported (only {ARGON2_VERSION})")
    if not 1 <= lanes <= _MAX_LANES:
        raise InvalidPasswordHash(f"lanes p={lanes} out of range 1..{_MAX_LANES}")
    if not 1 <= iterations <= _MAX_ITERATIONS:
        raise InvalidPasswordHash(f"iterations t={iterations} out of range 1..{_MAX_ITERATIONS}")
    if not 8 * lanes <= memory <= _MAX_MEMORY_KIB:
        raise InvalidPasswordHash(f"memory m={memory} out of range {8 * lanes}..{_MAX_MEMORY_KIB} KiB")
    salt = _b64decode(m.group(5), "salt")
    digest = _b64decode(m.group(6), "hash")
    if not 8 <= len(salt) <= 64:
        raise InvalidPasswordHash(f"salt of {len(salt)} bytes (8..64 allowed)")
    if not 4 <= len(digest) <= 64:
        raise InvalidPasswordHash(f"hash of {len(digest)} bytes (4..64 allowed)")
    return PasswordHash(memory, iterations, lanes, salt, digest)


def check_password_policy(password) -> None:
    """12 characters to 1024 bytes (UTF-8). The message never contains the password."""
    if not isinstance(password, str):
        raise PortunusError("validation.invalid_password", f"a password must be a string, got {type(password).__name__}")
    if len(password) < MIN_PASSWORD_CHARS:
        raise PortunusError("password_too_short", f"a password needs at least {MIN_PASSWORD_CHARS} characters, "
                                                  f"this one has {len(password)}")
    size = len(password.encode("utf-8", "surrogatepass"))
    if size > MAX_PASSWORD_BYTES:
        raise PortunusError("password_too_long", f"a password may have at most {MAX_PASSWORD_BYTES} bytes (UTF-8), "
                                                 f"this one has {size}")


_workers = None  # hashworkers.HashWorkers while serve runs (see start_hash_workers)


def start_hash_workers() -> None:
    """Hash in child processes from now on (serve): Argon2 in-process holds the GIL for each hash."""
    global _workers
    from .hashworkers import HashWorkers
    if _workers is None:
        _workers = HashWorkers(MAX_CONCURRENT_HASHES)


def stop_hash_workers() -> None:
    global _workers
    workers, _workers = _workers, None
    if workers is not None:
        workers.stop()


def _derive(password: str, memory_kib: int, iterations: int, lanes: int, salt: bytes, length: int) -> bytes:
    secret = password.encode("utf-8", "surrogatepass")
    with _hash_slots:
        workers = _workers
        if workers is not None:
            digest = workers.derive(secret, memory_kib, iterations, lanes, salt, length)
            if digest is not None:
                return digest
        return _argon2id()(salt=salt, length=length, iterations=iterations, lanes=lanes,
                        memory_cost=memory_kib).derive(secret)


def hash_password(password: str, *, enforce_policy: bool = True) -> str:
    """A fresh PHC string with today's parameters; the policy is checked first.

    ``enforce_policy=False`` only for re-hashing a password that just verified: a password set
    under an older policy must keep working, not fail the login.
    """
    if enforce_policy:
        check_password_policy(password)
    salt = os.urandom(SALT_BYTES)
    digest = _derive(password, MEMORY_KIB, ITERATIONS, LANES, salt, HASH_BYTES)
    return PasswordHash(MEMORY_KIB, ITERATIONS, LANES, salt, digest).to_phc()


def verify_password(password, stored: str) -> Verification:
    """Constant-time check of ``password`` against a PHC string; ``needs_rehash`` when parameters changed.

    A stored string we cannot parse verifies as False (raises InvalidPasswordHash so the caller
    can log that the row is broken, without the row's content).
    """
    parsed = parse_phc(stored)
    given = isinstance(password, str)
    # a non-string still pays for one derivation, so a malformed body is no timing oracle
    derived = _derive(password if given else "", parsed.memory_kib, parsed.iterations, parsed.lanes, parsed.salt,
                      len(parsed.digest))
    if not (hmac.compare_digest(derived, parsed.digest) and given):
        return Verification(False)
    return Verification(True, needs_rehash=not parsed.is_current)


_dummy_lock = threading.Lock()
_dummy_hash: str | None = None


def _dummy() -> str:
    global _dummy_hash
    with _dummy_lock:
        if _dummy_hash is None:
            _dummy_hash = hash_password(secrets.token_urlsafe(24))
        return _dummy_hash


def verify_unknown_user(password) -> Verification:
    """The same Argon2 work as a real check, always False: unknown ids cost what known ones cost."""
    verify_password(password, _dummy())
    return Verification(False)


def new_temporary_password() -> str:
    """24 URL-safe characters (144 random bits): comfortably above the policy's 12."""
    return secrets.token_urlsafe(18)
