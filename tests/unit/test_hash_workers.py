"""Argon2id in child processes (server/hashworkers.py): the same digests as in-process, a dead child is
replaced at the next hash, an unusable child command falls back to in-process hashing, and
stop() ends the children. (The point of it, the GIL left free during a login flood, is measured
by bench/identity.py, not asserted here.)"""

from __future__ import annotations

import os
import signal

import pytest
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from portunus.server import passwords
from portunus.server.hashworkers import HashWorkers

SALT = b"0123456789abcdef"
ARGS = (passwords.MEMORY_KIB, passwords.ITERATIONS, passwords.LANES, SALT, passwords.HASH_BYTES)


def local(secret: bytes) -> bytes:
    return Argon2id(salt=SALT, length=passwords.HASH_BYTES, iterations=passwords.ITERATIONS,
                    lanes=passwords.LANES, memory_cost=passwords.MEMORY_KIB).derive(secret)


@pytest.fixture
def workers():
    w = HashWorkers(2)
    yield w
    w.stop()


def test_a_child_computes_the_same_digest(workers):
    for secret in (b"correct horse battery", "pässwörd ✓".encode(), b"\x00 and newline \n inside"):
        assert workers.derive(secret, *ARGS) == local(secret)


def test_a_killed_child_is_replaced_at_the_next_hash(workers):
    assert workers.derive(b"first password", *ARGS) == local(b"first password")
    child = workers._idle[0]
    os.kill(child.proc.pid, signal.SIGKILL)
    child.proc.wait(5)
    assert workers.derive(b"second password", *ARGS) == local(b"second password")
    assert workers._idle and workers._idle[0] is not child


def test_a_bad_request_is_refused_and_the_child_keeps_serving(workers):
    assert workers.derive(b"x", 7, 1, 1, SALT, 32) is None  # memory below 8 * lanes KiB: Argon2 refuses
    assert workers.derive(b"still works", *ARGS) == local(b"still works")


def test_an_unusable_child_command_means_in_process_hashing(tmp_path):
    broken = HashWorkers(1, argv=[str(tmp_path / "no-such-python")])
    try:
        assert broken.derive(b"anything", *ARGS) is None
    finally:
        broken.stop()
    dead = HashWorkers(1, argv=["/bin/false"])
    try:
        assert dead.derive(b"anything", *ARGS) is None
    finally:
        dead.stop()


def test_passwords_use_the_workers_once_started():
    passwords.start_hash_workers()
    try:
        stored = passwords.hash_password("worker password 01")
        assert passwords.verify_password("worker password 01", stored).ok
        assert not passwords.verify_password("worker password 02", stored).ok
        assert passwords._workers._idle, "the hash ran in a child"
    finally:
        passwords.stop_hash_workers()
    assert passwords._workers is None
    assert passwords.verify_password("worker password 01", stored).ok  # and in-process again


def test_stop_ends_the_children():
    w = HashWorkers(1)
    assert w.derive(b"pw", *ARGS) is not None
    child = w._idle[0]
    w.stop()
    assert child.proc.poll() is not None
    assert w.derive(b"pw", *ARGS) is None
