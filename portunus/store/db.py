"""The SQLite store: open (filesystem check, lock, pragmas), per-thread connections,
explicit transactions, numbered SQL migrations.

    store = Store.open(data_dir)
    with store.write() as conn:          # BEGIN IMMEDIATE … COMMIT (ROLLBACK on exception)
        conn.execute("UPDATE …", (…))
    rows = store.read().execute("SELECT …").fetchall()

Each thread gets its own connection, except inside ``pooled_connections()`` (HTTP request
threads), which borrows one from a small shared pool; the aggregate modules (clients, rules, …) are
plain functions taking the store first.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

from ..errors import PortunusError
# the filesystem check lives in filesystem.py; its names stay importable from here (doctor, tests)
from .filesystem import (ALLOW_ANY_FS_ENV, NFS_SUPER_MAGIC, RAMFS_MAGIC, TMPFS_MAGIC,  # noqa: F401
                         UNSUPPORTED_FILESYSTEMS, check_filesystem, filesystem_magic, unsupported_filesystem)
from .filesystem import nearest_existing as _nearest_existing  # noqa: F401  (doctor/server.py's name)

DB_NAME = "state.db"
LOCK_NAME = "state.db.lock"
DEFAULT_BUSY_TIMEOUT_MS = 5000
POOL_SIZE = 32
POOL_WAIT_SECS = 5.0

_MIGRATION_FILE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


# ------------------------------------------------------------------ time

def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


RFC3339_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def rfc3339(when: datetime | float) -> str:
    """The one RFC 3339 formatter (store, API, CLI): ``2026-11-22T07:00:00Z`` of a datetime or unix
    seconds, UTC, whole seconds; fixed width, so the strings also sort in time order."""
    if not isinstance(when, datetime):
        when = datetime.fromtimestamp(when, timezone.utc)
    return when.astimezone(timezone.utc).strftime(RFC3339_FORMAT)


def now_rfc3339() -> str:
    return rfc3339(utc_now())


def parse_rfc3339(text: str) -> datetime:
    return datetime.strptime(text, RFC3339_FORMAT).replace(tzinfo=timezone.utc)


# ------------------------------------------------------------------ migrations

@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """``migrations/NNN_name.sql`` shipped inside the package (works from a zipapp), in order."""
    found = []
    for name, read_text in _migration_files():
        if not name.endswith(".sql"):
            continue
        m = _MIGRATION_FILE.match(name)
        if m is None:
            raise PortunusError("internal", f"migration file {name!r} is not named NNN_lowercase_name.sql")
        found.append(Migration(int(m.group(1)), m.group(2), read_text()))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if versions != list(range(1, len(found) + 1)):
        # two branches picking the same number must fail loudly, not apply one of them silently
        raise PortunusError("internal", f"migrations must be numbered 001..N without gaps or duplicates, "
                                        f"found {versions}")
    return found


def _migration_files():
    """(name, read_text) of each file in migrations/: from the package directory when it is one on disk
    (the source tree, the zipapp's extracted site-packages), else through importlib.resources (~12 ms
    to import, so only when needed)."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
    if os.path.isdir(folder):
        def reader(path):
            def read_text() -> str:
                with open(path, encoding="utf-8") as f:
                    return f.read()
            return read_text
        return [(name, reader(os.path.join(folder, name))) for name in os.listdir(folder)]
    import importlib.resources
    root = importlib.resources.files("portunus.store").joinpath("migrations")
    return [(entry.name, lambda entry=entry: entry.read_text(encoding="utf-8")) for entry in root.iterdir()]


def split_statements(sql: str) -> list[str]:
    """Split a migration into statements, respecting quotes, comments and trigger bodies."""
    statements, start = [], 0
    for i, ch in enumerate(sql):
        if ch == ";" and sqlite3.complete_statement(sql[start:i + 1]):
            statements.append(sql[start:i + 1].strip())
            start = i + 1
    tail = "\n".join(line for line in sql[start:].splitlines() if not line.strip().startswith("--"))
    if tail.strip():
        raise PortunusError("internal", f"migration ends with an incomplete statement: {tail.strip()[:60]!r}")
    return statements


# ------------------------------------------------------------------ connections

def _is_busy(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return True
    return "database is locked" in str(e) or "database table is locked" in str(e)


class _Connection(sqlite3.Connection):
    """A connection that counts "database is locked" for portunus_store_busy_total."""

    on_busy = None

    def _count(self, e: sqlite3.Error) -> None:
        if self.on_busy is not None and _is_busy(e):
            self.on_busy()

    def execute(self, *args, **kwargs):
        try:
            return super().execute(*args, **kwargs)
        except sqlite3.OperationalError as e:
            self._count(e)
            raise

    def executemany(self, *args, **kwargs):
        try:
            return super().executemany(*args, **kwargs)
        except sqlite3.OperationalError as e:
            self._count(e)
            raise

    def executescript(self, *args, **kwargs):
        try:
            return super().executescript(*args, **kwargs)
        except sqlite3.OperationalError as e:
            self._count(e)
            raise


class Store:
    """One open data dir: holds the lock file for its whole life."""

    def __init__(self, data_dir: str, lock_fd: int, busy_timeout_ms: int):
        self.data_dir = data_dir
        self.db_path = os.path.join(data_dir, DB_NAME)
        self.lock_path = os.path.join(data_dir, LOCK_NAME)
        self._lock_fd: int | None = lock_fd
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._registry_lock = threading.Lock()
        # thread -> its connection; connections of finished threads are closed when the next one opens
        self._conns: dict[threading.Thread, sqlite3.Connection] = {}
        self._pool_cond = threading.Condition(threading.Lock())
        self._pool_all: set[sqlite3.Connection] = set()  # pooled connections, idle or lent
        self._pool_idle: list[sqlite3.Connection] = []
        self._busy = 0
        self._closed = False

    # ---------------------------------------------------------------- open / close

    @classmethod
    def open(cls, data_dir: str, *, migrate: bool = True,
             busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> "Store":
        data_dir = os.path.abspath(os.fspath(data_dir))
        check_filesystem(data_dir)
        try:
            os.makedirs(data_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise PortunusError("io_error", f"cannot create data dir {data_dir}: {e.strerror}",
                                data_dir=data_dir) from e
        if not os.path.isdir(data_dir):
            raise PortunusError("io_error", f"data dir {data_dir} is not a directory", data_dir=data_dir)
        store = cls(data_dir, acquire_lock(data_dir), busy_timeout_ms)
        try:
            store._prepare(migrate)
        except BaseException:
            store.close()
            raise
        return store

    def _prepare(self, migrate: bool) -> None:
        if not os.path.exists(self.db_path):
            # created 0600 up front: sqlite gives the -wal and -shm files the database's mode
            os.close(os.open(self.db_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        conn = self.read()
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise PortunusError("io_error", f"cannot switch {self.db_path} to WAL mode (got {mode!r})")
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                     "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")
        migrations = load_migrations()
        known = migrations[-1].version if migrations else 0
        current = self.schema_version()
        if current > known:
            raise PortunusError(
                "startup.schema_version_too_new",
                f"database schema version {current} is newer than this binary (knows up to {known})",
                schema_version=current, known_version=known)
        if migrate:
            self._migrate([m for m in migrations if m.version > current])

    def _migrate(self, pending: list[Migration]) -> None:
        conn = self.read()
        if not pending:
            return
        # off while migrating so a migration may rebuild a table (SQLite's 12-step ALTER); checked before COMMIT
        conn.execute("PRAGMA foreign_keys=OFF")
        try:
            for mig in pending:
                label = f"{mig.version:03d}_{mig.name}"
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in split_statements(mig.sql):
                        conn.execute(statement)
                    dangling = conn.execute("PRAGMA foreign_key_check").fetchall()
                    if dangling:
                        raise PortunusError("internal", f"migration {label} leaves {len(dangling)} rows with "
                                                        f"dangling foreign keys (first in table {dangling[0][0]})")
                    conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                                 (mig.version, mig.name, now_rfc3339()))
                    conn.execute("COMMIT")
                except BaseException as e:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    if isinstance(e, sqlite3.Error):
                        raise PortunusError("internal", f"migration {label} failed: {e}") from e
                    raise
        finally:
            conn.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        """Close every thread's connection and release the lock. Idempotent."""
        with self._registry_lock:
            if self._closed:
                return
            self._closed = True
            conns, self._conns = list(self._conns.values()), {}
        with self._pool_cond:
            conns += list(self._pool_all)
            self._pool_all, self._pool_idle = set(), []
            self._pool_cond.notify_all()
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        if self._lock_fd is not None:
            try:
                os.ftruncate(self._lock_fd, 0)
            except OSError:
                pass
            os.close(self._lock_fd)  # closing the only descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- connections and transactions

    def read(self) -> sqlite3.Connection:
        """This thread's connection (autocommit; inside ``write()`` it sees the open transaction).

        Inside ``pooled_connections()`` the connection is borrowed from the shared pool on first
        use and given back when the scope ends (or at ``release_thread_connection()``).
        """
        conn = getattr(self._local, "conn", None)
        if conn is not None and not self._closed:
            return conn
        if getattr(self._local, "pooled", False):
            return self._borrow()
        return self._connect()

    def _new_connection(self) -> sqlite3.Connection:
        # check_same_thread=False so close() may close a connection from another thread and pooled
        # connections may serve several threads in turn; each is used by one thread at a time
        conn = sqlite3.connect(self.db_path, timeout=self._busy_timeout_ms / 1000, isolation_level=None,
                               check_same_thread=False, factory=_Connection)
        conn.on_busy = self._note_busy
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys=ON")
        # NORMAL with WAL: a commit is in the WAL before COMMIT returns, so kill -9 never loses or
        # corrupts a committed row; only an OS crash/power cut may drop the last commits (never corrupt).
        # FULL would fsync every commit (~2 ms here), tripling rule push latency.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _connect(self) -> sqlite3.Connection:
        with self._registry_lock:
            if self._closed:
                raise PortunusError("internal", f"the store at {self.data_dir} is closed")
            for thread in [t for t in self._conns if not t.is_alive()]:
                self._conns.pop(thread).close()
            conn = self._new_connection()
            self._conns[threading.current_thread()] = conn
            self._local.conn = conn
            self._local.depth = 0
            self._local.lent = False
            return conn

    # ---- the pool for many short-lived worker threads (one per HTTP connection) ----------------
    # In WAL mode every open connection holds a shared lock on the database file, so SQLite cannot
    # really close a connection's file descriptor while another one is open: it parks it for reuse.
    # Opening a connection per HTTP thread therefore grew the fd count with every burst of
    # connections; a pool bounds the fds by POOL_SIZE whatever the number of threads.

    @contextmanager
    def pooled_connections(self) -> Iterator[None]:
        """On this thread, borrow a pooled connection at first use; give it back when the scope ends."""
        self._local.pooled = True
        try:
            yield
        finally:
            self.release_thread_connection()
            self._local.pooled = False

    def _borrow(self) -> sqlite3.Connection:
        deadline = time.monotonic() + POOL_WAIT_SECS
        create = overflow = False
        with self._pool_cond:
            while not self._closed and not self._pool_idle and len(self._pool_all) >= POOL_SIZE:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._pool_cond.wait(remaining)
            if self._closed:
                raise PortunusError("internal", f"the store at {self.data_dir} is closed")
            if self._pool_idle:
                conn = self._pool_idle.pop()
            else:
                # all POOL_SIZE lent for POOL_WAIT_SECS (e.g. pushes waiting for acks): serve anyway
                create, overflow = True, len(self._pool_all) >= POOL_SIZE
                conn = None
                if not overflow:
                    conn = self._new_connection()
                    self._pool_all.add(conn)
        if create and overflow:
            conn = self._new_connection()
        self._local.conn = conn
        self._local.depth = 0
        self._local.lent = not overflow
        return conn

    def release_thread_connection(self) -> None:
        """Give back (pooled) or close (per-thread) the calling thread's connection now.

        For a worker thread about to end, or a pooled scope that will wait a long time.
        """
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "depth", 0):
            return  # nothing open, or called inside write(): the transaction owns the connection
        self._local.conn = None
        if getattr(self._local, "lent", False):
            try:
                if conn.in_transaction:  # never hand on a connection with someone's open transaction
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            with self._pool_cond:
                if not self._closed:
                    self._pool_idle.append(conn)
                    self._pool_cond.notify()
                    return
        with self._registry_lock:
            if self._conns.get(threading.current_thread()) is conn:
                del self._conns[threading.current_thread()]
        try:
            conn.close()
        except sqlite3.Error:
            pass

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; ROLLBACK on exception. Nested calls become savepoints."""
        conn = self.read()
        depth = self._local.depth
        if depth:
            name = f"nested_{depth}"
            conn.execute(f"SAVEPOINT {name}")
            self._local.depth = depth + 1
            try:
                yield conn
            except BaseException:
                conn.execute(f"ROLLBACK TO {name}")
                conn.execute(f"RELEASE {name}")
                raise
            else:
                conn.execute(f"RELEASE {name}")
            finally:
                self._local.depth = depth
            return
        conn.execute("BEGIN IMMEDIATE")
        self._local.depth = 1
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            self._local.depth = 0

    def _note_busy(self) -> None:
        with self._registry_lock:
            self._busy += 1

    @property
    def busy_count(self) -> int:
        """How often SQLite answered "database is locked" (portunus_store_busy_total)."""
        return self._busy

    def schema_version(self) -> int:
        row = self.read().execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
        return int(row[0])


def acquire_lock(data_dir: str) -> int:
    path = os.path.join(data_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise PortunusError("io_error", f"cannot open lock file {path}: {e.strerror}", data_dir=data_dir) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_pid(fd)
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise PortunusError("io_error", f"cannot lock {path}: {e.strerror}", data_dir=data_dir) from e
        raise PortunusError("startup.store_in_use",
                            f"another portunus process (pid {holder or 'unknown'}) holds {data_dir}",
                            pid=holder, data_dir=data_dir) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
