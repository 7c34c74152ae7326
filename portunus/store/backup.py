"""Backup, restore and reset of a data dir's database, and the offline open they share (SPEC §4.2).

Backup works beside a running server (the online backup API sees committed WAL
content). Restore and reset hold the store lock, so they refuse with
``store_in_use`` while ``serve`` runs. Restore works on staged copies: the
input file is never opened by SQLite (which would leave ``-wal``/``-shm`` next
to it), and any failure leaves the live database untouched.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
import urllib.parse

from ..errors import PortunusError
from . import db as store_db
from .db import Store

SQLITE_HEADER = b"SQLite format 3\x00"
DB_NAME = "state.db"
SIDE_FILES = ("", "-wal", "-shm")
PRE_RESTORE = ".pre-restore"

# offline commands report the store refusals without serve's `startup.` prefix (SPEC §4.2, §7.2)
_OFFLINE_CODES = {"startup.store_in_use": "store_in_use",
                  "startup.schema_version_too_new": "schema_version_too_new"}


def _offline(exc: PortunusError) -> PortunusError:
    if exc.code in _OFFLINE_CODES:
        return PortunusError(_OFFLINE_CODES[exc.code], exc.message, **exc.fields)
    return exc


def open_offline(data_dir: str, **kw) -> Store:
    """Store.open for a command run beside (not as) the server."""
    try:
        return Store.open(data_dir, **kw)
    except PortunusError as exc:
        raise _offline(exc) from None


def hold_lock(data_dir: str) -> int:
    """The data dir's store lock, without opening the database."""
    store_db.check_filesystem(data_dir)
    try:
        return store_db.acquire_lock(data_dir)
    except PortunusError as exc:
        raise _offline(exc) from None


def release_lock(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # no stale holder pid, as Store.close leaves it
    except OSError:
        pass
    os.close(fd)


def check_sqlite_header(path: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise PortunusError("io_error", f"cannot read {path}: {exc.strerror}") from None
    if head != SQLITE_HEADER:
        raise PortunusError("validation.not_a_database", f"{path} is not a SQLite database")


def read_only_uri(path: str) -> str:
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"


class ReadOnlyStore:
    """Just enough of a Store for read-only queries beside a running serve (WAL lets a reader in)."""

    def __init__(self, data_dir: str):
        db_path = os.path.join(data_dir, DB_NAME)
        if not os.path.exists(db_path):
            raise PortunusError("not_found", f"no database at {db_path}")
        self.conn = sqlite3.connect(read_only_uri(db_path), uri=True, timeout=10)
        self.conn.row_factory = sqlite3.Row

    def read(self) -> sqlite3.Connection:
        return self.conn

    def close(self) -> None:
        self.conn.close()


# ------------------------------------------------------------------ backup

def backup(data_dir: str, out: str, now=time.time) -> str:
    """Copy the live database to ``out`` (a new file, or a directory to name one in); returns the path."""
    db_path = os.path.join(data_dir, DB_NAME)
    if not os.path.exists(db_path):
        raise PortunusError("not_found", f"no database at {db_path}")
    if os.path.isdir(out):
        out = os.path.join(out, time.strftime("portunus-backup-%Y%m%dT%H%M%SZ.db", time.gmtime(now())))
    if os.path.exists(out):
        raise PortunusError("conflict.backup_exists", f"{out} already exists; refusing to overwrite")
    tmp = out + ".partial"
    try:
        _sqlite_copy(sqlite3.connect(read_only_uri(db_path), uri=True, timeout=10), tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, out)
    except (sqlite3.Error, OSError) as exc:
        _unlink(tmp)
        raise PortunusError("io_error", f"cannot write the backup {out}: {exc}") from None
    return out


def _sqlite_copy(src: sqlite3.Connection, dst_path: str) -> None:
    try:
        dst = sqlite3.connect(dst_path)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


# ------------------------------------------------------------------ restore

def restore(data_dir: str, source: str, *, force: bool = False) -> str:
    """Replace (with ``force``) or create the data dir's database from a backup; returns the db path."""
    check_sqlite_header(source)
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    db_path = os.path.join(data_dir, DB_NAME)
    lock_fd = hold_lock(data_dir)  # held until the new database is in place
    try:
        if os.path.exists(db_path) and not force:
            raise PortunusError("conflict.data_dir_not_empty",
                                f"{db_path} exists; pass --force to replace it (a copy is kept as "
                                f"{DB_NAME}{PRE_RESTORE})")
        staged = _stage(data_dir, source)
        if os.path.exists(db_path):
            # the kept copy takes its WAL along: committed rows there are part of it
            os.replace(db_path, db_path + PRE_RESTORE)
            _unlink(db_path + PRE_RESTORE + "-wal")
            if os.path.exists(db_path + "-wal"):
                os.replace(db_path + "-wal", db_path + PRE_RESTORE + "-wal")
            _unlink(db_path + "-shm")
        os.replace(staged, db_path)
        shutil.rmtree(os.path.dirname(staged), ignore_errors=True)
    finally:
        release_lock(lock_fd)
    return db_path


def _stage(data_dir: str, source: str) -> str:
    """A migrated copy of ``source`` in a staging dir of ``data_dir``; returns its path."""
    stage_dir = os.path.join(data_dir, DB_NAME + ".restoring.d")
    source_copy = os.path.join(data_dir, DB_NAME + ".restore-source")
    staged = os.path.join(stage_dir, DB_NAME)
    shutil.rmtree(stage_dir, ignore_errors=True)
    _unlink_all(source_copy)
    os.makedirs(stage_dir, mode=0o700)
    try:
        try:
            # SQLite opens a copy, never the input: opening a WAL-mode file leaves -wal/-shm beside it
            _copy_with_wal(source, source_copy)
            _sqlite_copy(sqlite3.connect(source_copy), staged)
        except sqlite3.Error as exc:
            raise PortunusError("validation.not_a_database",
                                f"{source} is not a readable SQLite database: {exc}") from None
        except OSError as exc:
            raise PortunusError("io_error", f"cannot copy {source} into {data_dir}: {exc}") from None
        finally:
            _unlink_all(source_copy)
        open_offline(stage_dir).close()  # migrates it, or refuses a newer schema
    except BaseException:
        shutil.rmtree(stage_dir, ignore_errors=True)
        raise
    return staged


def _copy_with_wal(src: str, dst: str) -> None:
    """The database file and, when one sits beside it, its committed-but-not-checkpointed WAL."""
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o600)
    if os.path.exists(src + "-wal"):
        shutil.copyfile(src + "-wal", dst + "-wal")
        os.chmod(dst + "-wal", 0o600)


# ------------------------------------------------------------------ reset

def database_files(data_dir: str) -> list[str]:
    """The database and its WAL side files that exist (what reset removes); checks it is a database."""
    db_path = os.path.join(data_dir, DB_NAME)
    if not os.path.exists(db_path):
        return []
    check_sqlite_header(db_path)
    return [db_path + s for s in SIDE_FILES if os.path.exists(db_path + s)]


def reset(data_dir: str) -> list[str]:
    """Remove the database (certificates and server.toml stay); returns the removed files."""
    lock_fd = hold_lock(data_dir)  # refuses while serve runs; held while removing
    try:
        files = database_files(data_dir)
        for path in files:
            _unlink(path)
    finally:
        release_lock(lock_fd)
    return files


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _unlink_all(path: str) -> None:
    for suffix in SIDE_FILES:
        _unlink(path + suffix)
