"""The SQLite store (SPEC §4.2): filesystem refusal, the lock, pragmas, transactions,
migrations, schema-too-new, durability across kill -9. Real files in tmp_path."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from portunus.errors import PortunusError
from portunus.store import Store, db, filesystem
from portunus.store.db import (
    ALLOW_ANY_FS_ENV,
    NFS_SUPER_MAGIC,
    RAMFS_MAGIC,
    TMPFS_MAGIC,
    Migration,
    filesystem_magic,
    load_migrations,
    split_statements,
    unsupported_filesystem,
)

ROOT = Path(__file__).resolve().parents[2]
TABLES_001 = {"clients", "client_tokens", "enrollments", "rules", "rule_targets", "users",
              "operator_tokens", "settings", "audit"}


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> str:
    # the filesystem refusal has its own tests; everything else runs wherever tmp_path lives
    monkeypatch.setenv(ALLOW_ANY_FS_ENV, "1")
    return str(tmp_path / "data")


@pytest.fixture
def store(data_dir):
    s = Store.open(data_dir)
    yield s
    s.close()


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env[ALLOW_ANY_FS_ENV] = "1"
    return env


def run_child(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=child_env(), cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60, **kw)


LATEST = len(load_migrations())  # the newest shipped schema version


def tables(conn) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


# ------------------------------------------------------------------ open, migrations

def test_open_creates_a_private_data_dir_and_applies_the_migrations(store, data_dir):
    assert os.path.isdir(data_dir)
    assert os.stat(data_dir).st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(data_dir, "state.db")).st_mode & 0o077 == 0
    assert store.schema_version() == LATEST
    assert TABLES_001 <= tables(store.read())
    rows = store.read().execute("SELECT version, name, applied_at FROM schema_migrations").fetchall()
    assert [(r[0], r[1]) for r in rows] == [(m.version, m.name) for m in load_migrations()]
    assert rows[0][1] == "initial"
    assert rows[0][2].endswith("Z")


def test_reopening_applies_nothing_twice_and_keeps_data(data_dir):
    with Store.open(data_dir) as s:
        with s.write() as conn:
            conn.execute("INSERT INTO settings (key, value) VALUES ('k', 'v')")
    for _ in range(2):
        with Store.open(data_dir) as s:
            assert s.schema_version() == LATEST
            assert s.read().execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == LATEST
            assert s.read().execute("SELECT value FROM settings WHERE key = 'k'").fetchone()[0] == "v"


def test_migrate_false_opens_without_migrating(data_dir):
    with Store.open(data_dir, migrate=False) as s:
        assert s.schema_version() == 0
        assert "clients" not in tables(s.read())
    with Store.open(data_dir) as s:
        assert s.schema_version() == LATEST


def test_an_existing_data_dir_keeps_its_mode(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_ANY_FS_ENV, "1")
    d = tmp_path / "existing"
    d.mkdir(mode=0o750)
    os.chmod(d, 0o750)
    with Store.open(str(d)):
        pass
    assert os.stat(d).st_mode & 0o777 == 0o750


def test_a_data_dir_that_is_a_file_is_an_io_error(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_ANY_FS_ENV, "1")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(PortunusError) as ei:
        Store.open(str(f))
    assert ei.value.code == "io_error"
    assert str(f) in ei.value.message


def test_schema_newer_than_the_binary_is_refused_with_exit_78(data_dir):
    with Store.open(data_dir) as s:
        with s.write() as conn:
            conn.execute("INSERT INTO schema_migrations VALUES (999, 'from_the_future', '2030-01-01T00:00:00Z')")
    for migrate in (True, False):
        with pytest.raises(PortunusError) as ei:
            Store.open(data_dir, migrate=migrate)
        e = ei.value
        assert e.code == "startup.schema_version_too_new"
        assert e.exit_code == 78
        assert e.message == f"database schema version 999 is newer than this binary (knows up to {LATEST})"
        assert e.fields == {"schema_version": 999, "known_version": LATEST}
    # the refusal released the lock
    fd = os.open(os.path.join(data_dir, "state.db.lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def _with_extra(monkeypatch, *extra: Migration) -> None:
    shipped = load_migrations()
    monkeypatch.setattr(db, "load_migrations", lambda: shipped + list(extra))


def test_a_failing_migration_rolls_back_entirely_and_is_not_recorded(data_dir, monkeypatch):
    with Store.open(data_dir):
        pass
    _with_extra(monkeypatch, Migration(LATEST + 1, "broken", "CREATE TABLE half_done (a INTEGER);\n"
                                                    "INSERT INTO no_such_table VALUES (1);\n"))
    with pytest.raises(PortunusError) as ei:
        Store.open(data_dir)
    assert ei.value.code == "internal"
    assert f"{LATEST + 1:03d}_broken" in ei.value.message
    monkeypatch.undo()
    monkeypatch.setenv(ALLOW_ANY_FS_ENV, "1")
    with Store.open(data_dir) as s:
        assert s.schema_version() == LATEST
        assert "half_done" not in tables(s.read())


def test_new_migrations_apply_in_order_on_an_existing_store(data_dir, monkeypatch):
    with Store.open(data_dir) as s:
        with s.write() as conn:
            conn.execute("INSERT INTO settings (key, value) VALUES ('a', '1')")
    _with_extra(monkeypatch,
                Migration(LATEST + 1, "add_notes", "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);"),
                Migration(LATEST + 2, "seed_notes", "INSERT INTO notes (body) SELECT value FROM settings;"))
    with Store.open(data_dir) as s:
        assert s.schema_version() == LATEST + 2
        assert s.read().execute("SELECT body FROM notes").fetchall()[0][0] == "1"
        names = [r[0] for r in s.read().execute("SELECT name FROM schema_migrations ORDER BY version")]
        assert names == [m.name for m in load_migrations()] + ["add_notes", "seed_notes"]
    # the binary without the two extra migrations now meets a newer database
    monkeypatch.undo()
    monkeypatch.setenv(ALLOW_ANY_FS_ENV, "1")
    with pytest.raises(PortunusError) as ei:
        Store.open(data_dir)
    assert f"version {LATEST + 2} is newer than this binary (knows up to {LATEST})" in ei.value.message


def test_a_migration_leaving_dangling_foreign_keys_is_refused(data_dir, monkeypatch):
    _with_extra(monkeypatch, Migration(LATEST + 1, "orphan", "INSERT INTO client_tokens VALUES ('h', 'nobody', 't', NULL);"))
    with pytest.raises(PortunusError) as ei:
        Store.open(data_dir)
    assert f"{LATEST + 1:03d}_orphan" in ei.value.message and "foreign key" in ei.value.message


def test_shipped_migrations_are_numbered_from_one_without_gaps():
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "initial"
    for m in migrations:
        assert split_statements(m.sql)  # each one parses into statements


def test_split_statements_respects_strings_comments_and_triggers():
    sql = """
    -- a comment; with a semicolon
    CREATE TABLE t (a TEXT DEFAULT 'x;y');
    CREATE TRIGGER tr AFTER INSERT ON t BEGIN
        UPDATE t SET a = 'z;' WHERE a = 'q';
        DELETE FROM t WHERE a = 'w';
    END;
    INSERT INTO t VALUES ('semi;colon'); -- trailing comment
    -- final comment
    """
    parts = split_statements(sql)
    assert len(parts) == 3
    assert parts[1].startswith("CREATE TRIGGER") and parts[1].endswith("END;")
    conn = sqlite3.connect(":memory:")
    for p in parts:
        conn.execute(p)
    assert conn.execute("SELECT a FROM t").fetchall() == [("semi;colon",)]


def test_split_statements_refuses_an_unterminated_statement():
    with pytest.raises(PortunusError) as ei:
        split_statements("CREATE TABLE a (x);\nCREATE TABLE b (y)")
    assert "incomplete statement" in ei.value.message


# ------------------------------------------------------------------ pragmas, connections, transactions

def test_every_thread_gets_its_own_connection_with_the_durable_pragmas(store):
    def pragmas(conn):
        return tuple(conn.execute(f"PRAGMA {p}").fetchone()[0]
                     for p in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout"))

    main = store.read()
    assert store.read() is main
    assert pragmas(main) == ("wal", 1, 1, 5000)  # synchronous 1 = NORMAL (WAL: kill -9 safe)
    seen = {}

    def worker():
        seen["conn"] = store.read()
        seen["pragmas"] = pragmas(seen["conn"])

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["conn"] is not main
    assert seen["pragmas"] == ("wal", 1, 1, 5000)


def test_write_commits_and_is_visible_to_other_threads(store):
    with store.write() as conn:
        conn.execute("INSERT INTO settings VALUES ('k', 'v')")
    out = []
    t = threading.Thread(target=lambda: out.append(
        store.read().execute("SELECT value FROM settings WHERE key = 'k'").fetchone()[0]))
    t.start()
    t.join()
    assert out == ["v"]


def test_write_rolls_back_on_exception(store):
    with pytest.raises(RuntimeError):
        with store.write() as conn:
            conn.execute("INSERT INTO settings VALUES ('k', 'v')")
            raise RuntimeError("boom")
    assert store.read().execute("SELECT COUNT(*) FROM settings").fetchone()[0] == 0
    assert not store.read().in_transaction
    with store.write() as conn:  # the connection is usable again
        conn.execute("INSERT INTO settings VALUES ('k', 'v2')")
    assert store.read().execute("SELECT value FROM settings").fetchone()[0] == "v2"


def test_nested_write_is_a_savepoint(store):
    with store.write() as conn:
        conn.execute("INSERT INTO settings VALUES ('outer', '1')")
        with pytest.raises(ValueError):
            with store.write() as inner:
                inner.execute("INSERT INTO settings VALUES ('inner', '1')")
                raise ValueError("inner fails")
        with store.write() as inner:
            inner.execute("INSERT INTO settings VALUES ('inner2', '1')")
    keys = {r[0] for r in store.read().execute("SELECT key FROM settings")}
    assert keys == {"outer", "inner2"}


def test_foreign_keys_are_enforced(store):
    with pytest.raises(sqlite3.IntegrityError):
        with store.write() as conn:
            conn.execute("INSERT INTO client_tokens VALUES ('h', 'no-such-client', 't', NULL)")


def test_database_is_locked_is_counted(data_dir):
    with Store.open(data_dir, busy_timeout_ms=50) as s:
        assert s.busy_count == 0
        other = sqlite3.connect(os.path.join(data_dir, "state.db"), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                with s.write():
                    pass
            assert s.busy_count == 1
        finally:
            other.execute("ROLLBACK")
            other.close()
        with s.write() as conn:
            conn.execute("INSERT INTO settings VALUES ('k', 'v')")
        assert s.busy_count == 1


def test_connections_of_finished_threads_are_closed(store):
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    store.read()
    before = open_fds()
    for _ in range(40):
        t = threading.Thread(target=lambda: store.read().execute("SELECT 1").fetchone())
        t.start()
        t.join()
    # one connection (db + wal files) may stay for the last finished thread, not forty
    assert open_fds() - before < 10


def test_close_is_idempotent_and_a_closed_store_refuses_use(data_dir):
    s = Store.open(data_dir)
    s.close()
    s.close()
    with pytest.raises(PortunusError):
        s.read()
    with pytest.raises(PortunusError):
        with s.write():
            pass


# ------------------------------------------------------------------ the lock

def test_a_second_open_in_the_same_process_is_store_in_use(store, data_dir):
    with pytest.raises(PortunusError) as ei:
        Store.open(data_dir)
    e = ei.value
    assert e.code == "startup.store_in_use"
    assert e.exit_code == 75
    assert e.message == f"another portunus process (pid {os.getpid()}) holds {data_dir}"
    assert e.fields["pid"] == os.getpid()
    # the refused open did not disturb the holder
    with store.write() as conn:
        conn.execute("INSERT INTO settings VALUES ('still', 'mine')")


def test_the_lock_file_names_the_holder_and_is_released_on_close(data_dir):
    s = Store.open(data_dir)
    with open(os.path.join(data_dir, "state.db.lock")) as f:
        assert f.read().strip() == str(os.getpid())
    s.close()
    with Store.open(data_dir) as again:
        assert again.schema_version() == LATEST


def test_another_process_is_refused_while_this_one_holds_the_store(store, data_dir):
    res = run_child(f"""
        import sys
        from portunus.errors import PortunusError
        from portunus.store import Store
        try:
            Store.open({data_dir!r})
        except PortunusError as e:
            print(e.code)
            print(e.message)
            sys.exit(e.exit_code)
        sys.exit(0)
    """)
    assert res.returncode == 75, res.stderr
    code, message = res.stdout.splitlines()[:2]
    assert code == "startup.store_in_use"
    assert message == f"another portunus process (pid {os.getpid()}) holds {data_dir}"


def spawn(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=child_env(), cwd=str(ROOT),
                            stdout=subprocess.PIPE, text=True, **kw)


def test_a_store_held_by_another_process_is_refused_here_naming_its_pid(data_dir):
    with spawn(f"""
        import sys
        from portunus.store import Store
        s = Store.open({data_dir!r})
        print("ready", flush=True)
        sys.stdin.read()
        s.close()
    """, stdin=subprocess.PIPE) as child:
        try:
            assert child.stdout.readline().strip() == "ready"
            with pytest.raises(PortunusError) as ei:
                Store.open(data_dir)
            assert ei.value.code == "startup.store_in_use"
            assert ei.value.fields["pid"] == child.pid
            assert f"(pid {child.pid})" in ei.value.message
            child.stdin.close()
            assert child.wait(30) == 0
        finally:
            if child.poll() is None:
                child.kill()
    with Store.open(data_dir) as s:
        assert s.schema_version() == LATEST


def test_kill_9_never_loses_a_committed_row(data_dir):
    with Store.open(data_dir):
        pass
    committed = []
    with spawn(f"""
        from portunus.store import Store, clients
        s = Store.open({data_dir!r})
        i = 0
        while True:
            c = clients.create_client(s, f"edge-{{i}}")
            print(c["client_id"], flush=True)   # printed only after COMMIT returned
            i += 1
    """) as child:
        try:
            while len(committed) < 200:
                line = child.stdout.readline()
                assert line, "writer exited early"
                committed.append(line.strip())
            child.send_signal(signal.SIGKILL)
            assert child.wait(30) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
    # the kernel dropped the dead process's flock; the store opens and every committed row is there
    with Store.open(data_dir) as s:
        assert s.read().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {r[0] for r in s.read().execute("SELECT client_id FROM clients")}
        assert set(committed) <= ids


# ------------------------------------------------------------------ filesystem refusal

@pytest.mark.parametrize("magic,name", [
    (NFS_SUPER_MAGIC, "nfs"), (0x6969, "nfs"),
    (TMPFS_MAGIC, "tmpfs"), (0x01021994, "tmpfs"),
    (RAMFS_MAGIC, "ramfs"), (0x858458F6, "ramfs"),
    (0x858458F6 - (1 << 32), "ramfs"),  # f_type read as a signed 32-bit value
    (0xEF53, None),        # ext2/3/4
    (0x58465342, None),    # xfs
    (0x9123683E, None),    # btrfs
    (0x794C7630, None),    # overlayfs
    (None, None),          # not Linux: no magic to judge
])
def test_filesystem_magic_mapping(magic, name):
    assert unsupported_filesystem(magic) == name


def _stat_f_type(path: str) -> int | None:
    stat = shutil.which("stat")
    if stat is None:
        return None
    res = subprocess.run([stat, "-f", "-c", "%t", path], capture_output=True, text=True)
    return int(res.stdout.strip(), 16) if res.returncode == 0 else None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="statfs magics are Linux's")
def test_filesystem_magic_agrees_with_stat_f(tmp_path):
    expected = _stat_f_type(str(tmp_path))
    if expected is None:
        pytest.skip("no stat(1) to compare with")
    assert filesystem_magic(str(tmp_path)) == expected


def _a_tmpfs_dir() -> str | None:
    for candidate in ("/dev/shm", "/tmp", "/run"):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            try:
                if filesystem_magic(candidate) == TMPFS_MAGIC:
                    return candidate
            except OSError:
                continue
    return None


def test_a_data_dir_on_tmpfs_is_refused_before_anything_is_created(tmp_path, monkeypatch):
    base = _a_tmpfs_dir()
    if base is None:
        pytest.skip("no writable tmpfs mount here")
    monkeypatch.delenv(ALLOW_ANY_FS_ENV, raising=False)
    parent = os.path.join(base, f"portunus-test-{os.getpid()}-{tmp_path.name}")
    target = os.path.join(parent, "data")
    try:
        with pytest.raises(PortunusError) as ei:
            Store.open(target)
        e = ei.value
        assert e.code == "startup.unsupported_filesystem"
        assert e.exit_code == 1
        assert target in e.message and "tmpfs" in e.message
        assert e.fields == {"data_dir": target, "filesystem": "tmpfs"}
        assert not os.path.exists(parent)
        # the escape hatch for tests
        monkeypatch.setenv(ALLOW_ANY_FS_ENV, "1")
        with Store.open(target) as s:
            assert s.schema_version() == LATEST
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_an_existing_tmpfs_data_dir_is_refused_too(tmp_path, monkeypatch):
    base = _a_tmpfs_dir()
    if base is None:
        pytest.skip("no writable tmpfs mount here")
    monkeypatch.delenv(ALLOW_ANY_FS_ENV, raising=False)
    target = os.path.join(base, f"portunus-test-{os.getpid()}-{tmp_path.name}")
    os.mkdir(target)
    try:
        with pytest.raises(PortunusError) as ei:
            Store.open(target)
        assert ei.value.code == "startup.unsupported_filesystem"
        assert os.listdir(target) == []
    finally:
        shutil.rmtree(target, ignore_errors=True)


def test_refusal_follows_the_magic_of_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_ANY_FS_ENV, raising=False)
    monkeypatch.setattr(filesystem, "filesystem_magic", lambda path: NFS_SUPER_MAGIC)
    with pytest.raises(PortunusError) as ei:
        Store.open(str(tmp_path / "data"))
    assert ei.value.code == "startup.unsupported_filesystem"
    assert "nfs" in ei.value.message and str(tmp_path / "data") in ei.value.message
    assert not (tmp_path / "data").exists()
    monkeypatch.setattr(filesystem, "filesystem_magic", lambda path: 0xEF53)
    with Store.open(str(tmp_path / "data")) as s:
        assert s.schema_version() == LATEST


def test_a_local_disk_data_dir_opens_without_the_escape_hatch(tmp_path, monkeypatch):
    if unsupported_filesystem(filesystem_magic(str(tmp_path))):
        pytest.skip("tmp_path itself is on a refused filesystem here")
    monkeypatch.delenv(ALLOW_ANY_FS_ENV, raising=False)
    with Store.open(str(tmp_path / "data")) as s:
        assert s.schema_version() == LATEST
