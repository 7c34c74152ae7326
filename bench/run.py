#!/usr/bin/env python3
"""Portunus benchmark runner (SPEC §11).

Starts every process itself on 127.0.0.1, measures each forwarding path and
prints a table; writes JSON to bench/results/latest.json; optionally compares
medians with a stored baseline (exit 1 when a metric is more than 25 % worse).

Paths:   direct | portunus-splice | portunus-userspace (standalone mode) |
         client-splice | client-userspace (a real server pushes the rules to a
         real client) | haproxy
         (+ optional haproxy-splice: the C reference on the splice fast path)
Tests:   tcp  - iperf3 bulk throughput, single stream (forward and -R)
         http - wrk keep-alive req/s, wrk new-connection req/s
                (Connection: close), idle request RTT on one connection
         udp  - 64-byte datagram echo rate, 1 flow and N flows

Standard library only (Python >= 3.11). External tools: iperf3, wrk, haproxy.
See bench/README.md.

Hidden helper sub-commands (used by the runner itself, started as child
processes):  run.py _http-origin PORT   |   run.py _udp-echo PORT
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import json
import os
import platform
import re
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOOPBACK = "127.0.0.1"          # the only address this runner ever uses

ALL_PATHS = ["direct", "portunus-splice", "portunus-userspace", "client-splice", "client-userspace",
             "haproxy", "haproxy-splice"]
DEFAULT_PATHS = ["direct", "portunus-splice", "portunus-userspace", "client-splice",
                 "client-userspace", "haproxy"]
PORTUNUS_PATHS = {"portunus-splice", "portunus-userspace", "client-splice", "client-userspace"}
ROLES = ("standalone", "server", "client")
ALL_GROUPS = ["tcp", "http", "udp"]

# name -> (group, unit, better, compared, label)
#   better: "higher" | "lower";  compared: take part in --compare
METRICS: dict[str, tuple[str, str, str, bool, str]] = {
    "tcp_bulk_gbps":          ("tcp", "Gbit/s", "higher", True,  "TCP bulk, 1 stream"),
    "tcp_bulk_rev_gbps":      ("tcp", "Gbit/s", "higher", True,  "TCP bulk, 1 stream, reverse (-R)"),
    "http_keepalive_rps":     ("http", "req/s", "higher", True,  "HTTP keep-alive"),
    "http_keepalive_p50_ms":  ("http", "ms",    "lower",  True,  "  latency p50"),
    "http_keepalive_p99_ms":  ("http", "ms",    "lower",  True,  "  latency p99"),
    "http_close_rps":         ("http", "conn/s", "higher", True, "HTTP new conn (Connection: close)"),
    "http_close_p50_ms":      ("http", "ms",    "lower",  True,  "  latency p50"),
    "http_close_p99_ms":      ("http", "ms",    "lower",  True,  "  latency p99"),
    "http_idle_rtt_p50_us":   ("http", "us",    "lower",  True,  "Idle request RTT p50 (1 conn)"),
    "http_idle_rtt_p99_us":   ("http", "us",    "lower",  True,  "Idle request RTT p99 (1 conn)"),
    "udp_1flow_pps":          ("udp", "pkt/s",  "higher", True,  "UDP echo, 1 flow"),
    "udp_1flow_loss_pct":     ("udp", "%",      "lower",  True,  "  loss"),
    "udp_manyflow_pps":       ("udp", "pkt/s",  "higher", True,  "UDP echo, N flows"),
    "udp_manyflow_loss_pct":  ("udp", "%",      "lower",  True,  "  loss"),
    # informational only (never compared)
    "proxy_startup_s":        ("meta", "s",     "lower",  False, "Proxy start -> listening"),
    "proxy_peak_rss_mib":     ("meta", "MiB",   "lower",  False, "Proxy peak RSS (VmHWM)"),
    "tcp_bulk_proxy_cpu_pct": ("tcp", "%",      "lower",  False, "Proxy CPU during TCP bulk"),
    "tcp_bulk_host_busy_pct": ("tcp", "%",      "lower",  False, "Host busy during TCP bulk"),
    "tcp_bulk_proxy_cpu_ms_per_gb": ("tcp", "ms/GB", "lower", False, "Proxy CPU per GB, TCP bulk"),
    "http_keepalive_proxy_cpu_pct": ("http", "%", "lower", False, "Proxy CPU during keep-alive"),
    "http_keepalive_proxy_cpu_us_per_req": ("http", "us", "lower", False, "Proxy CPU per keep-alive req"),
    "http_close_proxy_cpu_pct": ("http", "%",   "lower",  False, "Proxy CPU during new-conn"),
    "http_close_proxy_cpu_us_per_req": ("http", "us", "lower", False, "Proxy CPU per new connection"),
    "udp_manyflow_proxy_cpu_pct": ("udp", "%",  "lower",  False, "Proxy CPU during UDP N flows"),
}
# Loss is a percentage that is often 0 in the baseline; a relative threshold
# alone would flag 0.0 -> 0.01. It must also be this many points worse.
ABS_SLACK = {"udp_1flow_loss_pct": 1.0, "udp_manyflow_loss_pct": 1.0}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------
# helper servers (run as child processes: `run.py _http-origin PORT`)
# --------------------------------------------------------------------------

_BODY = b"hello, world\n"
RESP_KEEPALIVE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                  + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)
RESP_CLOSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
              + str(len(_BODY)).encode() + b"\r\nConnection: close\r\n\r\n" + _BODY)


def serve_http_origin(port: int) -> None:
    """Tiny epoll HTTP/1.1 responder: a fixed 200 for every request head.

    Supports pipelining and `Connection: close`. Request bodies are not
    expected (wrk sends GETs)."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((LOOPBACK, port))
    ls.listen(4096)
    ls.setblocking(False)
    lfd = ls.fileno()
    ep = select.epoll()
    ep.register(lfd, select.EPOLLIN)
    conns: dict[int, list] = {}   # fd -> [sock, inbuf, pending_out, close_after]
    IN, OUT = select.EPOLLIN, select.EPOLLOUT

    def close(fd):
        st = conns.pop(fd, None)
        if st is None:
            return
        try:
            ep.unregister(fd)
        except OSError:
            pass
        st[0].close()

    def flush(fd, st):
        sock = st[0]
        try:
            n = sock.send(st[2])
        except BlockingIOError:
            n = 0
        except OSError:
            close(fd)
            return
        st[2] = st[2][n:]
        if st[2]:
            ep.modify(fd, OUT)
        elif st[3]:
            close(fd)
        else:
            ep.modify(fd, IN)

    while True:
        for fd, ev in ep.poll():
            if fd == lfd:
                while True:
                    try:
                        c, _ = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:   # EMFILE etc.: try again on next event
                        break
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[c.fileno()] = [c, bytearray(), b"", False]
                    ep.register(c.fileno(), IN)
                continue
            st = conns.get(fd)
            if st is None:
                continue
            if ev & OUT:
                flush(fd, st)
                continue
            try:
                data = st[0].recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                close(fd)
                continue
            if not data:
                close(fd)
                continue
            buf = st[1]
            buf += data
            out = []
            while True:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    break
                head = bytes(buf[:i]).lower()
                del buf[:i + 4]
                if b"connection: close" in head:
                    out.append(RESP_CLOSE)
                    st[3] = True
                    break
                out.append(RESP_KEEPALIVE)
            if out:
                st[2] += b"".join(out)
                flush(fd, st)


def serve_udp_echo(port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass
    s.bind((LOOPBACK, port))
    buf = bytearray(65536)
    mv = memoryview(buf)
    recvfrom_into, sendto = s.recvfrom_into, s.sendto
    while True:
        try:
            n, addr = recvfrom_into(buf)
            sendto(mv[:n], addr)
        except OSError:
            pass


# --------------------------------------------------------------------------
# process management
# --------------------------------------------------------------------------

class Procs:
    """Every child the runner starts goes through here, in its own session,
    so that stop_all() can always end it (and anything it forked)."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.live: list[subprocess.Popen] = []
        self.n = 0

    def spawn(self, name: str, argv: list[str], env=None, cwd=None,
              capture: bool = False) -> subprocess.Popen:
        self.n += 1
        logpath = self.logdir / f"{self.n:03d}-{name}.log"
        fh = open(logpath, "wb")
        try:
            p = subprocess.Popen(
                argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture else fh,
                stderr=fh, start_new_session=True)
        finally:
            fh.close()
        p.bench_name = name          # type: ignore[attr-defined]
        p.bench_log = logpath        # type: ignore[attr-defined]
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
        err = p.bench_log.read_text(errors="replace")   # type: ignore[attr-defined]
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


PROCS: Procs | None = None


def _cleanup() -> None:
    if PROCS is not None:
        PROCS.stop_all()


# --------------------------------------------------------------------------
# ports, readiness, /proc helpers
# --------------------------------------------------------------------------

_USED_PORTS: set[int] = set()


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (kernel-chosen ephemeral)."""
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


def wait_ready(tcp: list[int], udp: list[int], proc: subprocess.Popen | None,
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
            raise BenchError(f"{proc.bench_name} exited with code {proc.returncode} before "   # type: ignore
                             f"it was ready; log: {proc.bench_log}")                        # type: ignore
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


def proc_peak_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------
# forwarding paths
# --------------------------------------------------------------------------

class Backends:
    def __init__(self, iperf: int, http: int, udp: int):
        self.iperf, self.http, self.udp = iperf, http, udp


class PathBase:
    name = "?"
    supports_udp = True

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.problems: list[str] = []
        self.fronts: Backends | None = None

    def start(self, be: Backends, procs: Procs) -> tuple[Backends, float | None]:
        raise NotImplementedError

    def stop(self, procs: Procs) -> dict:
        return {}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class DirectPath(PathBase):
    name = "direct"

    def start(self, be, procs):
        self.fronts = be
        return be, None


class HaproxyPath(PathBase):
    name = "haproxy"
    supports_udp = False

    def __init__(self, workdir: Path, threads: int, splice: bool = False):
        super().__init__()
        self.workdir, self.threads, self.splice = workdir, threads, splice
        if splice:
            self.name = "haproxy-splice"

    def start(self, be, procs):
        f = Backends(free_port(), free_port(), 0)
        cfg = [
            "global",
            "    maxconn 4000",
            f"    nbthread {self.threads}",
            "defaults",
            "    mode tcp",
            "    timeout connect 3s",
            "    timeout client 60s",
            "    timeout server 60s",
        ]
        if self.splice:     # kernel splice in both directions: a C reference for the fast path
            cfg += ["    option splice-request", "    option splice-response"]
        for nm, fp, bp in (("iperf", f.iperf, be.iperf), ("http", f.http, be.http)):
            cfg += [f"frontend fe_{nm}", f"    bind {LOOPBACK}:{fp}", f"    default_backend be_{nm}",
                    f"backend be_{nm}", f"    server s1 {LOOPBACK}:{bp}"]
        path = self.workdir / f"{self.name}.cfg"
        path.write_text("\n".join(cfg) + "\n")
        t0 = time.monotonic()
        self.proc = procs.spawn(self.name, ["haproxy", "-db", "-f", str(path)])
        wait_ready([f.iperf, f.http], [], self.proc, timeout=15)
        self.fronts = f
        return f, time.monotonic() - t0

    def stop(self, procs):
        info = {"peak_rss_mib": proc_peak_rss_mib(self.proc.pid)}
        rc = procs.stop(self.proc, grace=5)
        info["exit_code"] = rc
        text = self.proc.bench_log.read_text(errors="replace")   # type: ignore
        for line in text.splitlines():
            if "ALERT" in line or "WARNING" in line:
                self.problems.append(line.strip())
        return info


class PortunusPath(PathBase):
    supports_udp = True

    def __init__(self, name: str, argv: list[str], workdir: Path, splice: bool,
                 listen_host: str | None, drain_secs: int = 1, log_level: str = "info"):
        super().__init__()
        self.name, self.argv, self.workdir = name, argv, workdir
        self.splice, self.listen_host, self.drain = splice, listen_host, drain_secs
        self.log_level = log_level
        self.stop_secs: float | None = None
        self.tcp_used = True

    @staticmethod
    def config_text(f: Backends, be: Backends, listen_host: str | None, drain: int,
                    log_level: str = "info") -> str:
        lh = f'listen_host = "{listen_host}"\n' if listen_host else ""
        return (
            "[global]\n"
            'label = "bench"\n'
            f'log_level = "{log_level}"\n'
            'log_format = "json"\n'
            f"shutdown_drain_secs = {drain}\n\n"
            "[[rule]]\n"
            'name = "bench-iperf"\n'
            'protocol = "tcp"\n'
            f"{lh}listen_port = {f.iperf}\n"
            f'target = "{LOOPBACK}:{be.iperf}"\n\n'
            "[[rule]]\n"
            'name = "bench-http"\n'
            'protocol = "tcp"\n'
            f"{lh}listen_port = {f.http}\n"
            f'target = "{LOOPBACK}:{be.http}"\n\n'
            "[[rule]]\n"
            'name = "bench-udp"\n'
            'protocol = "udp"\n'
            f"{lh}listen_port = {f.udp}\n"
            f'target = "{LOOPBACK}:{be.udp}"\n'
            "udp_max_flows = 4096\n"
        )

    def env(self) -> dict:
        env = dict(os.environ)
        env.pop("PORTUNUS_DISABLE_SPLICE", None)
        if not self.splice:
            env["PORTUNUS_DISABLE_SPLICE"] = "1"
        return env

    def start(self, be, procs):
        f = Backends(free_port(), free_port(), free_port())
        cfg = self.workdir / f"{self.name}.toml"
        cfg.write_text(self.config_text(f, be, self.listen_host, self.drain, self.log_level))
        t0 = time.monotonic()
        self.proc = procs.spawn(self.name, self.argv + ["--config", str(cfg)],
                                env=self.env(), cwd=str(REPO))
        wait_ready([f.iperf, f.http], [f.udp], self.proc, timeout=30)
        took = time.monotonic() - t0
        self.fronts = f
        if self.listen_host:
            addrs = listener_addrs([f.iperf, f.http])
            if addrs - {self.listen_host}:
                self.problems.append(f"listen_host={self.listen_host} in the config but listeners "
                                     f"bound {sorted(addrs)}")
        return f, took

    def stop(self, procs):
        p = self.proc
        info = {"peak_rss_mib": proc_peak_rss_mib(p.pid)}
        alive_before = p.poll() is None
        t0 = time.monotonic()
        rc = procs.stop(p, grace=self.drain + 10)
        self.stop_secs = time.monotonic() - t0
        info.update(exit_code=rc, stop_secs=round(self.stop_secs, 3))
        if not alive_before:
            self.problems.append(f"process had already exited (code {rc}) before SIGTERM")
        elif rc not in (0, -signal.SIGTERM):
            self.problems.append(f"exit code {rc} after SIGTERM (expected 0)")
        if self.stop_secs > self.drain + 5:
            self.problems.append(f"took {self.stop_secs:.1f}s to exit after SIGTERM "
                                 f"(shutdown_drain_secs={self.drain})")
        self.problems += scan_json_log(p.bench_log)   # type: ignore[attr-defined]
        info["log"] = str(p.bench_log)               # type: ignore[attr-defined]
        ev = log_events(p.bench_log)                  # type: ignore[attr-defined]
        info["events"] = ev
        if self.log_level in ("debug", "info"):
            # the fast path announces itself once per rule (SPEC §2.2)
            sel = ev.get("proxy.splice_selected", 0)
            if self.splice and sel == 0 and self.tcp_used:
                self.problems.append("proxy.splice_selected never logged: splice fast path "
                                     "apparently not taken")
            if not self.splice and sel:
                self.problems.append("proxy.splice_selected logged although "
                                     "PORTUNUS_DISABLE_SPLICE=1")
        return info


def _deployment_cls():
    """bench/control_plane.py's Deployment (a real server + one enrolled client)."""
    try:
        from control_plane import Deployment
    except ImportError:
        sys.path.insert(0, str(HERE))
        from control_plane import Deployment
    return Deployment


class ClientPath(PathBase):
    """Client mode (SPEC §11): a real `<bin> server` pushes the three bench rules
    (same as the standalone config) to a real `<bin> client`, which carries the
    bytes. Proxy CPU/RSS are the client's; the server is stopped afterwards."""
    supports_udp = True

    def __init__(self, name: str, base_argv: list[str], splice: bool, drain_secs: int = 1):
        super().__init__()
        self.name, self.base, self.splice, self.drain = name, base_argv, splice, drain_secs
        self.tcp_used = True
        self.dep = None
        self.tmp: str | None = None
        self.server: subprocess.Popen | None = None
        self.timings: dict[str, float] = {}

    def env(self) -> dict:
        env = dict(os.environ)
        env.pop("PORTUNUS_DISABLE_SPLICE", None)
        if not self.splice:
            env["PORTUNUS_DISABLE_SPLICE"] = "1"
        return env

    def rules(self, f: Backends, be: Backends) -> list[dict]:
        c = _deployment_cls().CLIENT_NAME
        common = {"client": c, "listen_host": LOOPBACK}
        return [
            {**common, "listen_port": f.iperf, "target": f"{LOOPBACK}:{be.iperf}", "protocol": "tcp"},
            {**common, "listen_port": f.http, "target": f"{LOOPBACK}:{be.http}", "protocol": "tcp"},
            {**common, "listen_port": f.udp, "target": f"{LOOPBACK}:{be.udp}", "protocol": "udp",
             "udp_max_flows": 4096},
        ]

    def start(self, be, procs):
        f = Backends(free_port(), free_port(), free_port())
        self.tmp = tempfile.mkdtemp(prefix=f"portunus-bench-{self.name}-")
        server_env = dict(os.environ)
        server_env.pop("PORTUNUS_DISABLE_SPLICE", None)

        def spawn(name, argv, env=None):
            p = procs.spawn(f"{self.name}-{name}", argv, cwd=str(REPO),
                            env=env if env is not None else server_env)
            p.log_path = p.bench_log        # type: ignore[attr-defined]
            return p

        self.dep = dep = _deployment_cls()(
            self.base, self.tmp, spawn=spawn, client_env=self.env(),
            client_args=["--shutdown-drain-timeout-secs", str(self.drain)])
        t0 = time.monotonic()
        try:
            dep.start_server()
            self.server = dep.server_proc
            t1 = time.monotonic()
            bundle = dep.enroll()
            t2 = time.monotonic()
            try:
                dep.start_client(bundle)
            finally:
                self.proc = dep.client_proc
            t3 = time.monotonic()
            for body in self.rules(f, be):
                try:
                    status, res = dep.call("POST", "/v1/rules", body, timeout=30)
                except urllib.error.HTTPError as e:
                    raise BenchError(f"POST /v1/rules {body} -> {e.code}: "
                                     f"{e.read()[:300].decode(errors='replace')}") from None
                if status != 201:
                    raise BenchError(f"POST /v1/rules {body} -> {status} (wanted 201): {res}")
            t4 = time.monotonic()
            # the 201 means the client activated the rule; check the sockets anyway
            wait_ready([f.iperf, f.http], [f.udp], self.proc, timeout=5)
        except (RuntimeError, OSError) as e:
            raise BenchError(f"{type(e).__name__}: {e}") from None
        self.timings = {"server_start_s": round(t1 - t0, 3), "enroll_s": round(t2 - t1, 3),
                        "client_connect_s": round(t3 - t2, 3), "push_3_rules_s": round(t4 - t3, 4)}
        log(f"  {self.name:<19} server {t1 - t0:.2f}s, enroll {t2 - t1:.2f}s, client connected "
            f"{t3 - t2:.2f}s, 3 rules pushed (201) {1000 * (t4 - t3):.0f} ms")
        self.fronts = f
        addrs = listener_addrs([f.iperf, f.http])
        if addrs - {LOOPBACK}:
            self.problems.append(f"rules pushed with listen_host={LOOPBACK} but listeners "
                                 f"bound {sorted(addrs)}")
        # "start -> listening" for the client: process start -> rules active
        return f, t4 - t2

    def stop(self, procs):
        info: dict = {"timings": self.timings}
        p, srv = self.proc, self.server
        if self.dep is not None:        # also after a start that failed half-way
            p = p or self.dep.client_proc
            srv = srv or self.dep.server_proc
        if p is not None:
            info["peak_rss_mib"] = proc_peak_rss_mib(p.pid)
            alive_before = p.poll() is None
            t0 = time.monotonic()
            rc = procs.stop(p, grace=self.drain + 10)
            stop_secs = time.monotonic() - t0
            info.update(exit_code=rc, stop_secs=round(stop_secs, 3))
            if not alive_before:
                self.problems.append(f"client had already exited (code {rc}) before SIGTERM")
            elif rc not in (0, -signal.SIGTERM):
                self.problems.append(f"client exit code {rc} after SIGTERM (expected 0)")
            if stop_secs > self.drain + 5:
                self.problems.append(f"client took {stop_secs:.1f}s to exit after SIGTERM "
                                     f"(--shutdown-drain-timeout-secs {self.drain})")
            self.problems += ["client: " + x for x in scan_json_log(p.bench_log)]  # type: ignore
            ev = log_events(p.bench_log)                                            # type: ignore
            info["events"], info["log"] = ev, str(p.bench_log)                      # type: ignore
            sel = ev.get("proxy.splice_selected", 0)
            if self.splice and sel == 0 and self.tcp_used and self.fronts is not None:
                self.problems.append("proxy.splice_selected never logged by the client: splice "
                                     "fast path apparently not taken")
            if not self.splice and sel:
                self.problems.append("proxy.splice_selected logged by the client although "
                                     "PORTUNUS_DISABLE_SPLICE=1")
        if srv is not None:
            info["server_peak_rss_mib"] = proc_peak_rss_mib(srv.pid)
            alive_before = srv.poll() is None
            rc = procs.stop(srv, grace=10)
            info["server_exit_code"] = rc
            if not alive_before:
                self.problems.append(f"server had already exited (code {rc}) before SIGTERM")
            elif rc not in (0, -signal.SIGTERM):
                self.problems.append(f"server exit code {rc} after SIGTERM (expected 0)")
            self.problems += ["server: " + x for x in scan_json_log(srv.bench_log)]  # type: ignore
            info["server_log"] = str(srv.bench_log)                                   # type: ignore
        if self.dep is not None:
            for q in self.dep.procs:        # e.g. a `client enroll` that hung
                if q.poll() is None:
                    procs.stop(q, grace=2)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)     # server keys, bundle, state
            self.tmp = None
        self.proc = self.server = self.dep = None
        return info

    def teardown(self, procs) -> dict:
        """After a failed start: stop whatever did start."""
        return self.stop(procs)


def log_events(path: Path) -> dict[str, int]:
    """event name -> count, for every JSON line of a log."""
    ev: dict[str, int] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ev
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "event" in rec:
            ev[str(rec["event"])] = ev.get(str(rec["event"]), 0) + 1
    return ev


def scan_json_log(path: Path, limit: int = 30) -> list[str]:
    """Warn/error events and non-JSON lines (tracebacks) from a JSON-lines log."""
    counts: dict[str, int] = {}
    examples: dict[str, str] = {}
    raw: list[str] = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError
        except ValueError:
            if len(raw) < limit:
                raw.append(line)
            continue
        lvl = str(rec.get("level", "")).lower()
        if lvl in ("warn", "warning", "error", "critical", "fatal"):
            key = f"{lvl}:{rec.get('event')}"
            counts[key] = counts.get(key, 0) + 1
            examples.setdefault(key, line[:400])
    out = [f"{k} x{n}: {examples[k]}" for k, n in counts.items()]
    if raw:
        out.append("non-JSON stderr: " + " | ".join(raw)[:2000])
    return out


# --------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------

def iperf_once(procs: Procs, front: int, backend: int, secs: int, reverse: bool) -> dict:
    srv = procs.spawn("iperf3-server", ["iperf3", "-s", "-1", "-B", LOOPBACK, "-p", str(backend)])
    try:
        wait_ready([backend], [], srv, timeout=10)
        argv = ["iperf3", "-c", LOOPBACK, "-p", str(front), "-t", str(secs), "-J",
                "--connect-timeout", "3000"]
        if reverse:
            argv.append("-R")
        rc, out, err = procs.run("iperf3-client", argv, timeout=secs + 20)
        try:
            j = json.loads(out)
        except ValueError:
            raise BenchError(f"iperf3 output not JSON (rc={rc}): {out[:300]} {err[:300]}")
        if j.get("error"):
            raise BenchError(f"iperf3: {j['error']}")
        recv = j["end"]["sum_received"]
        try:
            srv.wait(timeout=5)          # -1: the server exits after its one test
        except subprocess.TimeoutExpired:
            pass
        return {"gbps": recv["bits_per_second"] / 1e9, "bytes": recv.get("bytes"),
                "retransmits": j["end"].get("sum_sent", {}).get("retransmits"),
                "cpu": j["end"].get("cpu_utilization_percent")}
    finally:
        procs.stop(srv, grace=2)


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(out: str) -> dict:
    res: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise BenchError(f"cannot parse wrk output: {out[-500:]}")
    res["rps"] = float(m.group(1))
    for pct, val, unit in re.findall(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M):
        res[f"p{pct}_ms"] = float(val) * _UNIT[unit]
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                    map(int, m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    return res


def wrk_once(procs: Procs, port: int, secs: int, threads: int, conns: int, close: bool) -> dict:
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{secs}s", "--latency", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{LOOPBACK}:{port}/")
    rc, out, err = procs.run("wrk", argv, timeout=secs + 30)
    if rc != 0:
        raise BenchError(f"wrk rc={rc}: {err[-300:]} {out[-300:]}")
    return parse_wrk(out)


def http_get(port: int, timeout: float = 3.0) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def idle_rtt(port: int, n: int, timeout: float) -> dict:
    """Sequential requests on one kept-alive connection: unloaded added latency."""
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    want = len(RESP_KEEPALIVE)
    lat = []
    deadline = time.monotonic() + timeout
    with socket.create_connection((LOOPBACK, port), timeout=3.0) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(n + 20):
            t0 = time.perf_counter_ns()
            s.sendall(req)
            got = 0
            while got < want:
                chunk = s.recv(65536)
                if not chunk:
                    raise BenchError("connection closed during idle RTT test")
                got += len(chunk)
            if i >= 20:                      # warm-up
                lat.append((time.perf_counter_ns() - t0) / 1000.0)
            if time.monotonic() > deadline:
                break
    if not lat:
        raise BenchError("idle RTT test ran out of time during warm-up")
    lat.sort()
    return {"p50_us": lat[len(lat) // 2], "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "n": len(lat)}


def udp_load(port: int, flows: int, count: int, window: int, max_secs: float,
             size: int = 64) -> dict:
    """Closed-loop UDP echo load: at most `window` datagrams in flight, spread
    round-robin over `flows` source sockets (one proxy flow each).

    A datagram not answered is lost; when nothing comes back for 50 ms the
    in-flight window is presumed lost and refilled. Stops after `count`
    datagrams or `max_secs`, then drains replies for up to 0.5 s."""
    socks = []
    ep = select.epoll()
    try:
        for _ in range(flows):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((LOOPBACK, 0))
            s.connect((LOOPBACK, port))
            s.setblocking(False)
            ep.register(s.fileno(), select.EPOLLIN)
            socks.append(s)
        by_fd = {s.fileno(): s for s in socks}
        payload = b"P" * size
        sent = received = errors = stalls = 0
        inflight = 0
        rr = 0
        t0 = time.monotonic()
        deadline = t0 + max_secs
        last_rx = t0
        last_progress = t0
        while sent < count:
            now = time.monotonic()
            if now > deadline:
                break
            while inflight < window and sent < count:
                s = socks[rr]
                rr = (rr + 1) % flows
                try:
                    s.send(payload)
                except (BlockingIOError, ConnectionRefusedError, OSError):
                    errors += 1
                sent += 1
                inflight += 1
            events = ep.poll(0.01)
            now = time.monotonic()
            if not events:
                if now - last_progress > 0.05:
                    stalls += 1
                    inflight = 0
                    last_progress = now
                continue
            for fd, _ in events:
                s = by_fd[fd]
                while True:
                    try:
                        s.recv(2048)
                    except BlockingIOError:
                        break
                    except OSError:
                        errors += 1
                        break
                    received += 1
                    inflight = max(0, inflight - 1)
                last_rx = last_progress = now
        end = time.monotonic() + 0.5
        while received < sent and time.monotonic() < end:
            events = ep.poll(0.05)
            for fd, _ in events:
                s = by_fd[fd]
                while True:
                    try:
                        s.recv(2048)
                    except BlockingIOError:
                        break
                    except OSError:
                        errors += 1
                        break
                    received += 1
                    last_rx = time.monotonic()
        elapsed = max(last_rx - t0, 1e-6)
        return {"pps": received / elapsed, "sent": sent, "received": received,
                "loss_pct": 100.0 * (sent - received) / sent if sent else 0.0,
                "errors": errors, "stalls": stalls, "elapsed_s": elapsed}
    finally:
        ep.close()
        for s in socks:
            s.close()


def udp_probe(port: int, timeout: float = 2.0) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        s.settimeout(0.2)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                s.sendto(b"probe", (LOOPBACK, port))
                data, _ = s.recvfrom(2048)
                if data == b"probe":
                    return True
            except (socket.timeout, OSError):
                pass
    return False


# --------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------

class Runner:
    def __init__(self, args, procs: Procs, workdir: Path):
        self.a, self.procs, self.workdir = args, procs, workdir
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.details: dict[str, list[dict]] = {}
        self.problems: dict[str, list[str]] = {}
        self.errors: dict[str, list[str]] = {}
        self.started = time.monotonic()
        self.skipped_for_time = False
        self.last_host_busy: float | None = None
        self.last_cpu_secs: float | None = None

    def add(self, path: str, metric: str, value) -> None:
        if value is None:
            return
        self.samples.setdefault(path, {}).setdefault(metric, []).append(float(value))

    def note_error(self, path: str, msg: str) -> None:
        log(f"  ERROR [{path}] {msg}")
        self.errors.setdefault(path, []).append(msg)

    def out_of_time(self) -> bool:
        if time.monotonic() - self.started > self.a.max_total_secs:
            if not self.skipped_for_time:
                log(f"total time budget ({self.a.max_total_secs}s) exhausted; skipping the rest")
            self.skipped_for_time = True
            return True
        return False

    def cpu_pct(self, path: PathBase, fn):
        """Run fn(); return (result, proxy CPU %). Whole-host busy % during fn()
        is left in self.last_host_busy (100 % = every core busy)."""
        pid = path.pid
        c0 = proc_cpu_secs(pid) if pid else None
        h0 = _stat_snap()
        t0 = time.monotonic()
        r = fn()
        h1 = _stat_snap()
        self.last_host_busy = None
        if h0 and h1:
            self.last_host_busy = 100.0 * (1 - (h1[1] - h0[1]) / max(h1[0] - h0[0], 1))
        self.last_cpu_secs = None
        if c0 is None:
            return r, None
        c1 = proc_cpu_secs(pid)
        if c1 is None:
            return r, None
        self.last_cpu_secs = c1 - c0
        return r, 100.0 * (c1 - c0) / max(time.monotonic() - t0, 1e-6)

    def run_path(self, path: PathBase, be: Backends, rep: int) -> None:
        a, n = self.a, path.name
        if not path.supports_udp and not ({"tcp", "http"} & set(a.only)):
            return                      # nothing this path can be measured on
        detail: dict = {"repeat": rep}
        self.details.setdefault(n, []).append(detail)
        if isinstance(path, (PortunusPath, ClientPath)):
            path.tcp_used = "tcp" in a.only or "http" in a.only
        try:
            fronts, startup = path.start(be, self.procs)
        except BenchError as e:
            self.note_error(n, f"start failed: {e}")
            if isinstance(path, ClientPath):
                detail["stop"] = path.teardown(self.procs)
            elif path.proc is not None:
                detail["stop"] = path.stop(self.procs)
            self._collect_problems(path)
            return
        self.add(n, "proxy_startup_s", startup)
        try:
            # sanity: the path must actually forward before we measure it
            if "http" in a.only or "tcp" in a.only:
                resp = http_get(fronts.http)
                if not resp.startswith(b"HTTP/1.1 200") or not resp.endswith(_BODY):
                    raise BenchError(f"sanity GET through {n} returned {resp[:120]!r}")
            if "udp" in a.only and path.supports_udp and not udp_probe(fronts.udp):
                raise BenchError(f"sanity UDP echo through {n} got no reply")
            if "tcp" in a.only:
                self._tcp(path, fronts, be, detail)
            if "http" in a.only:
                self._http(path, fronts, detail)
            if "udp" in a.only and path.supports_udp:
                self._udp(path, fronts, detail)
        except (BenchError, OSError) as e:
            self.note_error(n, f"{type(e).__name__}: {e}")
        finally:
            if isinstance(path, ClientPath) and path.proc is None:
                detail["stop"] = path.teardown(self.procs)
                self._collect_problems(path)
            elif path.proc is not None:
                if path.proc.poll() is not None:
                    self.note_error(n, f"proxy process died during the run (code {path.proc.returncode})")
                info = path.stop(self.procs)
                detail["stop"] = info
                self.add(n, "proxy_peak_rss_mib", info.get("peak_rss_mib"))
                self._collect_problems(path)

    def _collect_problems(self, path: PathBase) -> None:
        if path.problems:
            lst = self.problems.setdefault(path.name, [])
            for p in path.problems:
                if p not in lst:
                    lst.append(p)
                    log(f"  problem [{path.name}] {p[:300]}")
            path.problems = []

    def _tcp(self, path, f, be, detail):
        a, n = self.a, path.name
        for metric, rev in (("tcp_bulk_gbps", False), ("tcp_bulk_rev_gbps", True)):
            if rev and not a.reverse:
                continue
            if self.out_of_time():
                return
            try:
                r, cpu = self.cpu_pct(path, lambda: iperf_once(self.procs, f.iperf, be.iperf,
                                                               a.tcp_secs, rev))
            except BenchError as e:
                self.note_error(n, f"{metric}: {e}")
                continue
            self.add(n, metric, r["gbps"])
            if not rev:
                self.add(n, "tcp_bulk_proxy_cpu_pct", cpu)
                self.add(n, "tcp_bulk_host_busy_pct", self.last_host_busy)
                if self.last_cpu_secs is not None and r.get("bytes"):
                    self.add(n, "tcp_bulk_proxy_cpu_ms_per_gb",
                             self.last_cpu_secs * 1e3 / (r["bytes"] / 1e9))
            detail[metric] = {**r, "proxy_cpu_pct": cpu, "host_busy_pct": self.last_host_busy}
            log(f"  {n:<19} {metric:<22} {r['gbps']:.2f} Gbit/s"
                + (f"  (proxy cpu {cpu:.0f}%)" if cpu is not None else ""))

    def _http(self, path, f, detail):
        a, n = self.a, path.name
        for kind, close in (("keepalive", False), ("close", True)):
            if self.out_of_time():
                return
            try:
                r, cpu = self.cpu_pct(path, lambda: wrk_once(self.procs, f.http, a.wrk_secs,
                                                             a.wrk_threads, a.wrk_conns, close))
            except BenchError as e:
                self.note_error(n, f"http_{kind}: {e}")
                continue
            self.add(n, f"http_{kind}_rps", r["rps"])
            self.add(n, f"http_{kind}_p50_ms", r.get("p50_ms"))
            self.add(n, f"http_{kind}_p99_ms", r.get("p99_ms"))
            self.add(n, f"http_{kind}_proxy_cpu_pct", cpu)
            if self.last_cpu_secs is not None and r.get("requests"):
                self.add(n, f"http_{kind}_proxy_cpu_us_per_req",
                         self.last_cpu_secs * 1e6 / r["requests"])
            detail[f"http_{kind}"] = {**r, "proxy_cpu_pct": cpu, "host_busy_pct": self.last_host_busy}
            errs = sum(r["socket_errors"].values()) if r["socket_errors"] else 0
            if errs or r["non_2xx"]:
                self.problems.setdefault(n, []).append(
                    f"wrk {kind}: socket errors {r['socket_errors']}, non-2xx {r['non_2xx']}")
            log(f"  {n:<19} http_{kind:<17} {r['rps']:.0f} req/s p50 {r.get('p50_ms', 0):.3f} ms "
                f"p99 {r.get('p99_ms', 0):.3f} ms  errors {errs}"
                + (f"  (proxy cpu {cpu:.0f}%)" if cpu is not None else ""))
        if self.out_of_time():
            return
        try:
            r = idle_rtt(f.http, a.rtt_count, timeout=a.wrk_secs + 5)
        except (BenchError, OSError) as e:
            self.note_error(n, f"idle rtt: {e}")
            return
        self.add(n, "http_idle_rtt_p50_us", r["p50_us"])
        self.add(n, "http_idle_rtt_p99_us", r["p99_us"])
        detail["http_idle_rtt"] = r
        log(f"  {n:<19} idle rtt               p50 {r['p50_us']:.0f} us p99 {r['p99_us']:.0f} us")

    def _udp(self, path, f, detail):
        a, n = self.a, path.name
        for key, flows in (("1flow", 1), ("manyflow", a.udp_flows)):
            if self.out_of_time():
                return
            r, cpu = self.cpu_pct(path, lambda: udp_load(f.udp, flows, a.udp_count,
                                                         a.udp_window, a.udp_secs))
            self.add(n, f"udp_{key}_pps", r["pps"])
            self.add(n, f"udp_{key}_loss_pct", r["loss_pct"])
            if key == "manyflow":
                self.add(n, "udp_manyflow_proxy_cpu_pct", cpu)
            detail[f"udp_{key}"] = {**r, "flows": flows, "proxy_cpu_pct": cpu,
                                    "host_busy_pct": self.last_host_busy}
            log(f"  {n:<19} udp_{key:<18} {r['pps']:.0f} pkt/s  sent {r['sent']} recv "
                f"{r['received']} loss {r['loss_pct']:.2f}%  stalls {r['stalls']}"
                + (f"  (proxy cpu {cpu:.0f}%)" if cpu is not None else ""))


# --------------------------------------------------------------------------
# summary, table, compare
# --------------------------------------------------------------------------

def summarize(samples: dict) -> dict:
    out: dict = {}
    for path, metrics in samples.items():
        for m, vals in metrics.items():
            group, unit, better, compared, label = METRICS[m]
            out.setdefault(path, {})[m] = {
                "median": statistics.median(vals), "min": min(vals), "max": max(vals),
                "samples": vals, "unit": unit, "better": better, "compared": compared,
            }
    return out


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "Gbit/s":
        return f"{v:.2f}"
    if unit in ("req/s", "conn/s", "pkt/s"):
        return f"{v:,.0f}"
    if unit == "ms":
        return f"{v:.3f}"
    if unit in ("us",):
        return f"{v:.0f}"
    if unit == "%":
        return f"{v:.1f}"
    return f"{v:.2f}"


def print_table(summary: dict, paths: list[str], na: dict[str, set], errors: dict) -> str:
    lines = []
    colw = 20
    head = f"{'metric':<36}{'unit':<8}" + "".join(f"{p:>{colw}}" for p in paths)
    lines += [head, "-" * len(head)]
    for m, (group, unit, better, compared, label) in METRICS.items():
        if not any(m in summary.get(p, {}) for p in paths):
            continue
        row = f"{label:<36}{unit:<8}"
        for p in paths:
            s = summary.get(p, {}).get(m)
            if s is None:
                cell = "n/a" if group in na.get(p, set()) else ("error" if p in errors else "-")
            else:
                cell = fmt(s["median"], unit)
                if len(s["samples"]) > 1 and s["median"]:
                    spread = (s["max"] - s["min"]) / 2 / abs(s["median"]) * 100
                    cell += f" ±{spread:.0f}%"
            row += f"{cell:>{colw}}"
        lines.append(row)
    text = "\n".join(lines)
    print(text)
    return text


def ratios(summary: dict) -> dict:
    out = {}
    d = summary.get("direct", {})
    for m in ("tcp_bulk_gbps", "tcp_bulk_rev_gbps", "http_keepalive_rps", "http_close_rps",
              "udp_1flow_pps", "udp_manyflow_pps"):
        if m not in d or not d[m]["median"]:
            continue
        for p in ALL_PATHS:
            if p == "direct" or m not in summary.get(p, {}):
                continue
            out[f"{p}/direct:{m}"] = summary[p][m]["median"] / d[m]["median"]
    return out


def compare(current: dict, baseline: dict, threshold_pct: float) -> tuple[list[dict], list[str]]:
    rows, missing = [], []
    base = baseline.get("summary", {})
    for path, metrics in base.items():
        for m, b in metrics.items():
            if not b.get("compared", True) or m not in METRICS or not METRICS[m][3]:
                continue
            c = current.get(path, {}).get(m)
            if c is None:
                missing.append(f"{path}/{m}")
                continue
            bv, cv, better = b["median"], c["median"], METRICS[m][2]
            slack = ABS_SLACK.get(m, 0.0)
            if better == "higher":
                worse = cv < bv * (1 - threshold_pct / 100) - slack
                change = (cv - bv) / bv * 100 if bv else 0.0
            else:
                worse = cv > bv * (1 + threshold_pct / 100) + slack
                change = (cv - bv) / bv * 100 if bv else (0.0 if cv == bv else float("inf"))
            rows.append({"path": path, "metric": m, "baseline": bv, "current": cv,
                         "change_pct": change, "better": better, "regressed": worse})
    return rows, missing


# --------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------

def _stat_snap() -> tuple[int, int] | None:
    """(total jiffies, idle+iowait jiffies) over all CPUs, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(v[:8]), v[3] + (v[4] if len(v) > 4 else 0)


def host_busy_pct(secs: float = 1.0) -> float | None:
    """Whole-machine CPU busy % over `secs`."""
    a = _stat_snap()
    time.sleep(secs)
    b = _stat_snap()
    if not a or not b:
        return None
    return 100.0 * (1 - (b[1] - a[1]) / max(b[0] - a[0], 1))


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def ver(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return None

    git = None
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        git = rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "hostname": platform.node(), "nproc": os.cpu_count(), "cpu_model": cpu,
        "kernel": platform.release(), "python": platform.python_version(),
        "iperf3": ver(["iperf3", "--version"]), "wrk": ver(["wrk", "--version"]),
        "haproxy": ver(["haproxy", "-v"]), "git": git,
    }


def resolve_bin(spec: str) -> list[str] | None:
    argv = shlex.split(spec)
    if not argv:
        return None
    exe = argv[0]
    cand = Path(exe) if os.sep in exe else None
    if cand is not None:
        if not cand.is_absolute():
            cand = (Path.cwd() / cand) if (Path.cwd() / cand).exists() else (REPO / cand)
        if not cand.exists():
            return None
        # keep the symlink name: the zipapp picks its role from argv[0]
        argv[0] = str(cand.absolute())
    elif shutil.which(exe) is None:
        return None
    return argv


def portunus_commands(argv: list[str]) -> tuple[list[str] | None, list[str] | None, str | None]:
    """From the --bin command: (standalone argv, base argv that takes the role as its
    first argument, or None with the reason).

    `dist/portunus` and `python3 -m portunus` are base commands. For compatibility,
    `python3 -m portunus standalone` (a trailing role) and the `dist/portunus-standalone`
    symlink (role from argv[0]; its target is the base) are accepted too."""
    if argv[-1] in ROLES:
        base = argv[:-1]
        return base + ["standalone"], base, None
    name = os.path.basename(argv[0])
    m = re.fullmatch(r"portunus-(standalone|server|client)", name)
    if m:
        exe = Path(argv[0])
        if exe.is_symlink():
            base = [str(exe.resolve())] + argv[1:]
            return base + ["standalone"], base, None
        why = (f"{argv[0]} picks its role ({m.group(1)}) from its name; pass the zipapp itself "
               "(--bin dist/portunus) for the client-* paths")
        return (argv if m.group(1) == "standalone" else None), None, why
    return argv + ["standalone"], argv, None


def probe_portunus(procs: Procs, argv: list[str], workdir: Path) -> tuple[str | None, dict]:
    """Check the config with --check; prefer binding 127.0.0.1 via listen_host.

    Returns (listen_host or None, info)."""
    info: dict = {}
    exe = Path(argv[0])
    if exe.is_file():
        import hashlib
        real = exe.resolve()
        info["bin_file"] = str(real)
        info["bin_sha256"] = hashlib.sha256(real.read_bytes()).hexdigest()[:16]
        info["bin_mtime"] = _dt.datetime.fromtimestamp(real.stat().st_mtime).astimezone() \
            .isoformat(timespec="seconds")
    try:
        rc, out, err = procs.run("portunus-version", argv + ["--version"], timeout=30,
                                 env=dict(os.environ))
        info["version"] = (out.strip() or err.strip()).splitlines()[-1:] or None
    except BenchError as e:
        info["version"] = f"error: {e}"
    dummy = Backends(free_port(), free_port(), free_port())
    for lh in (LOOPBACK, None):
        cfg = workdir / "probe.toml"
        cfg.write_text(PortunusPath.config_text(dummy, dummy, lh, 1, "warn"))
        rc, out, err = procs.run("portunus-check", argv + ["--config", str(cfg), "--check"],
                                 timeout=60)
        info[f"check_listen_host_{lh}"] = {"rc": rc, "out": (out + err).strip()[-500:]}
        if rc == 0:
            info["listen_host"] = lh
            return lh, info
    raise BenchError("portunus --check rejected the benchmark config: "
                     + json.dumps({k: v for k, v in info.items() if k.startswith("check")}))


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Portunus benchmark: direct vs portunus (splice/userspace) vs haproxy.")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 s tests, repeat 1 (unless --repeat given); < 1 min")
    ap.add_argument("--only", default="tcp,http,udp", help="comma list of tcp,http,udp")
    ap.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                    help=f"comma list of {','.join(ALL_PATHS)} (default: all but haproxy-splice)")
    ap.add_argument("--bin", default="dist/portunus",
                    help="the portunus command, taking the role as its first argument "
                         "(standalone paths: BIN standalone --config F; client paths: "
                         "BIN server ... / BIN client ...); may contain args, e.g. "
                         "'python3 -m portunus'; default %(default)s")
    ap.add_argument("--repeat", type=int, default=None, help="repetitions per measurement "
                    "(median is reported); default 3, 1 with --quick")
    ap.add_argument("--compare", metavar="BASELINE_JSON",
                    help="compare medians with a baseline; exit 1 if a metric is worse by more "
                         "than --threshold percent")
    ap.add_argument("--threshold", type=float, default=25.0, help="regression threshold %% (25)")
    ap.add_argument("--write-baseline", action="store_true",
                    help="store this run as bench/baseline.json")
    ap.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    ap.add_argument("--tcp-secs", type=int, default=None, help="iperf3 -t (default 5; quick 1)")
    ap.add_argument("--no-reverse", dest="reverse", action="store_false",
                    help="skip the iperf3 -R run")
    ap.add_argument("--wrk-secs", type=int, default=None, help="wrk -d (default 5; quick 1)")
    ap.add_argument("--wrk-threads", type=int, default=2)
    ap.add_argument("--wrk-conns", type=int, default=32)
    ap.add_argument("--rtt-count", type=int, default=None, help="idle RTT samples (2000; quick 300)")
    ap.add_argument("--udp-count", type=int, default=None,
                    help="datagrams per UDP run (default 100000; quick 20000)")
    ap.add_argument("--udp-secs", type=float, default=None,
                    help="time cap per UDP run (default 5; quick 1)")
    ap.add_argument("--udp-flows", type=int, default=256, help="source sockets for the N-flow run")
    ap.add_argument("--udp-window", type=int, default=128, help="datagrams in flight (all flows)")
    ap.add_argument("--haproxy-threads", type=int, default=1,
                    help="haproxy nbthread (default 1: same core budget as the single "
                         "reactor of portunus)")
    ap.add_argument("--portunus-log-level", default="info",
                    choices=["debug", "info", "warn", "error"],
                    help="log_level in the generated TOML (default info, so that the runner can "
                         "check proxy.splice_selected; nothing is logged per connection)")
    ap.add_argument("--max-total-secs", type=float, default=1800,
                    help="overall time budget; remaining tests are skipped after it")
    ap.add_argument("--keep-logs", action="store_true", help="keep child logs even on success")
    a = ap.parse_args(argv)
    q = a.quick
    a.repeat = a.repeat if a.repeat is not None else (1 if q else 3)
    a.tcp_secs = a.tcp_secs or (1 if q else 5)
    a.wrk_secs = a.wrk_secs or (1 if q else 5)
    a.rtt_count = a.rtt_count or (300 if q else 2000)
    a.udp_count = a.udp_count or (20000 if q else 100000)
    a.udp_secs = a.udp_secs or (1.0 if q else 5.0)
    if q:
        a.max_total_secs = min(a.max_total_secs, 55)
    a.only = [x.strip() for x in a.only.split(",") if x.strip()]
    a.paths = [x.strip() for x in a.paths.split(",") if x.strip()]
    for x in a.only:
        if x not in ALL_GROUPS:
            ap.error(f"--only: unknown group {x!r}")
    for x in a.paths:
        if x not in ALL_PATHS:
            ap.error(f"--paths: unknown path {x!r}")
    if a.repeat < 1:
        ap.error("--repeat must be >= 1")
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_http-origin":
        serve_http_origin(int(argv[1]))
        return 0
    if argv and argv[0] == "_udp-echo":
        serve_udp_echo(int(argv[1]))
        return 0

    a = parse_args(argv)
    global PROCS
    for tool in ("iperf3", "wrk", "haproxy"):
        if shutil.which(tool) is None:
            log(f"WARNING: {tool} not found (apt-get install -y iperf3 wrk haproxy)")

    results_dir = Path(a.out).parent
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix=f"run-{stamp}-", dir=results_dir))
    logdir = workdir / "logs"
    logdir.mkdir()
    PROCS = procs = Procs(logdir)
    atexit.register(_cleanup)

    def _on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGINT, signal.default_int_handler)   # even if inherited as ignored
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)

    t_start = time.monotonic()
    meta = {"started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(["python3", "bench/run.py"] + list(argv)),
            "machine": machine_info(),
            "options": {k: v for k, v in vars(a).items()}, "workdir": str(workdir),
            "loadavg_start": os.getloadavg()}
    busy = host_busy_pct(1.0)
    meta["host_busy_pct_before"] = busy
    if busy is not None and busy > 15:
        log(f"WARNING: the machine is {busy:.0f}% busy before the run (other workloads); "
            "results will be noisy")
    runner = Runner(a, procs, workdir)
    interrupted = False
    na: dict[str, set] = {"haproxy": {"udp"}, "haproxy-splice": {"udp"}}
    paths: list[PathBase] = []
    summary: dict = {}
    rc = 0
    try:
        # ---- the forwarders under test
        standalone_argv = base_argv = None
        wanted = [p for p in a.paths if p in PORTUNUS_PATHS]
        if wanted:
            bin_argv = resolve_bin(a.bin)
            if bin_argv is None:
                msg = (f"portunus binary {a.bin!r} not found; portunus and client paths skipped "
                       "(build with ./build.sh or pass --bin 'python3 -m portunus')")
                log("WARNING: " + msg)
                for p in wanted:
                    runner.errors.setdefault(p, []).append(msg)
            else:
                standalone_argv, base_argv, why = portunus_commands(bin_argv)
                meta["portunus"] = {"argv": standalone_argv, "base_argv": base_argv}
                if base_argv is None:
                    for p in wanted:
                        if p.startswith("client"):
                            runner.errors.setdefault(p, []).append(why)
                if standalone_argv is not None:
                    try:
                        lh, pinfo = probe_portunus(procs, standalone_argv, workdir)
                        meta["portunus"].update(pinfo)
                        if lh is None:
                            log("WARNING: this portunus build rejects listen_host in the TOML; "
                                "its standalone listeners will bind 0.0.0.0 (product default) "
                                "during the run")
                    except BenchError as e:
                        log(f"ERROR: {e}")
                        meta["portunus"]["probe_error"] = str(e)
                        for p in wanted:
                            runner.errors.setdefault(p, []).append(str(e))
                        standalone_argv = base_argv = None
        for p in a.paths:
            if p == "direct":
                paths.append(DirectPath())
            elif p in ("haproxy", "haproxy-splice"):
                if shutil.which("haproxy"):
                    paths.append(HaproxyPath(workdir, a.haproxy_threads, p == "haproxy-splice"))
                else:
                    runner.errors.setdefault(p, []).append("haproxy not installed")
            elif p.startswith("client"):
                if base_argv is not None:
                    paths.append(ClientPath(p, base_argv, p == "client-splice"))
            elif standalone_argv is not None:
                paths.append(PortunusPath(p, standalone_argv, workdir, p == "portunus-splice",
                                          meta["portunus"].get("listen_host"),
                                          log_level=a.portunus_log_level))

        # ---- backends (shared by every path)
        be = Backends(free_port(), free_port(), free_port())
        me = [sys.executable, str(Path(__file__).resolve())]
        if "http" in a.only or "tcp" in a.only:
            origin = procs.spawn("http-origin", me + ["_http-origin", str(be.http)])
            wait_ready([be.http], [], origin, timeout=10)
        if "udp" in a.only:
            echo = procs.spawn("udp-echo", me + ["_udp-echo", str(be.udp)])
            wait_ready([], [be.udp], echo, timeout=10)
        meta["backends"] = {"iperf": be.iperf, "http": be.http, "udp": be.udp}

        # ---- measurements: repeats outermost, so paths are interleaved in time,
        #      and the path order rotates from one repeat to the next
        for rep in range(1, a.repeat + 1):
            k = (rep - 1) % max(len(paths), 1)
            for path in paths[k:] + paths[:k]:     # rotate: no path always runs first
                if runner.out_of_time():
                    break
                if not path.supports_udp and not ({"tcp", "http"} & set(a.only)):
                    continue
                log(f"repeat {rep}/{a.repeat}: {path.name}")
                runner.run_path(path, be, rep)
    except KeyboardInterrupt as e:
        interrupted = True
        log(f"interrupted ({str(e) or 'Ctrl-C'}); stopping children and writing partial results")
        rc = 130
    finally:
        procs.stop_all()
        for path in paths:      # client-mode data dirs (keys, bundle) of an interrupted run
            if isinstance(path, ClientPath) and path.tmp:
                shutil.rmtree(path.tmp, ignore_errors=True)

    summary = summarize(runner.samples)
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    meta["loadavg_end"] = os.getloadavg()
    shown = [p.name for p in paths] + [p for p in a.paths if p not in {x.name for x in paths}]
    print()
    print(f"Portunus bench  {meta['started']}  repeat={a.repeat}  "
          f"{'quick ' if a.quick else ''}tcp={a.tcp_secs}s wrk={a.wrk_secs}s "
          f"(-t{a.wrk_threads} -c{a.wrk_conns}) udp={a.udp_count}x64B/{a.udp_flows} flows; "
          f"median{' ±half-range' if a.repeat > 1 else ''}")
    m = meta["machine"]
    print(f"machine: {m['nproc']} cpu {m['cpu_model']}, kernel {m['kernel']}, "
          f"python {m['python']}, git {m['git']}; loadavg start "
          f"{meta['loadavg_start'][0]:.2f} end {meta['loadavg_end'][0]:.2f}")
    pm = meta.get("portunus")
    if pm and (pm.get("base_argv") or pm.get("argv")):
        print(f"portunus: {shlex.join(pm.get('base_argv') or pm['argv'])}  sha256 {pm.get('bin_sha256', '-')} "
              f"built {pm.get('bin_mtime', '-')}  listen_host {pm.get('listen_host') or '(default)'}")
    table = print_table(summary, shown, na, runner.errors)
    rat = ratios(summary)
    if rat:
        print()
        for k, v in rat.items():
            extra = ""
            if k in ("portunus-splice/direct:tcp_bulk_gbps", "client-splice/direct:tcp_bulk_gbps"):
                extra = f"   (§11 target >= 0.60: {'PASS' if v >= 0.60 else 'FAIL'})"
            print(f"ratio {k:<48} {v:6.3f}{extra}")
    if runner.errors:
        print("\nerrors:")
        for p, lst in runner.errors.items():
            for e in lst:
                print(f"  [{p}] {e}")
    if runner.problems:
        print("\nproblems seen (logs, exit codes, wrk errors):")
        for p, lst in runner.problems.items():
            for e in lst:
                print(f"  [{p}] {e[:500]}")

    doc = {"meta": meta, "summary": summary, "ratios": rat, "errors": runner.errors,
           "problems": runner.problems, "details": runner.details, "table": table,
           "interrupted": interrupted}
    if a.compare and not interrupted:
        try:
            baseline = json.loads(Path(a.compare).read_text())
        except (OSError, ValueError) as e:
            print(f"\ncannot read baseline {a.compare}: {e}")
            rc = 2
        else:
            rows, missing = compare(summary, baseline, a.threshold)
            doc["compare"] = {"baseline": a.compare, "threshold_pct": a.threshold,
                              "rows": rows, "missing": missing}
            print(f"\ncompare with {a.compare} (medians; fail if > {a.threshold:.0f}% worse):")
            for r in rows:
                flag = "REGRESSED" if r["regressed"] else "ok"
                print(f"  {r['path']:<20}{r['metric']:<26}{r['baseline']:>14.4g}{r['current']:>14.4g}"
                      f"{r['change_pct']:>+9.1f}%  {flag}")
            if missing:
                by_path: dict[str, int] = {}
                for x in missing:
                    by_path[x.split("/")[0]] = by_path.get(x.split("/")[0], 0) + 1
                print("  in baseline but not measured this run (not a failure): "
                      + ", ".join(f"{p} ({n} metrics)" for p, n in by_path.items()))
            if any(r["regressed"] for r in rows):
                print("RESULT: regression beyond threshold")
                rc = 1
            else:
                print("RESULT: no regression beyond threshold")
    if rc == 0 and runner.errors:
        rc = 2          # incomplete run: some path or test could not be measured
    out = Path(a.out)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nresults: {out}")
    if a.write_baseline and not interrupted:
        bl = HERE / "baseline.json"
        bl.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"baseline written: {bl}")
    if not interrupted and not runner.errors and not runner.problems and not a.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"child logs kept in {workdir}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
