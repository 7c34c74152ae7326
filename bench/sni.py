#!/usr/bin/env python3
"""SNI routing benchmark (issue 12): connection setup through an SNI port vs a plain port,
and new TLS connections per second through Portunus SNI routing vs haproxy doing the same.

One run, every path side by side, against one TLS backend (`openssl s_server`, C, its own
certificate for a.bench.test; Portunus never terminates TLS):

  direct          the client handshakes with the backend itself
  portunus-plain  a standalone rule without sni_pattern
  portunus-sni    a standalone SNI port: exact `a.bench.test` -> backend, plus a wildcard
                  and a fallback rule that point at a closed port (a misroute fails)
  haproxy-sni     haproxy `mode tcp`, `tcp-request inspect-delay` + `req.ssl_sni`, the same
                  three routes

  setup_ms        TCP connect + full TLS handshake (Python `ssl`, SNI a.bench.test), one
                  connection at a time, the paths interleaved round-robin: p50 / p99
  conn_per_s      new TLS connections per second, --workers client processes each handshaking
                  and closing in a loop for --secs; the proxy's CPU per connection alongside

Prints the machine load first, a table, and writes bench/results/sni.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

from portbench import LOOPBACK, REPO as ROOT, BenchError   # bench/ is sys.path[0]
from portbench.machine import machine_info, print_machine_load
from portbench.procs import Procs, free_port, proc_cpu_secs, wait_ready
from portbench.product import script_command
from portbench.tools import percentile

sys.path.insert(0, str(ROOT / "tests"))
from tlssites import make_cert  # noqa: E402  (self-signed certificates via `cryptography`)

NAME = "a.bench.test"
PATHS = ("direct", "portunus-plain", "portunus-sni", "haproxy-sni")


def standalone_toml(plain: int, sni: int, backend: int, dead: int) -> str:
    return f"""
[global]
log_level = "warn"
[[rule]]
name = "plain"
listen_host = "{LOOPBACK}"
listen_port = {plain}
target = "{LOOPBACK}:{backend}"
[[rule]]
name = "sni-exact"
listen_host = "{LOOPBACK}"
listen_port = {sni}
sni_pattern = "{NAME}"
target = "{LOOPBACK}:{backend}"
[[rule]]
name = "sni-wildcard"
listen_host = "{LOOPBACK}"
listen_port = {sni}
sni_pattern = "*.other.test"
target = "{LOOPBACK}:{dead}"
[[rule]]
name = "sni-fallback"
listen_host = "{LOOPBACK}"
listen_port = {sni}
target = "{LOOPBACK}:{dead}"
"""


def haproxy_cfg(front: int, backend: int, dead: int) -> str:
    return f"""global
    maxconn 4000
    nbthread 1
defaults
    mode tcp
    timeout connect 3s
    timeout client 30s
    timeout server 30s
frontend fe_sni
    bind {LOOPBACK}:{front}
    tcp-request inspect-delay 3s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend be_exact if {{ req.ssl_sni -i {NAME} }}
    use_backend be_dead if {{ req.ssl_sni -m end .other.test }}
    default_backend be_dead
backend be_exact
    server s1 {LOOPBACK}:{backend}
backend be_dead
    server s1 {LOOPBACK}:{dead}
"""


def client_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE     # the sanity check verifies; the loops measure the path
    return ctx


def handshake(ctx: ssl.SSLContext, port: int) -> None:
    raw = socket.create_connection((LOOPBACK, port), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with ctx.wrap_socket(raw, server_hostname=NAME):
        pass


def verified_once(port: int, cafile: str) -> None:
    """One handshake that verifies the backend's own certificate through `port`."""
    ctx = ssl.create_default_context(cafile=cafile)
    raw = socket.create_connection((LOOPBACK, port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=NAME) as tls:
        if not tls.getpeercert():
            raise BenchError(f"no peer certificate through port {port}")


def setup_latency(ports: dict[str, int], n: int) -> dict[str, list[float]]:
    ctx = client_ctx()
    out: dict[str, list[float]] = {p: [] for p in ports}
    for i in range(n + 50):                      # the first 50 rounds warm up
        for path, port in ports.items():
            t0 = time.perf_counter()
            handshake(ctx, port)
            if i >= 50:
                out[path].append((time.perf_counter() - t0) * 1000)
    return out


def _worker(port: int, secs: float, q) -> None:
    ctx = client_ctx()
    n = errors = 0
    end = time.monotonic() + secs
    while time.monotonic() < end:
        try:
            handshake(ctx, port)
            n += 1
        except OSError:
            errors += 1
    q.put((n, errors))


def conn_rate(port: int, secs: float, workers: int, proxy_pid: int | None) -> dict:
    q = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_worker, args=(port, secs, q)) for _ in range(workers)]
    cpu0 = proc_cpu_secs(proxy_pid) if proxy_pid else None
    t0 = time.monotonic()
    for p in procs:
        p.start()
    got = [q.get(timeout=secs + 60) for _ in procs]
    wall = time.monotonic() - t0
    for p in procs:
        p.join(10)
    n, errors = sum(g[0] for g in got), sum(g[1] for g in got)
    res = {"connections": n, "errors": errors, "conn_per_s": n / wall}
    if cpu0 is not None:
        cpu = proc_cpu_secs(proxy_pid) - cpu0
        res["proxy_cpu_us_per_conn"] = cpu / max(n, 1) * 1e6
        res["proxy_cpu_pct"] = 100 * cpu / wall
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "dist" / "portunus"))
    ap.add_argument("--source", action="store_true", help="run python -m portunus from the source tree")
    ap.add_argument("-n", type=int, default=300, help="handshakes per path for setup latency")
    ap.add_argument("--secs", type=float, default=3, help="seconds per path for the connection rate")
    ap.add_argument("--workers", type=int, default=2, help="client processes for the connection rate")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sni.json"))
    args = ap.parse_args()
    load = print_machine_load()
    cmd = script_command(args.bin, args.source)
    with tempfile.TemporaryDirectory(prefix="portunus-bench-sni-") as tmp:
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
    print_table(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def run(procs: Procs, tmp: Path, cmd: list[str], args) -> dict:
    cert, key = make_cert(tmp, "site-a", [NAME])
    backend, dead, plain, sni, hap = (free_port() for _ in range(5))
    s_server = procs.spawn("s_server", ["openssl", "s_server", "-quiet", "-naccept", "100000000",
                                        "-accept", f"{LOOPBACK}:{backend}", "-cert", cert, "-key", key])
    wait_ready([backend], [], s_server, timeout=15)
    cfg = tmp / "sni.toml"
    cfg.write_text(standalone_toml(plain, sni, backend, dead))
    portunus = procs.spawn("standalone", cmd + ["standalone", "--config", str(cfg)])
    (tmp / "haproxy.cfg").write_text(haproxy_cfg(hap, backend, dead))
    haproxy = procs.spawn("haproxy", ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")])
    wait_ready([plain, sni], [], portunus, timeout=30)
    wait_ready([hap], [], haproxy, timeout=15)
    ports = {"direct": backend, "portunus-plain": plain, "portunus-sni": sni, "haproxy-sni": hap}
    for port in ports.values():
        verified_once(port, cert)
    pids = {"direct": None, "portunus-plain": portunus.pid, "portunus-sni": portunus.pid,
            "haproxy-sni": haproxy.pid}
    print(f"setup latency: {args.n} handshakes per path, interleaved", file=sys.stderr, flush=True)
    lat = setup_latency(ports, args.n)
    setup = {p: {"p50": percentile(v, 0.5), "p99": percentile(v, 0.99)} for p, v in lat.items()}
    rate = {}
    for path in PATHS:
        print(f"connection rate: {path} ({args.secs:g} s, {args.workers} workers)", file=sys.stderr, flush=True)
        rate[path] = conn_rate(ports[path], args.secs, args.workers, pids[path])
    return {"setup_ms": setup, "rate": rate,
            "sni_added_p50_ms": setup["portunus-sni"]["p50"] - setup["portunus-plain"]["p50"],
            "sni_added_p99_ms": setup["portunus-sni"]["p99"] - setup["portunus-plain"]["p99"],
            "options": {"n": args.n, "secs": args.secs, "workers": args.workers}}


def print_table(r: dict) -> None:
    print(f"\n{'path':16} {'setup p50 ms':>12} {'p99 ms':>8} {'TLS conn/s':>11} {'proxy µs/conn':>14}")
    for path in PATHS:
        s, c = r["setup_ms"][path], r["rate"][path]
        cpu = c.get("proxy_cpu_us_per_conn")
        print(f"{path:16} {s['p50']:12.3f} {s['p99']:8.3f} {c['conn_per_s']:11.0f} "
              f"{'–' if cpu is None else f'{cpu:.0f}':>14}" + (f"  ({c['errors']} errors)" if c["errors"] else ""))
    print(f"\nSNI routing adds {r['sni_added_p50_ms'] * 1000:.0f} µs at p50 "
          f"({r['sni_added_p99_ms'] * 1000:.0f} µs at p99) over a plain Portunus port (target: ≤ 200 µs p50)")


if __name__ == "__main__":
    sys.exit(main())
