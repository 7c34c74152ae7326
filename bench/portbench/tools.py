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

def _iperf_json(out: str, rc: int, err: str, what: str) -> dict:
    """The JSON object of an `iperf3 -J` run, or a BenchError that says what came instead."""
    try:
        j = json.loads(out)
    except ValueError:
        raise BenchError(f"{what} output not JSON (rc={rc}): {out[:300]} {err[:300]}") from None
    if not isinstance(j, dict):
        raise BenchError(f"{what} output not a JSON object (rc={rc}): {out[:300]}")
    if j.get("error"):
        raise BenchError(f"{what}: {j['error']}")
    return j


def parse_iperf(out: str, rc: int = 0, err: str = "") -> dict:
    """`iperf3 -J` output -> receiver's rate and bytes, sender's retransmits, CPU."""
    j = _iperf_json(out, rc, err, "iperf3")
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


# --------------------------------------------------------------------------
# iperf3 UDP: a C generator, unidirectional, and a search for the 0 %-loss rate
# --------------------------------------------------------------------------

IPERF_UDP_HEADER = 12       # iperf3's per-datagram header (sec, usec, 32-bit seq) in the -l bytes


def parse_iperf_udp(out: str, rc: int = 0, err: str = "") -> dict:
    """`iperf3 -u -J` client output -> the receiver's view of one test.

    iperf3 3.12 puts the server's figures in end.sum_received: `packets` is the highest
    sequence number seen, `lost_packets` the gaps below it (datagrams dropped on the
    way, less the late ones that arrived out of order). sum_sent.packets is what the
    client sent. A datagram after the last one received (dropped at the very end, or
    still queued when the server stopped reading) is not in lost_packets; `tail` counts
    those (sent - packets), reported beside the loss, never as loss."""
    j = _iperf_json(out, rc, err, "iperf3 -u")
    try:
        end = j["end"]
        recv, sent = end["sum_received"], end["sum_sent"]
        packets, lost = int(recv["packets"]), int(recv["lost_packets"])
        secs = float(recv["seconds"])
        sent_packets = int(sent["packets"])
        sent_secs = float(sent.get("seconds", secs))
    except (KeyError, TypeError, ValueError):
        raise BenchError("iperf3 -u output has no end.sum_received / end.sum_sent packet counts "
                         f"(rc={rc}; not a UDP test?): {out[-300:]}") from None
    if packets < 0 or lost < 0 or lost > packets or secs <= 0:
        raise BenchError(f"iperf3 -u output has impossible counts: packets {packets}, lost "
                         f"{lost}, seconds {secs}")
    cpu = end.get("cpu_utilization_percent") or {}
    return {"sent": sent_packets, "packets": packets, "lost": lost,
            "received": packets - lost, "tail": max(0, sent_packets - packets),
            "seconds": secs, "sent_seconds": sent_secs,
            "client_cpu_pct": cpu.get("host_total"), "server_cpu_pct": cpu.get("remote_total")}


def combine_udp(results: list[dict]) -> dict:
    """The tests of several iperf3 client/server pairs run at once, as one: counts summed,
    over the longest of their durations; pps = received datagrams per second, loss_pct =
    lost / packets (iperf3's own loss), sent_pps = what the clients managed to send."""
    if not results:
        raise BenchError("no iperf3 -u results to combine")
    keys = ("sent", "packets", "lost", "received", "tail")
    tot = {k: sum(r[k] for r in results) for k in keys}
    secs = max(r["seconds"] for r in results)
    sent_secs = max(r["sent_seconds"] for r in results)
    tot.update(seconds=secs, pps=tot["received"] / secs,
               sent_pps=tot["sent"] / max(sent_secs, 1e-6),
               loss_pct=100.0 * tot["lost"] / tot["packets"] if tot["packets"] else 0.0,
               client_cpu_pct=[r["client_cpu_pct"] for r in results],
               server_cpu_pct=[r["server_cpu_pct"] for r in results], pairs=len(results))
    return tot


def iperf_udp_argv(front: int, streams: int, stream_pps: float, secs: int, size: int,
                   window: str | None) -> list[str]:
    """One iperf3 UDP client: `streams` flows (-P) of `size`-byte datagrams, each paced
    at `stream_pps` (iperf3's -b is per stream, in payload bits per second)."""
    bps = max(1, int(round(stream_pps * size * 8)))
    argv = ["iperf3", "-c", LOOPBACK, "-p", str(front), "-u", "-l", str(size), "-b", str(bps),
            "-t", str(secs), "-P", str(streams), "-J", "--connect-timeout", "3000"]
    if window:
        argv += ["-w", window]
    return argv


IPERF_MAX_STREAMS = 128     # iperf3 3.12 refuses -P above this


def split_flows(flows: int, pairs: int) -> list[int]:
    """Streams per iperf3 client for `flows` flows over `pairs` client/server pairs, as
    even as possible; every share within 1..IPERF_MAX_STREAMS."""
    if flows < 1 or pairs < 1:
        raise BenchError(f"cannot split {flows} flows over {pairs} iperf3 pairs")
    out = [flows // pairs + (1 if i < flows % pairs else 0) for i in range(pairs)]
    if out[-1] < 1 or out[0] > IPERF_MAX_STREAMS:
        raise BenchError(f"{flows} flows over {pairs} iperf3 pairs: {out} streams per client "
                         f"(iperf3 allows 1..{IPERF_MAX_STREAMS})")
    return out


def iperf_udp_once(procs: Procs, pairs: list[tuple[int, int]], flows: int, pps: float,
                   secs: int, size: int = 64, window: str | None = "2M") -> dict:
    """One unidirectional UDP test at an offered `pps` in total, over `flows` flows spread
    on the (front, backend) pairs: a one-shot iperf3 server per backend, then every client
    at once. Returns combine_udp() of the clients' results, plus `offered_pps`."""
    shares = split_flows(flows, len(pairs))
    servers = []
    try:
        for _, backend in pairs:
            servers.append(spawn_iperf_server(procs, backend))
        clients = []
        for (front, _), n in zip(pairs, shares):
            clients.append(procs.spawn("iperf3-udp-client",
                                       iperf_udp_argv(front, n, pps / flows, secs, size, window),
                                       capture=True))
        results = []
        deadline = time.monotonic() + secs + 20
        for c in clients:
            try:
                out, _ = c.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise BenchError(f"iperf3 -u client timed out after {secs + 20}s") from None
            err = c.log_path.read_text(errors="replace")
            results.append(parse_iperf_udp(out.decode(errors="replace"), c.returncode, err))
        for s in servers:
            try:
                s.wait(timeout=5)       # -1: the server exits after its one test
            except subprocess.TimeoutExpired:
                pass
        res = combine_udp(results)
        res["offered_pps"] = pps
        return res
    finally:
        for p in list(procs.live):
            if p.name == "iperf3-udp-client" and p.poll() is None:
                procs.stop(p, grace=2)
        for s in servers:
            procs.stop(s, grace=2)


def zero_loss_search(probe, start_pps: float, max_probes: int, *, max_loss_pct: float = 0.0,
                     factor: float = 2.0, resolution: float = 0.1,
                     min_pps: float = 1000.0, sender_slack: float = 0.9) -> dict:
    """The highest received rate with at most `max_loss_pct` loss (0: not one datagram
    lost), by a short search over the offered rate. Pure: `probe(pps) -> dict` with at
    least pps (received per second), sent_pps and loss_pct runs one test.

    Ramp: from start_pps, multiply by `factor` while a probe is clean. A clean probe whose
    sender fell short of the offered rate (sent_pps < sender_slack x offered) ends the
    ramp: the generator, not the path, is the limit there ("sender"). A lossy probe
    turns the ramp into a bisection between the best clean and the lowest lossy offer,
    until they are within `resolution` (relative) or `max_probes` ran. When even the
    first probe loses, the offer halves until one is clean or min_pps is passed.

    Returns {"pps", "loss_pct", "offered_pps", "probes", "limit", "trace", "best",
    "max_pps", "max_pps_loss_pct"}: the
    best clean probe's received rate (or, if none was clean, the least lossy probe, its
    loss > max_loss_pct saying so), how many probes ran, what ended the search
    ("sender", "loss" = a lossy probe bounds it within the resolution, "probes" = the
    budget ran out, "no-clean-rate"), every probe's (offered, result), and the highest
    received rate of any probe, lossy or not, with its loss (what the path forwarded at
    most: informational)."""
    if max_probes < 1 or start_pps <= 0:
        raise BenchError(f"bad rate search: start {start_pps} pps, {max_probes} probes")
    trace: list[tuple[float, dict]] = []
    best: tuple[float, dict] | None = None       # the clean probe with the highest pps
    good: float | None = None                    # the highest clean offer
    lossy: float | None = None                   # the lowest offer that lost
    offer, limit = start_pps, "probes"
    while len(trace) < max_probes:
        r = probe(offer)
        trace.append((offer, r))
        if r["loss_pct"] <= max_loss_pct:
            good = offer if good is None else max(good, offer)
            if best is None or r["pps"] > best[1]["pps"]:
                best = (offer, r)
            if r["sent_pps"] < sender_slack * offer:
                limit = "sender"
                break
        else:
            lossy = offer if lossy is None else min(lossy, offer)
        if good is None:                        # nothing clean yet: go down
            if offer / factor < min_pps:
                limit = "no-clean-rate"
                break
            offer = offer / factor
        elif lossy is None or lossy <= good:    # still ramping (or a lossy probe was noise)
            offer = good * factor
        elif lossy <= good * (1 + resolution):
            limit = "loss"
            break
        else:
            offer = (good + lossy) / 2
    if best is None:
        least = min(trace, key=lambda t: t[1]["loss_pct"])
        chosen, limit = least, "no-clean-rate"
    else:
        chosen = best
    top = max(trace, key=lambda t: t[1]["pps"])
    return {"pps": chosen[1]["pps"], "loss_pct": chosen[1]["loss_pct"], "offered_pps": chosen[0],
            "probes": len(trace), "limit": limit, "best": chosen[1],
            "max_pps": top[1]["pps"], "max_pps_loss_pct": top[1]["loss_pct"],
            "trace": [{"offered_pps": o, **{k: r[k] for k in TRACE_KEYS if k in r}}
                      for o, r in trace]}


# what each probe of a search keeps in its trace (the probe may add more than the search needs)
TRACE_KEYS = ("pps", "sent_pps", "loss_pct", "lost", "tail", "proxy_cpu_pct", "host_busy_pct",
              "host_rcvbuf_errors", "front_socket_drops", "drain_wait_s", "proxy_cpu_us_per_dgram",
              "proxy_syscalls_per_dgram")
