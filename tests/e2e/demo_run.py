"""Helpers for tests of the shipped front door: the built `dist/` and a demo run to Ctrl-C."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import IN_CI, ROOT


def built_binary() -> Path:
    """The zipapp under test: $PORTUNUS_BIN, else the repo's dist/portunus; skip (fail in CI) without one."""
    binary = os.environ.get("PORTUNUS_BIN")
    path = Path(binary) if binary else ROOT / "dist" / "portunus"
    if not path.is_file():
        msg = f"{path} does not exist; run ./build.sh first"
        if IN_CI:
            pytest.fail(msg + " (CI runs ./build.sh test)")
        pytest.skip(msg)
    return path.resolve()


def repo_workdir(tmp_path: Path) -> Path:
    """A directory whose `dist/` is the build under test and whose other entries are the repo's."""
    binary = built_binary()
    if binary.parent == (ROOT / "dist").resolve():
        return ROOT
    work = tmp_path / "repo"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name != "dist":
            (work / entry.name).symlink_to(entry)
    (work / "dist").symlink_to(binary.parent)
    return work


def run_demo_to_ctrl_c(args, *, cwd=None, env=None, on_running=None, stop_signal=signal.SIGINT) -> str:
    """Start a demo, fetch the sample URL it prints, Ctrl-C it; asserts exit 0 and a removed temp dir.

    The demo's temp dir goes under a TMPDIR of the test's own, so a demo that fails (and keeps
    its dir, as it should) leaves nothing behind after the test.
    """
    tmp_root = tempfile.mkdtemp(prefix="portunus-demo-test-")
    env = {**(os.environ if env is None else env), "TMPDIR": tmp_root}
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                         cwd=cwd, env=env, process_group=0)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Logs:"):
                break
        text = "".join(lines)
        if "Portunus demo is running" not in text:
            p.kill()
            raise AssertionError(f"the demo did not come up:\n{text}{p.communicate(timeout=10)[1]}")
        url = re.search(r"Sample rule\s+(http://127\.0\.0\.1:\d+/)", text).group(1)
        state_dir = re.search(r"State lives in (\S+?)\.\n", text).group(1)
        assert os.path.isdir(state_dir)
        body = urllib.request.urlopen(url, timeout=10).read()
        assert b"Hello through Portunus" in body
        if on_running is not None:
            on_running(text)
        os.killpg(p.pid, stop_signal)  # what a terminal's Ctrl-C (or hang-up) does: the whole foreground group
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert "stopping the demo" in err and "error:" not in err, err
        assert not os.path.exists(state_dir), f"{state_dir} was left behind"
        return text
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        kill_processes_mentioning(tmp_root)
        shutil.rmtree(tmp_root, ignore_errors=True)


def kill_processes_mentioning(text: str) -> None:
    """The demo's children run in their own process groups; a failed test must not leave them running."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except OSError:
                pass
