"""Child processes, free ports, and readiness/CPU/RSS read from /proc."""

from __future__ import annotations

import os
import random
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

from . import LOOPBACK, BenchError


class ChildProcess(subprocess.Popen):
    """A Popen that knows its bench name and the file its stderr goes to."""

    def __init__(self, name: str, log_path: Path | None, argv: list[str], **popen_kwargs):
        super().__init__(argv, **popen_kwargs)
        self.name = name
        self.log_path = log_path


class Procs:
    """Every child the runner starts goes through here, in its own session,
    so that stop_all() can always end it (and anything it forked)."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.live: list[ChildProcess] = []
        self.n = 0

    def spawn(self, name: str, argv: list[str], env=None, cwd=None,
              capture: bool = False) -> ChildProcess:
        self.n += 1
        logpath = self.logdir / f"{self.n:03d}-{name}.log"
        with open(logpath, "wb") as fh:
            p = ChildProcess(name, logpath, argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE if capture else fh,
                             stderr=fh, start_new_session=True)
        self.live.append(p)
        return p

    def run(self, name: str, argv: list[str], timeout: float, env=None) -> tuple[int, str, str]:
        """Run to completion (time-boxed); returns rc, stdout, stderr."""
        p = self.spawn(name, argv, env=env, capture=True)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(p, grace=2)
            raise BenchError(f"{name} timed out after {timeout:.0f}s: {shlex.join(argv)}")
        finally:
            if p in self.live and p.poll() is not None:
                self.live.remove(p)
        err = p.log_path.read_text(errors="replace")
        return p.returncode, out.decode(errors="replace"), err

    def stop(self, p: subprocess.Popen, sig=signal.SIGTERM, grace: float = 5.0) -> int | None:
        """Signal the child's process group; escalate to SIGKILL after grace."""
        if p.poll() is None:
            for s, wait in ((sig, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(p.pid, s)
                except ProcessLookupError:
                    break
                except PermissionError:
                    p.send_signal(s)
                try:
                    p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # (an already-reaped child is left alone: its pid/pgid may have been reused)
        if p in self.live:
            self.live.remove(p)
        return p.returncode

    def stop_all(self) -> None:
        for p in list(self.live)[::-1]:
            try:
                self.stop(p, grace=2.0)
            except Exception:   # noqa: BLE001 - cleanup must go on
                pass


def exit_problems(subject: str, alive_before: bool, rc: int | None) -> list[str]:
    """What is wrong with how a product process ended after our SIGTERM.

    `subject` names it in the messages ("process", "client", "server")."""
    if not alive_before:
        return [f"{subject} had already exited (code {rc}) before SIGTERM"]
    if rc not in (0, -signal.SIGTERM):
        prefix = "" if subject == "process" else subject + " "
        return [f"{prefix}exit code {rc} after SIGTERM (expected 0)"]
    return []


# --------------------------------------------------------------------------
# ports
# --------------------------------------------------------------------------

_USED_PORTS: set[int] = set()


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (kernel-chosen ephemeral),
    never handed out twice by this process."""
    for _ in range(500):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((LOOPBACK, 0))
            port = t.getsockname()[1]
            if port in _USED_PORTS:
                continue
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind((LOOPBACK, port))
            except OSError:
                continue
        _USED_PORTS.add(port)
        return port
    raise BenchError("could not find a free port on 127.0.0.1")


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ip_local_port_range (where autobind picks ports), or Linux's default."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_fixed_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 and OUTSIDE the ephemeral range, never
    handed out twice by this process: for a server that comes and goes on one port (the
    one-shot iperf3 servers). An ephemeral port can be taken by any socket's autobind while
    its server is down — e.g. the upstream socket of a proxy flow created for a late
    datagram after the previous iperf3 server exited — and the next server then fails with
    "Address already in use"."""
    lo, hi = ephemeral_range()
    ranges = [(r0, r1) for r0, r1 in ((10000, lo), (hi + 1, 65536)) if r1 - r0 > 100]
    for _ in range(500):
        r0, r1 = random.choice(ranges) if ranges else (1024, 65536)
        port = random.randrange(r0, r1)
        if port in _USED_PORTS:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                t.bind((LOOPBACK, port))
                u.bind((LOOPBACK, port))
        except OSError:
            continue
        _USED_PORTS.add(port)
        return port
    raise BenchError("could not find a free fixed port on 127.0.0.1")


def free_block(n: int) -> int:
    """First port of `n` consecutive TCP ports free on every address (a rule pushed
    without listen_host binds 0.0.0.0, the product default)."""
    for _ in range(500):
        base = random.randrange(10000, 32000 - n)
        if all(_tcp_port_free(p) for p in range(base, base + n)):
            return base
    raise BenchError("no free port block")


def _tcp_port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------
# readiness and per-process figures from /proc
# --------------------------------------------------------------------------

def _proc_net_ports(kind: str, state: str | None) -> set[int]:
    ports = set()
    for fam in ("", "6"):
        try:
            with open(f"/proc/net/{kind}{fam}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if state is None or parts[3] == state:
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            pass
    return ports


def listener_addrs(ports: list[int]) -> set[str]:
    """IPv4 addresses of TCP listeners on the given ports (from /proc/net/tcp)."""
    out = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            addr, port = parts[1].split(":")
            if parts[3] == "0A" and int(port, 16) in ports:
                out.add(socket.inet_ntoa(int(addr, 16).to_bytes(4, "little")))
    return out


def wait_ready(tcp: list[int], udp: list[int], proc: ChildProcess | None,
               timeout: float) -> float:
    """Wait until every TCP port has a listener and every UDP port is bound.

    Uses /proc/net instead of connecting, so a probe never consumes a
    one-shot server (iperf3 -s -1) or creates a stray proxied connection.
    Returns seconds waited."""
    t0 = time.monotonic()
    while True:
        ok = set(tcp) <= _proc_net_ports("tcp", "0A") and \
            set(udp) <= _proc_net_ports("udp", None)
        if ok:
            return time.monotonic() - t0
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{proc.name} exited with code {proc.returncode} before "
                             f"it was ready; log: {proc.log_path}")
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"ports tcp={tcp} udp={udp} not ready after {timeout:.0f}s")
        time.sleep(0.02)


_CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu_secs(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK   # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def stat_fields_of(text: str) -> list[str] | None:
    """The fields of a /proc/PID/stat line after the command name (index 0 = state, 3 =
    session, 11 utime, 12 stime, 13 cutime, 14 cstime; in clock ticks) (pure). The name
    is in parentheses and may itself hold spaces and parentheses ("(nginx: worker
    process)"), so the split is at the last ")". None for a line without one."""
    head, sep, rest = text.rpartition(")")
    return rest.split() if sep else None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 = state)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return stat_fields_of(f.read())
    except OSError:
        return None


def tree_cpu_split_from(stats: list[list[str]], sid: int) -> tuple[float, float]:
    """(user, kernel) CPU seconds of every process of session `sid`, from /proc/PID/stat
    fields (pure).

    Per process: utime (+ cutime) is user time, stime (+ cstime) kernel time: itself and
    its children that exited and were waited for (socat's forked children, nginx workers
    that were replaced). A live child is counted by its own line; once reaped its time
    moves into its parent's cutime/cstime, so both sums grow monotonically. Children
    reaped by a process outside the session are lost (none of the bench's proxies does
    that). A process's line covers all its threads (haproxy's)."""
    user = kern = 0
    for f in stats:
        try:
            if int(f[3]) != sid:
                continue
            u, k = int(f[11]) + int(f[13]), int(f[12]) + int(f[14])
        except (IndexError, ValueError):
            continue
        user, kern = user + u, kern + k
    return user / _CLK, kern / _CLK


def tree_cpu_secs_from(stats: list[list[str]], sid: int) -> float:
    """CPU seconds (user + kernel) of every process of session `sid` (pure); see
    tree_cpu_split_from."""
    return sum(tree_cpu_split_from(stats, sid))


def session_cpu_split(sid: int) -> tuple[float, float] | None:
    """(user, kernel) CPU seconds of the whole session `sid` (a child started by Procs.spawn
    leads its own session, so its pid is the sid): itself, live descendants, reaped
    descendants. None when the leader is gone."""
    if _stat_fields(sid) is None:
        return None
    stats = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = _stat_fields(int(name))
            if f is not None:
                stats.append(f)
    return tree_cpu_split_from(stats, sid)


def session_cpu_secs(sid: int) -> float | None:
    """CPU seconds (user + kernel) of the whole session `sid`; see session_cpu_split."""
    split = session_cpu_split(sid)
    return None if split is None else sum(split)


def session_pids(sid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = _stat_fields(int(name))
            if f is not None and len(f) > 3 and f[3] == str(sid):
                out.append(int(name))
    return out


def proc_peak_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def proc_mem_kib(pid: int) -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile of ``pid`` in KiB (from /proc/<pid>/status)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(val.split()[0])
    return out
