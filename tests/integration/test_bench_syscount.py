"""bench/portbench/syscount.py against a real perf and a real process (issue 15,
bench/run.py --syscalls): the counter attaches to a running process, counts only between
start() and stop(), follows the threads and children it creates meanwhile, and cleans up.

Skipped where perf cannot count raw_syscalls:sys_enter (not installed, or refused by
perf_event_paranoid in a container): the bench itself runs on there and says so once, which
tests/unit/test_bench_cpusplit.py and the bench smoke cover."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from portbench import BenchError  # noqa: E402
from portbench.procs import Procs  # noqa: E402
from portbench.syscount import SyscallCounter, perf_unavailable  # noqa: E402

# On each line from stdin: N getppid() calls in the main thread, N in a new thread and N in
# a forked child (waited for); then "done". getppid is one syscall each, nothing else.
CHILD = r"""
import os, sys, threading
def burst(n):
    for _ in range(n):
        os.getppid()
for line in sys.stdin:
    n = int(line)
    burst(n)
    t = threading.Thread(target=burst, args=(n,)); t.start(); t.join()
    pid = os.fork()
    if pid == 0:
        burst(n); os._exit(0)
    os.waitpid(pid, 0)
    sys.stdout.write("done\n"); sys.stdout.flush()
"""


@pytest.fixture
def procs(tmp_path):
    (tmp_path / "logs").mkdir()
    p = Procs(tmp_path / "logs")
    why = perf_unavailable(p)
    if why is not None:
        p.stop_all()
        pytest.skip(why)
    yield p
    p.stop_all()


def _child():
    return subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _burst(child, n: int) -> None:
    child.stdin.write(f"{n}\n")
    child.stdin.flush()
    assert child.stdout.readline() == "done\n"


def test_counts_the_window_incl_new_threads_and_children(procs, tmp_path):
    child = _child()
    try:
        _burst(child, 10)                        # warm: imports done before we attach
        n = 30_000
        c = SyscallCounter(procs, tmp_path, [child.pid], "t1")
        try:
            c.start()
            _burst(child, n)
            count = c.stop()
        finally:
            c.close()
        _burst(child, n)                         # after stop(): counted by nobody
        # 3 x n getppid + the clone, fork, wait, pipe reads/writes, thread start-up (a few
        # hundred at most)
        assert 3 * n <= count < 3 * n + 2_000, count
        assert not list(tmp_path.glob("perf-t1.*"))      # fifos and output removed
        assert not [p for p in procs.live if p.name == "perf-stat"]
    finally:
        child.kill()
        child.wait()


def test_an_idle_window_counts_almost_nothing_and_a_gone_pid_fails(procs, tmp_path):
    child = _child()
    try:
        _burst(child, 10)
        c = SyscallCounter(procs, tmp_path, [child.pid], "t2")
        try:
            c.start()
            count = c.stop()
        finally:
            c.close()
        assert 0 <= count < 50, count            # blocked in read(): nothing to count
    finally:
        child.kill()
        child.wait()
    gone = SyscallCounter(procs, tmp_path, [child.pid], "t3", timeout=5)
    try:
        with pytest.raises(BenchError):
            gone.start()
    finally:
        gone.close()
    assert not list(tmp_path.glob("perf-t3.*"))
