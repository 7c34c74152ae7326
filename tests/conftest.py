"""Shared fixtures: the product binary, free loopback ports, process lifecycle, real peers.

Every test uses 127.0.0.1 only, temporary dirs, timeouts, and kills what it starts.
Set PORTUNUS_BIN to test a built zipapp (./build.sh test does); otherwise the
source tree is run with `python -m portunus`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true" or os.environ.get("PORTUNUS_REQUIRE_TOOLS") == "1"


def require_tool(name: str) -> str:
    """Path of a system tool; skip when missing on a laptop, fail in CI."""
    path = shutil.which(name)
    if path is None:
        msg = f"system tool {name!r} is not installed"
        if IN_CI:
            pytest.fail(msg + " (CI must install it in .ci/run)")
        pytest.skip(msg)
    return path


def portunus_cmd(role: str) -> list[str]:
    binary = os.environ.get("PORTUNUS_BIN")
    if binary:
        return [binary, role]
    return [sys.executable, "-m", "portunus", role]


# ------------------------------------------------------------------ ports

def _bindable(port: int, kinds=(socket.SOCK_STREAM, socket.SOCK_DGRAM)) -> bool:
    for kind in kinds:
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        finally:
            s.close()
    return True


_port_lock = threading.Lock()
_handed_out: set[int] = set()


def free_port_block(count: int) -> int:
    """First port of `count` consecutive ports free for TCP and UDP, outside the ephemeral range."""
    with _port_lock:
        for attempt in range(400):
            if attempt == 200:
                _handed_out.clear()  # earlier tests are done with theirs; bindability still decides
            base = random.randrange(10000, 32000 - count)
            ports = range(base, base + count)
            if any(p in _handed_out for p in ports):
                continue
            if all(_bindable(p) for p in ports):
                _handed_out.update(ports)
                return base
    raise RuntimeError(f"no block of {count} free ports found")


def free_port() -> int:
    return free_port_block(1)


# ------------------------------------------------------------------ processes

class Proc:
    """A started product process whose stderr (JSON log lines) is collected."""

    def __init__(self, args, env=None, cwd=None, preexec_fn=None):
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                  env=full_env, cwd=cwd, preexec_fn=preexec_fn, text=True)
        self.stdout = ""
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()
        self._to = threading.Thread(target=self._pump_out, daemon=True)
        self._to.start()

    def _pump(self) -> None:
        for line in self.p.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def _pump_out(self) -> None:
        self.stdout = self.p.stdout.read()

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        with self._cond:
            lines = list(self.lines)
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if name is None or rec.get("event") == name:
                out.append(rec)
        return out

    def wait_event(self, name: str, timeout: float = 15.0, pred=None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for rec in self.events(name):
                if pred is None or pred(rec):
                    return rec
            if self.p.poll() is not None and not self._t.is_alive():
                raise AssertionError(f"process exited ({self.p.returncode}) before {name}; log:\n" + self.log_text())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {name}; log:\n" + self.log_text())
            with self._cond:
                self._cond.wait(min(remaining, 0.1))

    def log_text(self) -> str:
        with self._cond:
            return "\n".join(self.lines[-200:])

    def signal(self, sig) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.p.wait(timeout)
        self._t.join(5)
        self._to.join(5)
        return rc

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def procs():
    """Start product processes; every one is killed at teardown."""
    started: list[Proc] = []

    def start(args, **kw) -> Proc:
        p = Proc(args, **kw)
        started.append(p)
        return p
    yield start
    for p in started:
        if p.p.poll() is None:
            p.signal(signal.SIGKILL)
        p.kill()


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def standalone(procs, tmp_path):
    """Start `portunus standalone` with the given TOML text; waits for process.ready."""
    counter = {"n": 0}

    def start(toml_text: str, env=None, wait_ready=True, preexec_fn=None) -> Proc:
        counter["n"] += 1
        cfg = write_toml(tmp_path / f"standalone{counter['n']}.toml", toml_text)
        p = procs(portunus_cmd("standalone") + ["--config", str(cfg)], env=env, preexec_fn=preexec_fn)
        p.config_path = cfg
        if wait_ready:
            p.wait_event("process.ready", timeout=20)
        return p
    return start


def stats_once(sock_path: str) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sock_path)
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
    s.close()
    return json.loads(data)


def rule_stats(sock_path: str, rule_id: str) -> dict:
    for r in stats_once(sock_path)["rules"]:
        if r["rule_id"] == rule_id:
            return r
    raise KeyError(rule_id)


def wait_until(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------ store

@pytest.fixture
def store(tmp_path, monkeypatch):
    """A real store in a temp dir (any filesystem allowed: tmpfs is fine for tests). Test files
    that need another kind of store define their own ``store`` fixture, which takes precedence."""
    from portunus.store import Store
    from portunus.store.db import ALLOW_ANY_FS_ENV
    monkeypatch.setenv(ALLOW_ANY_FS_ENV, "1")
    s = Store.open(str(tmp_path / "data"))
    yield s
    s.close()
