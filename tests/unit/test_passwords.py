"""Argon2id password hashes as PHC strings (SPEC §5): round trip, a reference vector, strict parsing,
re-hash detection, the 12-char .. 1024-byte policy, the dummy check and the concurrency bound."""

from __future__ import annotations

import base64
import random
import threading

import pytest

from portunus.errors import PortunusError
from portunus.server import passwords
from portunus.server.passwords import InvalidPasswordHash, PasswordHash, parse_phc

GOOD = "correct horse battery staple"
# phc-winner-argon2's own test vector: argon2id, v=19, m=64 MiB, t=2, p=1, "password" / "somesalt"
REFERENCE = "$argon2id$v=19$m=65536,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc"


def test_hash_is_a_phc_string_with_owasp_parameters_that_verifies():
    phc = passwords.hash_password(GOOD)
    assert phc.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert "=" not in phc.split("$", 4)[4]  # base64 without padding
    parsed = parse_phc(phc)
    assert (parsed.memory_kib, parsed.iterations, parsed.lanes) == (19456, 2, 1)
    assert len(parsed.salt) == 16 and len(parsed.digest) == 32
    assert parsed.to_phc() == phc
    assert passwords.verify_password(GOOD, phc) == passwords.Verification(True, needs_rehash=False)
    assert passwords.verify_password(GOOD + "x", phc).ok is False
    assert passwords.verify_password(GOOD.upper(), phc).ok is False


def test_two_hashes_of_one_password_differ_by_salt():
    a, b = passwords.hash_password(GOOD), passwords.hash_password(GOOD)
    assert a != b
    assert passwords.verify_password(GOOD, a).ok and passwords.verify_password(GOOD, b).ok


def test_reference_vector_verifies_and_asks_for_a_rehash():
    parsed = parse_phc(REFERENCE)
    assert parsed.salt == b"somesalt"
    assert parsed.digest.hex() == "09316115d5cf24ed5a15a31a3ba326e5cf32edc24702987c02b6566f61913cf7"
    result = passwords.verify_password("password", REFERENCE)
    assert result.ok is True
    assert result.needs_rehash is True  # m=64 MiB, 8-byte salt: not today's parameters
    assert passwords.verify_password("passwore", REFERENCE).ok is False


@pytest.mark.parametrize("field,value", [("memory_kib", 65536), ("iterations", 3), ("lanes", 2)])
def test_changed_parameters_are_detected(field, value):
    current = parse_phc(passwords.hash_password(GOOD))
    other = PasswordHash(**{**current.__dict__, field: value})
    assert other.is_current is False
    assert current.is_current is True


def test_non_string_passwords_never_verify():
    phc = passwords.hash_password(GOOD)
    for bogus in (None, 12345678901234, b"correct horse battery staple", ["x"]):
        assert passwords.verify_password(bogus, phc).ok is False


# ------------------------------------------------------------------ parsing is strict

BAD_PHC = [
    "",
    "argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
    "$argon2i$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
    "$argon2d$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
    "$argon2id$v=16$m=19456,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
    "$argon2id$m=19456,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
    "$argon2id$v=19$t=2,m=19456,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
    "$argon2id$v=19$m=019456,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",  # leading zero
    "$argon2id$v=19$m=19456,t=0,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
    "$argon2id$v=19$m=19456,t=2,p=0$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
    "$argon2id$v=19$m=7,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
    "$argon2id$v=19$m=99999999,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
    "$argon2id$v=19$m=19456,t=99,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ=$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",  # padding
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPd",  # trailing bits
    "$argon2id$v=19$m=19456,t=2,p=1$c29t$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",  # 3-byte salt
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$CT",  # 1-byte hash
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$C",  # impossible base64 length
    "$argon2id$v=19$m=19456,t=2,p=1$c29t-XNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",  # urlsafe alphabet
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc$",
    "$argon2id$v=19$m=19456,t=2,p=1,keyid=x$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
    " $argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc\n",
    "$argon2id$v=19$m=١٩٤٥٦,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",  # non-ASCII digits
]


@pytest.mark.parametrize("text", BAD_PHC)
def test_malformed_phc_strings_are_refused(text):
    with pytest.raises(InvalidPasswordHash):
        parse_phc(text)
    with pytest.raises(InvalidPasswordHash):
        passwords.verify_password(GOOD, text)


@pytest.mark.parametrize("value", [None, 42, b"$argon2id$"])
def test_non_string_hashes_are_refused(value):
    with pytest.raises(InvalidPasswordHash):
        parse_phc(value)


def test_fuzzed_mutations_either_parse_to_a_valid_hash_or_raise_invalid():
    rng = random.Random(20261201)
    base = passwords.hash_password(GOOD)
    alphabet = "$=,+/0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_ \x00é"
    refused = 0
    for _ in range(3000):
        chars = list(base)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(chars) + 1)
            if op < 0.4 and chars:
                chars[min(pos, len(chars) - 1)] = rng.choice(alphabet)
            elif op < 0.7:
                chars.insert(pos, rng.choice(alphabet))
            elif chars:
                del chars[min(pos, len(chars) - 1)]
        text = "".join(chars)
        try:
            parsed = parse_phc(text)
        except InvalidPasswordHash as exc:
            refused += 1
            assert text not in str(exc) or not text  # the message never echoes the stored string
            continue
        # whatever parses is canonical: it re-encodes to exactly the same text
        assert parsed.to_phc() == text
    assert refused > 1000


def test_parse_error_messages_never_contain_the_hash():
    digest = base64.b64encode(b"\x01" * 32).decode().rstrip("=")
    text = "$argon2id$v=19$m=19456,t=2,p=1$$" + digest
    with pytest.raises(InvalidPasswordHash) as ei:
        parse_phc(text)
    assert digest not in str(ei.value)


# ------------------------------------------------------------------ policy

@pytest.mark.parametrize("password,code", [
    ("a" * 11, "password_too_short"),
    ("", "password_too_short"),
    ("é" * 11, "password_too_short"),
    ("a" * 1025, "password_too_long"),
    ("é" * 513, "password_too_long"),  # 513 characters, 1026 bytes
])
def test_policy_refuses_short_and_long_passwords_without_echoing_them(password, code):
    with pytest.raises(PortunusError) as ei:
        passwords.hash_password(password)
    assert ei.value.code == code
    assert ei.value.http_status == 422
    if password:
        assert password not in ei.value.message
    assert ("12" in ei.value.message) if code == "password_too_short" else ("1024" in ei.value.message)


@pytest.mark.parametrize("password", ["a" * 12, "é" * 12, "a" * 1024, "é" * 512, "пароль-длинный"])
def test_policy_accepts_12_characters_up_to_1024_bytes(password):
    passwords.check_password_policy(password)
    assert passwords.verify_password(password, passwords.hash_password(password)).ok


def test_non_string_password_is_a_validation_error():
    with pytest.raises(PortunusError) as ei:
        passwords.check_password_policy(123456789012)
    assert ei.value.code == "validation.invalid_password"


def test_temporary_passwords_pass_the_policy_and_are_unique():
    seen = {passwords.new_temporary_password() for _ in range(50)}
    assert len(seen) == 50
    for p in seen:
        passwords.check_password_policy(p)


def test_unknown_user_check_is_always_false_and_does_the_same_work(monkeypatch):
    calls = []
    real = passwords._derive

    def counting(*args):
        calls.append(args[1:4])
        return real(*args)

    monkeypatch.setattr(passwords, "_derive", counting)
    phc = passwords.hash_password(GOOD)
    calls.clear()
    passwords.verify_password(GOOD, phc)
    known = list(calls)
    calls.clear()
    assert passwords.verify_unknown_user(GOOD) == passwords.Verification(False)
    assert passwords.verify_unknown_user(None).ok is False
    assert calls[-1] == known[0] == (passwords.MEMORY_KIB, passwords.ITERATIONS, passwords.LANES)


def test_at_most_two_hash_computations_run_at_once(monkeypatch):
    threads_n = 8
    inside, peak, arrived, lock = [0], [0], [0], threading.Lock()
    two_inside, all_arrived, gate = threading.Event(), threading.Event(), threading.Event()
    real_slots = passwords._hash_slots

    class CountingSlots:
        """The module's own semaphore, counting who reached it."""

        def __enter__(self):
            with lock:
                arrived[0] += 1
                if arrived[0] == threads_n:
                    all_arrived.set()
            return real_slots.__enter__()

        def __exit__(self, *exc):
            return real_slots.__exit__(*exc)

    class BlockingArgon2:
        def __init__(self, **kw):
            pass

        def derive(self, secret):
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
                if inside[0] == 2:
                    two_inside.set()
            gate.wait(10)
            with lock:
                inside[0] -= 1
            return b"\0" * 32

    monkeypatch.setattr(passwords, "_hash_slots", CountingSlots())
    monkeypatch.setattr(passwords, "Argon2id", BlockingArgon2)
    threads = [threading.Thread(target=passwords.hash_password, args=(GOOD,)) for _ in range(threads_n)]
    for t in threads:
        t.start()
    assert all_arrived.wait(10) and two_inside.wait(10)
    with lock:
        assert inside[0] == 2  # six threads queue on the semaphore while two compute
    gate.set()
    for t in threads:
        t.join(10)
    assert peak[0] == passwords.MAX_CONCURRENT_HASHES == 2
