"""Traffic history and the counters behind it (SPEC §4.4). Plain SQL; the accounting, rollup
schedule and query rules live in ``server/traffic.py``.

Samples are per (user, client, bucket start); only buckets with traffic have a row. Buckets are
``ts`` in unix seconds: multiples of 60 in ``traffic_samples_1m``, of 3600 in ``traffic_samples_1h``.
"""

from __future__ import annotations

from .db import Store

TABLES = {"1m": "traffic_samples_1m", "1h": "traffic_samples_1h"}


# ------------------------------------------------------------------ last counters seen

def load_counters(store: Store, client_id: str) -> dict[str, tuple[int, int]]:
    rows = store.read().execute("SELECT rule_id, bytes_in, bytes_out FROM traffic_counters WHERE client_id = ?",
                                (client_id,)).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def save_counters(store: Store, client_id: str, counters: dict[str, tuple[int, int]], seen_at: int) -> None:
    with store.write() as conn:
        conn.executemany("INSERT INTO traffic_counters (client_id, rule_id, bytes_in, bytes_out, seen_at) "
                         "VALUES (?, ?, ?, ?, ?) ON CONFLICT (client_id, rule_id) DO UPDATE SET "
                         "bytes_in = excluded.bytes_in, bytes_out = excluded.bytes_out, seen_at = excluded.seen_at",
                         [(client_id, rule_id, b_in, b_out, seen_at) for rule_id, (b_in, b_out) in counters.items()])


def prune_counters(store: Store, seen_before: int) -> int:
    """Forget counters of rules that are gone and have not reported since ``seen_before``."""
    with store.write() as conn:
        return conn.execute("DELETE FROM traffic_counters WHERE seen_at < ? AND NOT EXISTS "
                            "(SELECT 1 FROM rules r WHERE r.rule_id = traffic_counters.rule_id)",
                            (seen_before,)).rowcount


# ------------------------------------------------------------------ samples

def add_samples(store: Store, bucket: str, rows: list[tuple[str, str, int, int, int]]) -> None:
    """Add (user_id, client_id, ts, bytes_in, bytes_out) onto the bucket rows (creating them)."""
    table = TABLES[bucket]
    with store.write() as conn:
        conn.executemany(f"INSERT INTO {table} (user_id, client_id, ts, bytes_in, bytes_out) VALUES (?, ?, ?, ?, ?) "
                         f"ON CONFLICT (user_id, client_id, ts) DO UPDATE SET "
                         f"bytes_in = bytes_in + excluded.bytes_in, bytes_out = bytes_out + excluded.bytes_out",
                         rows)


def roll_up_hours(store: Store, since: int, until: int) -> int:
    """Write the 1h rows of the hours in [since, until) from their 1m rows; returns rows written.

    Those hours have no 1h rows yet (``rolled_until`` tracks that), so a plain replace is exact
    and running it twice over the same hours is harmless.
    """
    with store.write() as conn:
        return conn.execute(
            "INSERT INTO traffic_samples_1h (user_id, client_id, ts, bytes_in, bytes_out) "
            "SELECT user_id, client_id, ts - ts % 3600, SUM(bytes_in), SUM(bytes_out) FROM traffic_samples_1m "
            "WHERE ts >= ? AND ts < ? GROUP BY user_id, client_id, ts - ts % 3600 "
            "ON CONFLICT (user_id, client_id, ts) DO UPDATE SET "
            "bytes_in = excluded.bytes_in, bytes_out = excluded.bytes_out",
            (since, until)).rowcount


def rolled_until(store: Store) -> int | None:
    row = store.read().execute("SELECT rolled_until FROM traffic_rollup WHERE id = 1").fetchone()
    return None if row is None else row[0]


def set_rolled_until(store: Store, hour: int) -> None:
    with store.write() as conn:
        conn.execute("INSERT INTO traffic_rollup (id, rolled_until) VALUES (1, ?) "
                     "ON CONFLICT (id) DO UPDATE SET rolled_until = excluded.rolled_until", (hour,))


def earliest_sample(store: Store, bucket: str) -> int | None:
    return store.read().execute(f"SELECT MIN(ts) FROM {TABLES[bucket]}").fetchone()[0]


def prune_samples(store: Store, bucket: str, before: int) -> int:
    with store.write() as conn:
        return conn.execute(f"DELETE FROM {TABLES[bucket]} WHERE ts < ?", (before,)).rowcount


def query_samples(store: Store, bucket: str, start: int, end: int, *, user_id: str | None = None,
                  client_id: str | None = None, limit: int) -> list[tuple[int, int, int]]:
    """(ts, bytes_in, bytes_out) per bucket in [start, end), summed over the matching pairs, oldest first."""
    where, args = ["ts >= ?", "ts < ?"], [start, end]
    if user_id is not None:
        where.append("user_id = ?")
        args.append(user_id)
    if client_id is not None:
        where.append("client_id = ?")
        args.append(client_id)
    sql = (f"SELECT ts, SUM(bytes_in), SUM(bytes_out) FROM {TABLES[bucket]} WHERE {' AND '.join(where)} "
           f"GROUP BY ts ORDER BY ts LIMIT ?")
    return [(r[0], r[1], r[2]) for r in store.read().execute(sql, (*args, limit)).fetchall()]
