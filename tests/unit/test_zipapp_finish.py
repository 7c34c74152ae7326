"""deploy/zipapp_finish.py on a small shiv-shaped archive, run by a real interpreter:
the fast __main__ starts from an extracted site-packages, everything else goes to shiv's bootstrap,
the added bytecode is valid checked-hash bytecode, and finishing twice gives the same bytes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy"))
import zipapp_finish  # noqa: E402

BUILD_ID = "ab" * 32
DATE = (1980, 1, 1, 0, 0, 0)
TAG = sys.implementation.cache_tag

# stands in for shiv's bootstrap: says it ran, then extracts and runs like shiv would
FAKE_BOOTSTRAP = '''
import json, os, sys, zipfile
def bootstrap():
    print("shiv-bootstrap", flush=True)
    z = zipfile.ZipFile(sys.argv[0])
    env = json.loads(z.read("environment.json"))
    root = os.path.expanduser(os.environ.get("SHIV_ROOT") or "~/.shiv")
    target = os.path.join(root, os.path.basename(os.path.realpath(sys.argv[0])) + "_" + env["build_id"])
    for n in z.namelist():
        if n.startswith("site-packages"):
            z.extract(n, target)
    sys.path.insert(0, os.path.join(target, "site-packages"))
    from app.main import main
    sys.exit(main())
'''

APP_MAIN = '''
import sys
def main():
    import app
    print("entry", app.__file__, sys.argv[1:], flush=True)
    return 3
'''


def make_archive(path: Path, env_extra: dict | None = None) -> None:
    env = {"build_id": BUILD_ID, "entry_point": "app.main:main", "script": None, "preamble": None,
           "no_modify": False, "extend_pythonpath": False, "prepend_pythonpath": None, "root": None,
           "always_write_cache": False, **(env_extra or {})}
    with open(path, "wb") as f:
        f.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for name, text in [("site-packages/app/__init__.py", "VALUE = 42\n"),
                               ("site-packages/app/main.py", APP_MAIN),
                               ("site-packages/app/data_for_py2.py", "print 'not python 3'\n"),
                               ("_bootstrap/__init__.py", FAKE_BOOTSTRAP),
                               ("environment.json", json.dumps(env)),
                               ("__main__.py", "import _bootstrap\n_bootstrap.bootstrap()\n")]:
                z.writestr(zipfile.ZipInfo(name, DATE), text)


def run(archive: Path, root: Path, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SHIV_")}
    full.update(SHIV_ROOT=str(root), PYTHONDONTWRITEBYTECODE="1", **env)
    return subprocess.run([sys.executable, str(archive), "x", "--y"], env=full, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def finished(tmp_path):
    archive = tmp_path / "app"
    make_archive(archive)
    zipapp_finish.finish(str(archive))
    return archive


def test_first_run_goes_through_shiv_then_later_runs_start_from_the_extracted_dir(finished, tmp_path):
    root = tmp_path / "root"
    first = run(finished, root)
    assert first.returncode == 3, first.stderr
    assert first.stdout.splitlines()[0] == "shiv-bootstrap"
    site = root / f"app_{zipapp_finish.finished_build_id(BUILD_ID, TAG)}" / "site-packages"
    again = run(finished, root)
    assert again.returncode == 3, again.stderr
    assert "shiv-bootstrap" not in again.stdout
    assert again.stdout.strip() == f"entry {site / 'app' / '__init__.py'} ['x', '--y']"


@pytest.mark.parametrize("override", ["SHIV_FORCE_EXTRACT", "SHIV_ENTRY_POINT", "SHIV_INTERPRETER",
                                      "SHIV_PREPEND_PYTHONPATH"])
def test_a_shiv_override_always_goes_to_shivs_bootstrap(finished, tmp_path, override):
    root = tmp_path / "root"
    run(finished, root)
    res = run(finished, root, **{override: "1"})
    assert res.stdout.splitlines()[0] == "shiv-bootstrap"


def test_the_role_symlink_finds_the_cache_of_the_archive_it_points_to(finished, tmp_path):
    root = tmp_path / "root"
    run(finished, root)
    link = tmp_path / "app-server"
    link.symlink_to(finished.name)
    res = run(link, root)
    assert res.returncode == 3 and "shiv-bootstrap" not in res.stdout


def test_bytecode_is_checked_hash_and_matches_the_source(finished):
    with zipfile.ZipFile(finished) as z:
        names = set(z.namelist())
        pyc = z.read(f"site-packages/app/__pycache__/main.{TAG}.pyc")
        src = z.read("site-packages/app/main.py")
        assert z.getinfo(f"site-packages/app/__pycache__/main.{TAG}.pyc").date_time == DATE
    assert f"site-packages/app/__pycache__/__init__.{TAG}.pyc" in names
    assert f"site-packages/app/__pycache__/data_for_py2.{TAG}.pyc" not in names  # not Python 3: left alone
    assert not any(n.startswith("_bootstrap/__pycache__") for n in names)
    assert pyc[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(pyc[4:8], "little") == 0b11  # hash-based, checked
    assert pyc[8:16] == importlib.util.source_hash(src)


def test_finishing_is_reproducible_and_keeps_the_shebang(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_archive(a)
    make_archive(b)
    zipapp_finish.finish(str(a))
    zipapp_finish.finish(str(b))
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    assert a.read_bytes().startswith(b"#!/usr/bin/env python3\n")


def test_an_archive_with_shiv_options_it_does_not_mirror_keeps_shivs_main(tmp_path):
    archive = tmp_path / "app"
    make_archive(archive, {"preamble": "pre.py"})
    zipapp_finish.finish(str(archive))
    with zipfile.ZipFile(archive) as z:
        assert z.read("__main__.py") == b"import _bootstrap\n_bootstrap.bootstrap()\n"
        assert f"site-packages/app/__pycache__/main.{TAG}.pyc" in z.namelist()


def test_no_writable_unpack_dir_is_a_clear_error_not_a_traceback(finished, tmp_path):
    """A service user without a home (HOME points nowhere, no SHIV_ROOT): say what to set."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("SHIV_")}
    full.update(HOME="/proc/no-such-home", PYTHONDONTWRITEBYTECODE="1")
    res = subprocess.run([sys.executable, str(finished), "x"], env=full, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "/proc/no-such-home/.shiv" in res.stderr and "SHIV_ROOT" in res.stderr
    assert "shiv-bootstrap" not in res.stdout



def test_a_finished_archive_never_reuses_the_extraction_of_an_unfinished_build(tmp_path):
    """shiv's build id hashes the sources only: an unfinished archive of the same tree unpacked
    first (no bytecode) must not be what the finished one starts from."""
    plain, done = tmp_path / "app", tmp_path / "done" / "app"
    make_archive(plain)
    done.parent.mkdir()
    done.write_bytes(plain.read_bytes())
    zipapp_finish.finish(str(done))
    root = tmp_path / "root"
    assert run(plain, root).returncode == 3                      # unpacks app_<shiv id>, sources only
    first = run(done, root)
    assert first.returncode == 3 and first.stdout.splitlines()[0] == "shiv-bootstrap", first.stdout
    own = root / f"app_{zipapp_finish.finished_build_id(BUILD_ID, TAG)}" / "site-packages"
    assert (own / "app" / "__pycache__" / f"main.{TAG}.pyc").is_file()
    again = run(done, root)
    assert "shiv-bootstrap" not in again.stdout and str(own) in again.stdout


def test_finishing_a_finished_archive_keeps_its_build_id(finished):
    before = json.loads(zipfile.ZipFile(finished).read("environment.json"))["build_id"]
    zipapp_finish.finish(str(finished))
    assert json.loads(zipfile.ZipFile(finished).read("environment.json"))["build_id"] == before
