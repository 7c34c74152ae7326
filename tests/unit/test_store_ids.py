"""ULIDs, tokens, enrollment codes and their hashes."""

from __future__ import annotations

import re
import string
import threading
import time

import pytest

from portunus.store import ids
from portunus.store.ids import (
    CROCKFORD,
    hash_token,
    is_ulid,
    new_code,
    new_token,
    new_ulid,
    normalize_code,
    ulid_ms,
)


def test_ulid_format():
    u = new_ulid()
    assert len(u) == 26
    assert set(u) <= set(CROCKFORD)
    assert u[0] in "01234567"  # fits 128 bits
    assert is_ulid(u)


def test_ulid_carries_the_current_millisecond():
    before = time.time_ns() // 1_000_000
    u = new_ulid()
    after = time.time_ns() // 1_000_000
    assert before <= ulid_ms(u) <= after + 1


def test_ulids_strictly_increase_within_the_process():
    seq = [new_ulid() for _ in range(20000)]
    assert seq == sorted(seq)
    assert len(set(seq)) == len(seq)


def test_ulids_stay_monotonic_when_the_clock_stands_still_or_steps_back(monkeypatch):
    clock = {"ns": 1_900_000_000_000 * 1_000_000}
    monkeypatch.setattr(ids.time, "time_ns", lambda: clock["ns"])
    a = new_ulid()
    b = new_ulid()
    clock["ns"] -= 5_000 * 1_000_000  # NTP steps the clock back five seconds
    c = new_ulid()
    assert a < b < c
    assert ulid_ms(a) == ulid_ms(b) == ulid_ms(c)


def test_random_part_overflow_moves_to_the_next_millisecond(monkeypatch):
    monkeypatch.setattr(ids.time, "time_ns", lambda: 1_900_000_000_000 * 1_000_000)
    a = new_ulid()
    monkeypatch.setattr(ids, "_last_rand", (1 << 80) - 1)
    b = new_ulid()
    assert b > a
    assert ulid_ms(b) == ulid_ms(a) + 1


def test_ulids_from_many_threads_are_unique():
    out: list[list[str]] = []
    lock = threading.Lock()

    def worker():
        mine = [new_ulid() for _ in range(2000)]
        with lock:
            out.append(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [u for mine in out for u in mine]
    assert len(set(every)) == len(every) == 16000
    for mine in out:
        assert mine == sorted(mine)


@pytest.mark.parametrize("value,ok", [
    ("01ARZ3NDEKTSV4RRFFQ69G5FAV", True),
    ("01arz3ndektsv4rrffq69g5fav", True),   # Crockford is case-insensitive
    ("7ZZZZZZZZZZZZZZZZZZZZZZZZZ", True),
    ("8ZZZZZZZZZZZZZZZZZZZZZZZZZ", False),  # over 128 bits
    ("01ARZ3NDEKTSV4RRFFQ69G5FA", False),   # 25 chars
    ("01ARZ3NDEKTSV4RRFFQ69G5FAVX", False),
    ("01ARZ3NDEKTSV4RRFFQ69G5FAU", False),  # U is not Crockford
    ("01ARZ3NDEKTSV4RRFFQ69G5FAI", False),
    ("", False),
    (None, False),
    (123, False),
    ("edge-1", False),
])
def test_is_ulid(value, ok):
    assert is_ulid(value) is ok


def test_tokens_are_43_url_safe_chars_and_distinct():
    alphabet = set(string.ascii_letters + string.digits + "-_")
    tokens = {new_token() for _ in range(500)}
    assert len(tokens) == 500
    for t in tokens:
        assert len(t) == 43
        assert set(t) <= alphabet
        assert "=" not in t


def test_hash_token_is_sha256_hex_and_deterministic():
    t = new_token()
    h = hash_token(t)
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert hash_token(t) == h
    assert hash_token(t + "x") != h
    assert hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_enrollment_codes_are_crockford_and_distinct():
    codes = {new_code() for _ in range(500)}
    assert len(codes) == 500
    for c in codes:
        assert len(c) == 20
        assert set(c) <= set(CROCKFORD)
        assert normalize_code(c) == c


def test_normalize_code_applies_crockford_decoding():
    assert normalize_code(" abcd-efgh ") == "ABCDEFGH"
    assert normalize_code("ilo") == "110"
