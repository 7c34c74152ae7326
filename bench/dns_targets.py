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
import time
from pathlib import Path

from portbench import REPO as ROOT, BenchError   # bench/ is sys.path[0] when this file is run
from portbench.origins import one_byte_echo
from portbench.procs import ChildProcess, free_port, wait_ready
from portbench.product import script_command
from portbench.tools import percentile

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dnsserver import DnsServer  # noqa: E402  (the tests' controllable DNS server)
from portunus.loop import Loop  # noqa: E402
from portunus.relay.resolver import Resolver  # noqa: E402


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


def standalone_config(dns_port: int, ip_port: int, name_port: int, target: int) -> str:
    """Two rules to the same echo server: one by IP literal, one by a DNS name."""
    return f"""
[global]
log_level = "warn"
dns_servers = ["127.0.0.1:{dns_port}"]
[[rule]]
name = "ip"
listen_port = {ip_port}
listen_host = "127.0.0.1"
target = "127.0.0.1:{target}"
[[rule]]
name = "dns"
listen_port = {name_port}
listen_host = "127.0.0.1"
target = "backend.bench:{target}"
"""


def measure_setup(cmd: list[str], dns: DnsServer, n: int) -> tuple[list[float], list[float], int]:
    """Connection setup times through the IP rule and the DNS-name rule, and the
    A queries the standalone sent meanwhile."""
    queries_before = dns.count("backend.bench", qtype=1)
    target = free_port()
    srv = one_byte_echo(target)
    ip_port, dns_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="portunus-bench-") as tmp:
        cfg = Path(tmp) / "dns.toml"
        cfg.write_text(standalone_config(dns.port, ip_port, dns_port, target))
        p = ChildProcess("standalone", None, cmd + ["standalone", "--config", str(cfg)],
                         stderr=subprocess.DEVNULL)
        try:
            try:
                wait_ready([ip_port, dns_port], [], p, timeout=20)
            except BenchError as e:
                raise SystemExit(f"standalone did not start: {e}") from None
            setup_times(ip_port, 100)  # warm up both paths (and the DNS cache)
            setup_times(dns_port, 100)
            ip = setup_times(ip_port, n)
            via_dns = setup_times(dns_port, n)
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(10)
            srv.close()
    return ip, via_dns, dns.count("backend.bench", qtype=1) - queries_before


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "dist" / "portunus"))
    ap.add_argument("--source", action="store_true", help="run python -m portunus instead of the zipapp")
    ap.add_argument("-n", type=int, default=2000, help="connections per path")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dns_targets.json"))
    args = ap.parse_args()
    cmd = script_command(args.bin, args.source)

    dns = DnsServer()
    try:
        dns.set("backend.bench", a=["127.0.0.1"], ttl=300)
        hit = cache_hit_cost(dns.port, 200_000)
        ip, via_dns, queries = measure_setup(cmd, dns, args.n)
    finally:
        dns.close()
    summary = {
        "cache_hit_us": {"median": statistics.median(hit)},
        "setup_ip_ms": {"p50": percentile(ip, 0.5), "p99": percentile(ip, 0.99)},
        "setup_dns_ms": {"p50": percentile(via_dns, 0.5), "p99": percentile(via_dns, 0.99)},
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
