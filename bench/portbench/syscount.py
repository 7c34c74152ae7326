"""Syscalls of the proxy over one measurement window (bench/run.py --syscalls).

`perf stat -e raw_syscalls:sys_enter -x, -p PIDS` is attached to every live process of the
proxy's sessions, started with its counter disabled (-D -1) and switched on and off through
its control FIFO (--control fifo:CTL,ACK: "enable"/"disable", each acknowledged with "ack"),
so the count covers the window of the test and not perf's own start-up and exit. perf's
`-p` follows the threads and the children the processes create while it counts (their
counts are inherited), so socat's forked children and haproxy's threads are in it.

The count is the number of system calls the proxy entered, whatever they were (epoll_wait,
recv, send, splice, accept4, connect, close, ...). Counting adds a small cost to every
syscall in the proxy's kernel time, so the bench takes --syscalls figures in their own run.
"""

from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path

from . import BenchError
from .procs import ChildProcess, Procs

EVENT = "raw_syscalls:sys_enter"


def parse_perf_stat_csv(text: str, event: str = EVENT) -> int | None:
    """The count of `event` in `perf stat -x,` output (pure): the first field of the line
    whose third field is the event (value,unit,event,run time,running %,...). perf's
    comment lines ("# started on ...") and its "Events enabled/disabled" notes are skipped.

    "<not counted>" is 0: the counter was on but never ran, i.e. no counted task ran in the
    window (a software tracepoint is never multiplexed away). None when the line is missing
    or perf says "<not supported>"."""
    for line in text.splitlines():
        fields = line.strip().split(",")
        if len(fields) < 3 or fields[2].strip() != event:
            continue
        value = fields[0].strip()
        if value == "<not counted>":
            return 0
        try:
            return int(value)
        except ValueError:
            try:
                return int(float(value))
            except ValueError:
                return None            # <not supported>, anything else
    return None


def perf_argv(pids: list[int], ctl: Path, ack: Path, out: Path) -> list[str]:
    return ["perf", "stat", "-e", EVENT, "-x", ",", "-D", "-1",
            "--control", f"fifo:{ctl},{ack}", "-o", str(out),
            "-p", ",".join(str(p) for p in pids)]


def perf_unavailable(procs: Procs, timeout: float = 20.0) -> str | None:
    """Why `perf stat -e raw_syscalls:sys_enter` cannot count here (perf missing, no
    tracepoint, not permitted), or None when it counts a `true`."""
    try:
        rc, out, err = procs.run("perf-probe", ["perf", "stat", "-e", EVENT, "-x", ",",
                                                "--", "true"], timeout=timeout)
    except FileNotFoundError:
        return "perf is not installed (apt-get install linux-perf)"
    except (BenchError, OSError) as e:
        return f"perf stat failed: {e}"
    n = parse_perf_stat_csv(err)
    if rc != 0 or n is None or n <= 0:
        tail = " ".join((err or out).strip().splitlines()[-3:])
        return f"perf stat -e {EVENT} cannot count here (rc={rc}): {tail[:300]}"
    return None


class SyscallCounter:
    """One window: start() attaches perf and enables its counter, stop() disables it, ends
    perf and returns the count. close() (also after a failure) leaves nothing behind."""

    def __init__(self, procs: Procs, workdir: Path, pids: list[int], tag: str,
                 timeout: float = 10.0):
        self.procs, self.pids, self.timeout = procs, pids, timeout
        self.ctl, self.ack = workdir / f"perf-{tag}.ctl", workdir / f"perf-{tag}.ack"
        self.out = workdir / f"perf-{tag}.csv"
        self.proc: ChildProcess | None = None
        self.ctl_fd: int | None = None
        self.ack_fd: int | None = None

    def start(self) -> None:
        if not self.pids:
            raise BenchError("no proxy process to count syscalls of")
        for fifo in (self.ctl, self.ack):
            fifo.unlink(missing_ok=True)
            os.mkfifo(fifo)
        # both ends held O_RDWR by us (Linux): neither open blocks, and no POLLHUP when perf
        # opens or closes its side
        self.ctl_fd = os.open(self.ctl, os.O_RDWR | os.O_NONBLOCK)
        self.ack_fd = os.open(self.ack, os.O_RDWR | os.O_NONBLOCK)
        self.proc = self.procs.spawn("perf-stat", perf_argv(self.pids, self.ctl, self.ack,
                                                            self.out))
        self._command("enable")

    def stop(self) -> int:
        """Disable the counter, end perf, return its count."""
        try:
            self._command("disable")
        finally:
            self._end_perf()
        try:
            text = self.out.read_text(errors="replace")
        except OSError as e:
            raise BenchError(f"perf stat wrote no output: {e}") from None
        n = parse_perf_stat_csv(text)
        if n is None:
            raise BenchError(f"perf stat counted nothing: {text.strip()[-300:]}")
        return n

    def close(self) -> None:
        self._end_perf()
        for fd in (self.ctl_fd, self.ack_fd):
            if fd is not None:
                os.close(fd)
        self.ctl_fd = self.ack_fd = None
        for f in (self.ctl, self.ack, self.out):
            f.unlink(missing_ok=True)

    def _end_perf(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, sig=signal.SIGINT, grace=5.0)   # SIGINT: print, exit

    def _command(self, cmd: str) -> None:
        """Send a control command and wait for perf's "ack"."""
        assert self.ctl_fd is not None and self.ack_fd is not None and self.proc is not None
        os.write(self.ctl_fd, cmd.encode() + b"\n")
        deadline = time.monotonic() + self.timeout
        buf = b""
        while b"ack" not in buf:
            left = deadline - time.monotonic()
            if self.proc.poll() is not None:
                raise BenchError(f"perf stat exited (code {self.proc.returncode}) before "
                                 f"'{cmd}' was acknowledged: {self._log_tail()}")
            if left <= 0:
                raise BenchError(f"perf stat did not acknowledge '{cmd}' in "
                                 f"{self.timeout:.0f}s: {self._log_tail()}")
            r, _, _ = select.select([self.ack_fd], [], [], min(left, 0.1))
            if r:
                try:
                    buf += os.read(self.ack_fd, 64)
                except BlockingIOError:
                    pass

    def _log_tail(self) -> str:
        try:
            text = self.proc.log_path.read_text(errors="replace") if self.proc else ""
        except OSError:
            text = ""
        return " ".join(text.strip().splitlines()[-3:])[:300]
