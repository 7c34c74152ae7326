#!/usr/bin/env python3
"""DNS-target benchmark: resolver cache-hit cost, and connection setup via a name vs an IP.

  * cache_hit_us: one Resolver.resolve() of a cached name, in-process (median of N);
  * setup_ip_ms / setup_dns_ms: connect + 1-byte echo through a standalone rule whose
    target is an IP literal vs a DNS name answered by a local DNS server (TTL 300, so
    after the first lookup every connection is a cache hit): p50 and p99.
Prints a table and writes bench/results/dns_targets.json.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dnsserver import DnsServer  # noqa: E402  (the tests' controllable DNS server)
from portunus.loop import Loop  # noqa: E402
from portunus.relay.resolver import Resolver  # noqa: E402


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def cache_hit_cost(dns_port: int, n: int) -> list[float]:
    loop = Loop()
    r = Resolver(loop, [("127.0.0.1", dns_port)], hosts_path="/nonexistent")
    got = []
    r.resolve("backend.bench", False, lambda a, e: got.append((a, e)))
    loop.run_until(lambda: got, 5)
    assert got and got[0][0], got
    samples = []
    sink = []
    cb = sink.append
    for _ in range(20):
        t0 = time.perf_counter()
        for _ in range(n // 20):
            r.resolve("backend.bench", False, lambda a, e: cb(a))
        samples.append((time.perf_counter() - t0) / (n // 20) * 1e6)
        sink.clear()
    loop.close()
    return samples


def echo_server(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1024)

    def serve():
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            try:
                b = c.recv(1)
                if b:
                    c.sendall(b)
            except OSError:
                pass
            c.close()
    threading.Thread(target=serve, daemon=True).start()
    return s


def setup_times(port: int, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(b"x")
        assert c.recv(1) == b"x"
        out.append((time.perf_counter() - t0) * 1000)
        c.close()
    return out


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "dist" / "portunus"))
    ap.add_argument("--source", action="store_true", help="run python -m portunus instead of the zipapp")
    ap.add_argument("-n", type=int, default=2000, help="connections per path")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dns_targets.json"))
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "portunus"] if args.source else [sys.executable, args.bin]

    dns = DnsServer()
    dns.set("backend.bench", a=["127.0.0.1"], ttl=300)
    hit = cache_hit_cost(dns.port, 200_000)
    queries_before = dns.count("backend.bench", qtype=1)

    target = free_port()
    srv = echo_server(target)
    ip_port, dns_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="portunus-bench-") as tmp:
        cfg = Path(tmp) / "dns.toml"
        cfg.write_text(f"""
[global]
log_level = "warn"
dns_servers = ["127.0.0.1:{dns.port}"]
[[rule]]
name = "ip"
listen_port = {ip_port}
listen_host = "127.0.0.1"
target = "127.0.0.1:{target}"
[[rule]]
name = "dns"
listen_port = {dns_port}
listen_host = "127.0.0.1"
target = "backend.bench:{target}"
""")
        p = subprocess.Popen(cmd + ["standalone", "--config", str(cfg)], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", dns_port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or p.poll() is not None:
                        raise SystemExit("standalone did not start")
                    time.sleep(0.05)
            setup_times(ip_port, 100)  # warm up both paths (and the DNS cache)
            setup_times(dns_port, 100)
            ip = setup_times(ip_port, args.n)
            via_dns = setup_times(dns_port, args.n)
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(10)
            srv.close()
            queries = dns.count("backend.bench", qtype=1) - queries_before
            dns.close()
    summary = {
        "cache_hit_us": {"median": statistics.median(hit)},
        "setup_ip_ms": {"p50": pct(ip, 0.5), "p99": pct(ip, 0.99)},
        "setup_dns_ms": {"p50": pct(via_dns, 0.5), "p99": pct(via_dns, 0.99)},
        "dns_queries_for_all_connections": queries,
    }
    print(f"resolver cache hit:          {summary['cache_hit_us']['median']:.2f} µs per resolve()")
    print(f"connection setup, IP target: p50 {summary['setup_ip_ms']['p50']:.3f} ms  "
          f"p99 {summary['setup_ip_ms']['p99']:.3f} ms")
    print(f"connection setup, DNS name:  p50 {summary['setup_dns_ms']['p50']:.3f} ms  "
          f"p99 {summary['setup_dns_ms']['p99']:.3f} ms  ({queries} A queries for {args.n + 100} connections)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
