#!/usr/bin/env python3
"""Rate-limit accuracy and cost (issue 13, "Accuracy and cost"), through a real standalone.

  bandwidth     one connection sends as fast as it can into a rule capped at
                `bandwidth_in_bps` 1 MiB/s, 100 Mbit/s and 1 Gbit/s (burst = the default, one
                second of rate) for --secs; the bytes that reached the target are compared with
                rate x time + burst, and the proxy's CPU per GB on the capped path is reported
  conn_rate     `new_connections_per_sec = 2`, burst 2: 10 connections opened at once (how many
                pass), then one attempt every 50 ms for --conn-secs (passes per second)
  idle          --idle-conns connections on a rule with both bandwidth caps, each having moved a
                few bytes, then idle: the proxy's CPU over --idle-secs
  uncapped      iperf3 through a rule without caps, once in a process whose other rules are
                capped and once in a process without any cap (Gbit/s, CPU per GB, splice chosen)

Prints the machine load first, the figures, and writes bench/results/ratelimit.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

from portbench import LOOPBACK, REPO as ROOT, BenchError   # bench/ is sys.path[0]
from portbench.machine import machine_info, print_machine_load
from portbench.origins import TcpEcho
from portbench.procs import Procs, free_port, proc_cpu_secs, wait_ready
from portbench.product import script_command
from portbench.tools import iperf_once

MiB = 1 << 20
CAPS = {"1MiB/s": MiB, "100Mbit/s": 12_500_000, "1Gbit/s": 125_000_000}   # bytes per second


class Sink:
    """Accepts connections and counts every byte that reaches it; `hold` keeps idle ones open."""

    def __init__(self, port: int):
        self.port = port
        self.total = 0
        self.held: list[socket.socket] = []
        self.sock = socket.create_server((LOOPBACK, port), backlog=4096)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(c)
            threading.Thread(target=self._drain, args=(c,), daemon=True).start()

    def _drain(self, c):
        while True:
            try:
                data = c.recv(1 << 18)
            except OSError:
                return
            if not data:
                return
            self.total += len(data)

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


class HoldingSink:
    """Accepts and keeps connections without a thread each (the idle test holds a thousand)."""

    def __init__(self, port: int):
        self.held: list[socket.socket] = []
        self.sock = socket.create_server((LOOPBACK, port), backlog=4096)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


def rule(name: str, listen: int, target: int, caps: dict | None = None) -> str:
    text = (f'[[rule]]\nname = "{name}"\nlisten_host = "{LOOPBACK}"\nlisten_port = {listen}\n'
            f'target = "{LOOPBACK}:{target}"\n')
    if caps:
        text += "[rule.rate_limit]\n" + "".join(f"{k} = {v}\n" for k, v in caps.items())
    return text


def start_standalone(procs: Procs, tmp: Path, cmd: list[str], name: str, rules: str, ports: list[int]):
    cfg = tmp / f"{name}.toml"
    cfg.write_text('[global]\nlog_level = "info"\nlog_format = "json"\nshutdown_drain_secs = 1\n' + rules)
    p = procs.spawn(name, cmd + ["standalone", "--config", str(cfg)])
    wait_ready(ports, [], p, timeout=30)
    return p


def bandwidth(port: int, sink: Sink, rate: int, secs: float, pid: int) -> dict:
    """Send flat out for `secs`; what reached the sink vs rate x secs + burst (burst = rate)."""
    stop = threading.Event()
    before = sink.total
    c = socket.create_connection((LOOPBACK, port), timeout=10)
    chunk = b"r" * (1 << 18)

    def send():
        try:
            while not stop.is_set():
                c.sendall(chunk)
        except OSError:
            pass
    cpu0, t0 = proc_cpu_secs(pid), time.monotonic()
    threading.Thread(target=send, daemon=True).start()
    time.sleep(max(0.0, t0 + secs - time.monotonic()))
    delivered = sink.total - before
    cpu = proc_cpu_secs(pid) - cpu0
    stop.set()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST: drop the backlog
    c.close()
    expected = rate * secs + rate
    return {"rate_bps": rate, "secs": secs, "delivered_bytes": delivered, "expected_bytes": expected,
            "error_pct": 100.0 * (delivered - expected) / expected,
            "proxy_cpu_ms_per_gb": cpu * 1000 / max(delivered / 1e9, 1e-9)}


def attempt(port: int) -> bool | None:
    """One connection through the conn-rate rule: True echoed, False reset/closed."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=5) as c:
            c.sendall(b"x")
            c.settimeout(2)
            return c.recv(1) == b"x"
    except OSError:
        return False


def conn_rate(port: int, secs: float) -> dict:
    socks = [socket.create_connection((LOOPBACK, port), timeout=5) for _ in range(10)]
    passed = 0
    for c in socks:
        try:
            c.sendall(b"x")
            c.settimeout(2)
            passed += c.recv(1) == b"x"
        except OSError:
            pass
        c.close()
    t0, per_sec = time.monotonic(), [0] * int(secs)
    while (elapsed := time.monotonic() - t0) < int(secs):
        if attempt(port):
            per_sec[int(elapsed)] += 1
        time.sleep(0.05)
    return {"of_10_at_once_passed": passed, "then_passed_per_second": per_sec}


def idle(port: int, n: int, secs: float, pid: int) -> dict:
    conns = []
    for _ in range(n):
        c = socket.create_connection((LOOPBACK, port), timeout=10)
        c.sendall(b"i" * 100)
        conns.append(c)
    time.sleep(1.0)                          # let the accepts and first bytes settle
    cpu0 = proc_cpu_secs(pid)
    time.sleep(secs)
    cpu = proc_cpu_secs(pid) - cpu0
    for c in conns:
        c.close()
    return {"connections": n, "secs": secs, "proxy_cpu_ms": cpu * 1000, "proxy_cpu_pct": 100 * cpu / secs}


def json_events(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def uncapped(procs: Procs, p, front: int, backend: int, secs: int, rule_name: str) -> dict:
    cpu0 = proc_cpu_secs(p.pid)
    r = iperf_once(procs, front, backend, secs, reverse=False)
    cpu = proc_cpu_secs(p.pid) - cpu0
    splice = [e for e in json_events(p.log_path) if e.get("event") == "proxy.splice_selected"]
    return {"gbps": r["gbps"], "proxy_cpu_ms_per_gb": cpu * 1000 / max((r["bytes"] or 0) / 1e9, 1e-9),
            "splice_selected": bool(splice)}


def run(procs: Procs, tmp: Path, cmd: list[str], args) -> dict:
    echo_port, hold_port, iperf_be = (free_port() for _ in range(3))
    sinks = {k: Sink(free_port()) for k in CAPS}    # one each: a closed test's backlog lands elsewhere
    echo, hold = TcpEcho([echo_port]), HoldingSink(hold_port)
    fronts = {k: free_port() for k in [*CAPS, "conn", "idle", "open"]}
    rules = "".join(rule(f"cap-{i}", fronts[k], sinks[k].port, {"bandwidth_in_bps": v})
                    for i, (k, v) in enumerate(CAPS.items()))
    rules += rule("conn", fronts["conn"], echo_port, {"new_connections_per_sec": 2, "new_connections_burst": 2})
    rules += rule("idle", fronts["idle"], hold_port, {"bandwidth_in_bps": MiB, "bandwidth_out_bps": MiB})
    rules += rule("open", fronts["open"], iperf_be)
    out: dict = {}
    try:
        p = start_standalone(procs, tmp, cmd, "capped", rules, list(fronts.values()))
        out["uncapped_next_to_caps"] = uncapped(procs, p, fronts["open"], iperf_be, args.iperf_secs, "open")
        out["bandwidth"] = {}
        for name, rate in CAPS.items():
            print(f"bandwidth {name} for {args.secs:g} s", file=sys.stderr, flush=True)
            out["bandwidth"][name] = bandwidth(fronts[name], sinks[name], rate, args.secs, p.pid)
        print("connection rate", file=sys.stderr, flush=True)
        out["conn_rate"] = conn_rate(fronts["conn"], args.conn_secs)
        print(f"{args.idle_conns} idle capped connections for {args.idle_secs:g} s", file=sys.stderr, flush=True)
        out["idle"] = idle(fronts["idle"], args.idle_conns, args.idle_secs, p.pid)
        procs.stop(p)
        plain_front = free_port()
        q = start_standalone(procs, tmp, cmd, "uncapped", rule("open", plain_front, iperf_be), [plain_front])
        out["uncapped_alone"] = uncapped(procs, q, plain_front, iperf_be, args.iperf_secs, "open")
        procs.stop(q)
    finally:
        for sink in sinks.values():
            sink.close()
        echo.close()
        hold.close()
    return out


def print_figures(r: dict) -> None:
    print(f"\n{'cap (bandwidth_in_bps)':24} {'delivered':>12} {'rate×t+burst':>13} {'error':>8} {'CPU ms/GB':>10}")
    for name, b in r["bandwidth"].items():
        print(f"{name:24} {b['delivered_bytes']:12d} {b['expected_bytes']:13.0f} {b['error_pct']:+7.2f}% "
              f"{b['proxy_cpu_ms_per_gb']:10.0f}")
    c = r["conn_rate"]
    print(f"\nnew_connections_per_sec = 2, burst 2: {c['of_10_at_once_passed']} of 10 at once passed; "
          f"then per second: {c['then_passed_per_second']}")
    i = r["idle"]
    print(f"{i['connections']} idle capped connections: proxy CPU {i['proxy_cpu_ms']:.0f} ms over "
          f"{i['secs']:g} s ({i['proxy_cpu_pct']:.2f} %)")
    for k in ("uncapped_alone", "uncapped_next_to_caps"):
        u = r[k]
        print(f"{k:24} {u['gbps']:6.2f} Gbit/s  {u['proxy_cpu_ms_per_gb']:5.0f} ms/GB  "
              f"splice {'yes' if u['splice_selected'] else 'NO'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "dist" / "portunus"))
    ap.add_argument("--source", action="store_true", help="run python -m portunus from the source tree")
    ap.add_argument("--secs", type=float, default=5, help="seconds per bandwidth cap (issue 13: 10)")
    ap.add_argument("--conn-secs", type=float, default=3, help="seconds of attempts after the burst")
    ap.add_argument("--idle-conns", type=int, default=1000)
    ap.add_argument("--idle-secs", type=float, default=5, help="issue 13: 10")
    ap.add_argument("--iperf-secs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ratelimit.json"))
    args = ap.parse_args()
    load = print_machine_load()
    cmd = script_command(args.bin, args.source)
    with tempfile.TemporaryDirectory(prefix="portunus-bench-rl-") as tmp:
        procs = Procs(Path(tmp))
        try:
            result = run(procs, Path(tmp), cmd, args)
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            procs.stop_all()
    result["meta"] = {"load": load, "machine": machine_info(), "command": sys.argv,
                      "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print_figures(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
