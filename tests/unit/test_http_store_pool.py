"""The store's connection pool for HTTP request threads (issue 8 point 9): bounded, reused, closed."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from portunus.store import db


def in_thread(fn):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # surfaced below
            box["error"] = exc
    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def request(store):
    with store.pooled_connections():
        return store.read().execute("SELECT COUNT(*) FROM audit").fetchone()[0], id(store.read())


def test_request_threads_reuse_one_pooled_connection(store):
    ids = {in_thread(lambda: request(store))[1] for _ in range(20)}
    assert len(ids) == 1
    assert len(store._pool_all) == 1 and len(store._pool_idle) == 1
    assert not store._conns or threading.main_thread() in store._conns  # no per-thread leftovers


def test_nothing_is_borrowed_until_the_store_is_used(store):
    def idle():
        with store.pooled_connections():
            return len(store._pool_all)
    assert in_thread(idle) == 0


def test_the_pool_is_bounded_and_overflow_connections_are_closed(store, monkeypatch):
    monkeypatch.setattr(db, "POOL_SIZE", 2)
    monkeypatch.setattr(db, "POOL_WAIT_SECS", 0.0)
    inside = threading.Barrier(3)
    leave = threading.Barrier(3)
    seen = []

    def hold():
        with store.pooled_connections():
            conn = store.read()
            inside.wait(10)
            seen.append(conn)
            leave.wait(10)
        return conn

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(set(map(id, seen))) == 3
    assert len(store._pool_all) == 2 and len(store._pool_idle) == 2
    overflow = [c for c in seen if c not in store._pool_all]
    assert len(overflow) == 1
    with pytest.raises(sqlite3.ProgrammingError):
        overflow[0].execute("SELECT 1")


def test_a_connection_goes_back_without_an_open_transaction(store):
    def leave_open():
        with store.pooled_connections():
            store.read().execute("BEGIN")
            return store.read()
    conn = in_thread(leave_open)
    assert not conn.in_transaction


def test_release_inside_a_write_keeps_the_connection(store):
    def write_and_release():
        with store.pooled_connections():
            with store.write() as conn:
                store.release_thread_connection()
                assert store.read() is conn
                conn.execute("INSERT INTO settings (key, value) VALUES ('k', 'v')")
        return store.read().execute("SELECT value FROM settings WHERE key = 'k'").fetchone()[0]
    assert in_thread(write_and_release) == "v"


def test_close_closes_pooled_connections(store):
    conn_id = in_thread(lambda: request(store))[1]
    pooled = next(iter(store._pool_all))
    assert id(pooled) == conn_id
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        pooled.execute("SELECT 1")


def test_per_thread_connections_are_closed_on_release(store):
    def plain():
        conn = store.read()
        store.release_thread_connection()
        return conn
    conn = in_thread(plain)
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("SELECT 1")
