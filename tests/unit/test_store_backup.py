"""store.backup on real SQLite files: backup beside an open store, restore (fresh, refused, forced,
migrated, not a database, store held), reset, and that the input of a restore is left alone."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from portunus.errors import PortunusError
from portunus.store import Store, backup, clients
from portunus.store.db import ALLOW_ANY_FS_ENV


@pytest.fixture(autouse=True)
def any_fs(monkeypatch):
    monkeypatch.setenv(ALLOW_ANY_FS_ENV, "1")


def raises(code: str, fn, *args, **kw) -> PortunusError:
    with pytest.raises(PortunusError) as ei:
        fn(*args, **kw)
    assert ei.value.code == code, ei.value
    return ei.value


def names(store: Store) -> list[str]:
    return [c["client_name"] for c in clients.list_clients(store)]


@pytest.fixture
def live(tmp_path):
    """An open store with one client; its rows sit in the WAL until a checkpoint."""
    s = Store.open(str(tmp_path / "live"))
    clients.create_client(s, "edge-1")
    yield s
    s.close()


def test_backup_beside_an_open_store_sees_committed_rows(live, tmp_path):
    out = backup.backup(live.data_dir, str(tmp_path / "b.db"))
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    conn = sqlite3.connect(out)
    try:
        assert [r[0] for r in conn.execute("SELECT client_name FROM clients")] == ["edge-1"]
    finally:
        conn.close()
    assert not os.path.exists(out + ".partial")


def test_backup_into_a_directory_names_the_file_and_never_overwrites(live, tmp_path):
    out_dir = tmp_path / "backups"
    out_dir.mkdir()
    out = backup.backup(live.data_dir, str(out_dir), now=lambda: 1_800_000_000)
    assert os.path.basename(out) == "portunus-backup-20270115T080000Z.db"
    e = raises("conflict.backup_exists", backup.backup, live.data_dir, str(out_dir), now=lambda: 1_800_000_000)
    assert out in e.message


def test_backup_without_a_database_is_not_found(tmp_path):
    raises("not_found", backup.backup, str(tmp_path), str(tmp_path / "b.db"))


def test_restore_into_a_fresh_dir_and_the_input_is_left_alone(live, tmp_path):
    src = backup.backup(live.data_dir, str(tmp_path / "b.db"))
    before = sorted(os.listdir(tmp_path))
    target = tmp_path / "fresh"
    db_path = backup.restore(str(target), src)
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["fresh"])  # no b.db-wal / b.db-shm
    assert sorted(os.listdir(target)) == ["state.db", "state.db.lock"]
    restored = Store.open(str(target))
    try:
        assert names(restored) == ["edge-1"] and restored.db_path == db_path
    finally:
        restored.close()


def test_restore_over_a_database_needs_force_and_keeps_the_old_one(live, tmp_path):
    src = backup.backup(live.data_dir, str(tmp_path / "b.db"))
    target = tmp_path / "target"
    other = Store.open(str(target))
    clients.create_client(other, "only-in-target")
    other.close()
    raises("conflict.data_dir_not_empty", backup.restore, str(target), src)
    backup.restore(str(target), src, force=True)
    kept = sqlite3.connect(target / "state.db.pre-restore")
    try:
        assert [r[0] for r in kept.execute("SELECT client_name FROM clients")] == ["only-in-target"]
    finally:
        kept.close()
    restored = Store.open(str(target))
    try:
        assert names(restored) == ["edge-1"]
    finally:
        restored.close()


def test_restore_refuses_a_file_that_is_not_a_database(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"hello, not sqlite")
    raises("validation.not_a_database", backup.restore, str(tmp_path / "target"), str(junk))
    assert not (tmp_path / "target").exists()


def test_restore_and_reset_refuse_while_the_store_is_held(live, tmp_path):
    src = backup.backup(live.data_dir, str(tmp_path / "b.db"))
    e = raises("store_in_use", backup.restore, live.data_dir, src, force=True)
    assert e.exit_code == 75
    raises("store_in_use", backup.reset, live.data_dir)
    assert names(live) == ["edge-1"]  # untouched


def test_a_failed_restore_leaves_the_live_database_and_no_staging(live, tmp_path):
    src = backup.backup(live.data_dir, str(tmp_path / "b.db"))
    conn = sqlite3.connect(src)
    conn.execute("INSERT INTO schema_migrations(version, name, applied_at) VALUES (999, 'future', "
                 "'2099-01-01T00:00:00Z')")
    conn.commit()
    conn.close()
    data_dir = live.data_dir
    live.close()
    raises("schema_version_too_new", backup.restore, data_dir, src, force=True)
    assert not [n for n in os.listdir(data_dir) if "restor" in n]  # no staging left behind
    again = Store.open(data_dir)
    try:
        assert names(again) == ["edge-1"]
    finally:
        again.close()


def test_reset_lists_then_removes_only_the_database(tmp_path):
    s = Store.open(str(tmp_path / "d"))
    clients.create_client(s, "edge-1")
    s.close()
    (tmp_path / "d" / "server.toml").write_text("")
    files = backup.database_files(str(tmp_path / "d"))
    assert os.path.join(str(tmp_path / "d"), "state.db") in files
    assert backup.reset(str(tmp_path / "d")) == files
    assert backup.database_files(str(tmp_path / "d")) == []
    assert (tmp_path / "d" / "server.toml").exists()


def test_a_read_only_store_reads_beside_the_holder(live):
    ro = backup.ReadOnlyStore(live.data_dir)
    try:
        assert names(ro) == ["edge-1"]
        with pytest.raises(sqlite3.OperationalError):
            ro.read().execute("DELETE FROM clients")
    finally:
        ro.close()
    assert names(live) == ["edge-1"]
