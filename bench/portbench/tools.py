"""The load generators: iperf3 and wrk (external), idle RTT and UDP echo load
(in the runner), one-shot probes, and the pure parsers of their output."""

from __future__ import annotations

import json
import re
import select
import socket
import subprocess
import time

from . import LOOPBACK, BenchError
from .mmsg import Batch
from .origins import spawn_iperf_server
from .procs import Procs


def percentile(values: list[float], p: float) -> float:
    """The sample at rank int(n * p) (0 <= p < 1) of the sorted values; no interpolation."""
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p))]


# --------------------------------------------------------------------------
# iperf3
# --------------------------------------------------------------------------

def parse_iperf(out: str, rc: int = 0, err: str = "") -> dict:
    """`iperf3 -J` output -> receiver's rate and bytes, sender's retransmits, CPU."""
    try:
        j = json.loads(out)
    except ValueError:
        raise BenchError(f"iperf3 output not JSON (rc={rc}): {out[:300]} {err[:300]}") from None
    if not isinstance(j, dict):
        raise BenchError(f"iperf3 output not a JSON object (rc={rc}): {out[:300]}")
    if j.get("error"):
        raise BenchError(f"iperf3: {j['error']}")
    try:
        recv = j["end"]["sum_received"]
        gbps = recv["bits_per_second"] / 1e9
    except (KeyError, TypeError):
        raise BenchError(f"iperf3 output has no end.sum_received (rc={rc}): {out[-300:]}") from None
    return {"gbps": gbps, "bytes": recv.get("bytes"),
            "retransmits": j["end"].get("sum_sent", {}).get("retransmits"),
            "cpu": j["end"].get("cpu_utilization_percent")}


def iperf_once(procs: Procs, front: int, backend: int, secs: int, reverse: bool) -> dict:
    srv = spawn_iperf_server(procs, backend)
    try:
        argv = ["iperf3", "-c", LOOPBACK, "-p", str(front), "-t", str(secs), "-J",
                "--connect-timeout", "3000"]
        if reverse:
            argv.append("-R")
        rc, out, err = procs.run("iperf3-client", argv, timeout=secs + 20)
        result = parse_iperf(out, rc, err)
        try:
            srv.wait(timeout=5)          # -1: the server exits after its one test
        except subprocess.TimeoutExpired:
            pass
        return result
    finally:
        procs.stop(srv, grace=2)


# --------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------

_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(out: str) -> dict:
    """`wrk --latency` text -> rps, p50/75/90/99 in ms, requests, socket errors, non-2xx."""
    res: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise BenchError(f"cannot parse wrk output: {out[-500:]}")
    res["rps"] = float(m.group(1))
    for pct, val, unit in re.findall(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M):
        res[f"p{pct}_ms"] = float(val) * _UNIT_MS[unit]
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


# --------------------------------------------------------------------------
# in-runner HTTP: sanity GET and idle RTT
# --------------------------------------------------------------------------

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


def response_length(buf: bytes) -> int | None:
    """Length of the first complete HTTP/1.1 response in `buf` (head + Content-Length body),
    or None while it is incomplete. Any origin's headers (nginx adds Server, Date, ...)."""
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        return None
    n = 0
    for line in buf[:i].split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            n = int(v.strip())
    total = i + 4 + n
    return total if len(buf) >= total else None


def idle_rtt(port: int, n: int, timeout: float, warmup: int = 20) -> dict:
    """Sequential requests on one kept-alive connection: unloaded added latency."""
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    lat = []
    deadline = time.monotonic() + timeout
    with socket.create_connection((LOOPBACK, port), timeout=3.0) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        want = None
        for i in range(n + warmup):
            t0 = time.perf_counter_ns()
            s.sendall(req)
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    raise BenchError("connection closed during idle RTT test")
                buf += chunk
                if want is not None and len(buf) >= want:
                    break
                if want is None and response_length(buf) is not None:
                    want = response_length(buf)   # same response every time: parse it once
                    break
            if i >= warmup:
                lat.append((time.perf_counter_ns() - t0) / 1000.0)
            if time.monotonic() > deadline:
                break
    if not lat:
        raise BenchError("idle RTT test ran out of time during warm-up")
    return {"p50_us": percentile(lat, 0.5), "p99_us": percentile(lat, 0.99), "n": len(lat)}


# --------------------------------------------------------------------------
# UDP echo load and probes
# --------------------------------------------------------------------------

def udp_result(sent: int, received: int, errors: int, stalls: int, elapsed: float) -> dict:
    return {"pps": received / elapsed, "sent": sent, "received": received,
            "loss_pct": 100.0 * (sent - received) / sent if sent else 0.0,
            "errors": errors, "stalls": stalls, "elapsed_s": elapsed}


def _drain(s: socket.socket, batch: Batch | None = None) -> tuple[int, int]:
    """Read every queued datagram: (datagrams, errors). With a Batch: recvmmsg, one
    syscall per up to batch.n datagrams."""
    n = 0
    if batch is not None:
        fd = s.fileno()
        while True:
            try:
                k = batch.recv(fd)
            except OSError:
                return n, 1
            n += k
            if k < batch.n:
                return n, 0
    while True:
        try:
            s.recv(2048)
        except BlockingIOError:
            return n, 0
        except OSError:
            return n, 1
        n += 1


def _flow_socket(port: int, ep: select.epoll) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((LOOPBACK, 0))
    s.connect((LOOPBACK, port))
    s.setblocking(False)
    ep.register(s.fileno(), select.EPOLLIN)
    return s


def udp_load(port: int, flows: int, count: int, window: int, max_secs: float,
             size: int = 64, batched: bool | None = None) -> dict:
    """Closed-loop UDP echo load: at most `window` datagrams in flight, spread
    round-robin over `flows` source sockets (one proxy flow each).

    A datagram not answered is lost; when nothing comes back for 50 ms the
    in-flight window is presumed lost and refilled. Stops after `count`
    datagrams or `max_secs`, then drains replies for up to 0.5 s.

    `batched` (default: where libc has them) uses sendmmsg for the one-flow sends and
    recvmmsg for every drain, so that the generator costs few syscalls per datagram
    and the proxy, not the generator, is the limit; "batched" in the result says
    which was used."""
    if batched is None:
        batched = Batch.available()
    rx = Batch(64) if batched else None
    tx = Batch(64) if batched and flows == 1 else None
    socks: list[socket.socket] = []
    ep = select.epoll()
    try:
        for _ in range(flows):
            socks.append(_flow_socket(port, ep))
        by_fd = {s.fileno(): s for s in socks}
        payload = b"P" * size
        sent = received = errors = stalls = inflight = rr = 0
        t0 = time.monotonic()
        deadline = t0 + max_secs
        last_rx = last_progress = t0
        fd0 = socks[0].fileno()
        while sent < count and time.monotonic() <= deadline:
            if tx is not None:
                k = min(window - inflight, count - sent)
                while k > 0:
                    try:
                        r = tx.send_copies(fd0, payload, k)
                    except OSError:     # e.g. ECONNREFUSED from an earlier ICMP: one lost
                        errors += 1
                        sent += 1
                        inflight += 1
                        k -= 1
                        continue
                    if r == 0:
                        break
                    sent += r
                    inflight += r
                    k -= r
            while inflight < window and sent < count:     # inline: this is the hot loop
                try:
                    socks[rr].send(payload)
                except OSError:     # BlockingIOError, ConnectionRefusedError, ...: lost
                    errors += 1
                rr = (rr + 1) % flows
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
                n, e = _drain(by_fd[fd], rx)
                received, errors = received + n, errors + e
                inflight = max(0, inflight - n)
                last_rx = last_progress = now
        end = time.monotonic() + 0.5
        while received < sent and time.monotonic() < end:
            for fd, _ in ep.poll(0.05):
                n, e = _drain(by_fd[fd], rx)
                received, errors = received + n, errors + e
                if n:
                    last_rx = time.monotonic()
        res = udp_result(sent, received, errors, stalls, max(last_rx - t0, 1e-6))
        res["batched"] = bool(batched)
        return res
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


def tcp_roundtrip_ok(port: int) -> bool:
    """One byte echoed through a TCP port (bench/control_plane.py's traffic check)."""
    try:
        c = socket.create_connection((LOOPBACK, port), timeout=2)
    except OSError:
        return False
    with c:
        c.settimeout(2)
        c.sendall(b"x")
        try:
            return c.recv(1) == b"x"
        except OSError:
            return False
