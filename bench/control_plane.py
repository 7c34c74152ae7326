#!/usr/bin/env python3
"""Control-plane benchmark: rule push time and fresh deploy -> first byte.

Starts a real server and client (the built zipapp by default) on 127.0.0.1 and
measures:
  * push_single_ms / push_range100_ms: POST /v1/rules until 201, from this process
    (HTTP round trip; includes the client's activation), and the server's own
    `rule.pushed duration_ms` (server-side, excludes HTTP transport);
  * push_cli_single_ms: wall-clock of `portunus-server push-rule` (process start included);
  * deploy_to_traffic_s: with a connected client, push 3 rules -> a byte echoed
    through each of the 3 ports;
  * cold_start_to_traffic_s: nothing running -> `serve` start -> enroll -> client
    connected -> 3 rules -> traffic on 3 ports, with its steps (cold_server_start_s,
    cold_enroll_s, cold_client_connect_s, cold_push3_s, cold_first_bytes_s) and cold_cpu_s, the
    CPU of the product processes of that run.
Prints a table, writes JSON (bench/results/control_plane.json), and with
--compare fails when a median is more than 25 % worse than the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from portbench import REPO as ROOT               # bench/ is sys.path[0] when this file is run
from portbench.deployment import Deployment
from portbench.origins import TcpEcho
from portbench.procs import free_block, free_port
from portbench.product import script_command
from portbench.tools import tcp_roundtrip_ok


def measure_push(cmd, repeat: int) -> dict:
    results = {"push_single_ms": [], "push_single_server_ms": [], "push_range100_ms": [],
               "push_range100_server_ms": [], "push_cli_single_ms": []}
    with tempfile.TemporaryDirectory(prefix="portunus-bench-") as tmp:
        d = Deployment(cmd, tmp)
        target = free_port()
        echo = TcpEcho([target])
        try:
            d.start_server()
            d.enroll_and_start_client()
            ids = {}
            for i in range(repeat):
                port = free_port()
                t0 = time.perf_counter()
                status, rule = d.call("POST", "/v1/rules", {"client": "bench-edge", "listen_port": port,
                                                            "target": f"127.0.0.1:{target}"})
                results["push_single_ms"].append((time.perf_counter() - t0) * 1000)
                assert status == 201, rule
                ids[rule["rule_id"]] = "push_single_server_ms"
                base, tbase = free_block(100), free_block(100)
                t0 = time.perf_counter()
                status, rule = d.call("POST", "/v1/rules", {"client": "bench-edge", "listen": f"{base}-{base + 99}",
                                                            "target": f"127.0.0.1:{tbase}-{tbase + 99}"})
                results["push_range100_ms"].append((time.perf_counter() - t0) * 1000)
                assert status == 201, rule
                ids[rule["rule_id"]] = "push_range100_server_ms"
                env = dict(os.environ, PORTUNUS_OPERATOR_TOKEN=d.token, PORTUNUS_SERVER=d.api)
                t0 = time.perf_counter()
                subprocess.run(cmd + ["server", "push-rule", "bench-edge", str(free_port()), f"127.0.0.1:{target}"],
                               check=True, env=env, stdout=subprocess.DEVNULL)
                results["push_cli_single_ms"].append((time.perf_counter() - t0) * 1000)
            time.sleep(0.2)
            for rid, ms in d.server_push_durations().items():
                if rid in ids:
                    results[ids[rid]].append(ms)
        finally:
            echo.close()
            d.close()
    return results


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


POLL = 0.001          # the fresh-deploy waits look at a file every millisecond (a stat: no load on the product)
FIRST_BYTES_TIMEOUT = 20.0


def start_server_and_wait(d: Deployment, timeout: float = 30) -> None:
    """Deployment.start_server, waiting on serve.json at 1 ms instead of 5 ms (a step's time is
    ready + half the poll interval on average)."""
    p = d.server_proc = d._start("server", d.cmd + ["server", "--data-dir", str(d.data), "serve"])
    d.server_log_path = p.log_path or d.server_log_path
    info = d.data / "serve.json"
    deadline = time.monotonic() + timeout
    while True:
        if info.exists():
            try:
                d.info = json.loads(info.read_text())
                d.api = d.info["operator_http_url"]
                return
            except (OSError, ValueError, KeyError):
                pass        # half written (it is renamed into place, but be lenient)
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start; see {d.server_log_path}")
        time.sleep(POLL)


def enroll_and_wait(d: Deployment, timeout: float = 60) -> Path:
    """Deployment.enroll, but waiting for `client enroll` with a blocking waitpid (and a timer that kills
    it after ``timeout``): Popen.wait(timeout) polls with a doubling sleep (0.5 ms ... 50 ms), so a
    ~65 ms enroll was seen at 113 ms, a bimodal +50 ms on the step."""
    _, res = d.call("POST", "/v1/client-enrollments", {"name": d.CLIENT_NAME})
    bundle = d.dir / "bundle.json"
    p = d._start("client-enroll", d.cmd + ["client", "enroll", res["enrollment_uri"], "--out", str(bundle)])
    killer = threading.Timer(timeout, p.kill)
    killer.start()
    try:
        rc = p.wait()
    finally:
        killer.cancel()
    if rc != 0:
        raise RuntimeError(f"client enroll failed or timed out (exit {rc}); see {p.log_path}")
    return bundle


def start_client_and_wait(d: Deployment, bundle: Path, timeout: float = 30) -> None:
    """Deployment.start_client, but waiting on the client's own log line ``control.connected``
    (a 1 ms look at the file's size) before asking the API, instead of a GET /v1/clients every
    5 ms from the spawn on: those ~20 requests cost the server ~20-30 ms of CPU while the client
    starts on the same two cores. The step still ends when the API lists the client connected."""
    p = d.client_proc = d._start("client", d.cmd + ["client", "--bundle", str(bundle)] + d.client_args, d.client_env)
    d.client_log_path = Path(p.log_path or d.client_log_path)
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        try:
            size = d.client_log_path.stat().st_size
        except OSError:
            size = 0
        if size != seen:
            seen = size
            if b'"control.connected"' in d.client_log_path.read_bytes():
                break
        if p.poll() is not None:
            raise RuntimeError(f"client exited with code {p.returncode}; see {d.client_log_path}")
        if time.monotonic() > deadline:
            raise RuntimeError("client did not connect")
        time.sleep(POLL)
    while True:
        _, r = d.call("GET", "/v1/clients")
        if any(c["connected"] for c in r["clients"]):
            return
        if time.monotonic() > deadline:
            raise RuntimeError("client did not connect (per the API)")
        time.sleep(POLL)


def measure_deploy(cmd) -> dict:
    """Cold: nothing running -> traffic on 3 ports, step by step. Warm: a connected client -> 3 rules
    -> traffic. cold_cpu_s: user+sys of the product processes of the run (server, enroll, client;
    counted when they are reaped), the steadier figure on a loaded machine."""
    ports = [free_port() for _ in range(3)]
    targets = [free_port() for _ in range(3)]
    echo = TcpEcho(targets)
    out = {}
    cpu0 = _children_cpu()
    with tempfile.TemporaryDirectory(prefix="portunus-bench-") as tmp:
        d = Deployment(cmd, tmp)
        try:
            t0 = time.perf_counter()
            start_server_and_wait(d)
            t1 = time.perf_counter()
            out["cold_server_start_s"] = t1 - t0                # spawn -> serve.json written
            bundle = enroll_and_wait(d)
            t_enrolled = time.perf_counter()
            out["cold_enroll_s"] = t_enrolled - t1              # create enrollment + `client enroll` run
            start_client_and_wait(d, bundle)
            t2 = time.perf_counter()
            out["cold_client_connect_s"] = t2 - t_enrolled      # spawn -> the API lists it connected
            out["cold_enroll_and_connect_s"] = t2 - t1
            for p, t in zip(ports, targets):
                status, _ = d.call("POST", "/v1/rules", {"client": "bench-edge", "listen_port": p,
                                                         "target": f"127.0.0.1:{t}"})
                assert status == 201
            t3 = time.perf_counter()
            out["cold_push3_s"] = t3 - t2                       # 3 POST /v1/rules, each 201 = client ack'd
            give_up = time.monotonic() + FIRST_BYTES_TIMEOUT
            for p in ports:
                while not tcp_roundtrip_ok(p):
                    if time.monotonic() > give_up:
                        raise RuntimeError(f"no byte through port {p} {FIRST_BYTES_TIMEOUT:.0f} s after its 201; "
                                           f"see {d.client_log_path}")
                    time.sleep(POLL)
            now = time.perf_counter()
            out["cold_first_bytes_s"] = now - t3
            out["deploy_to_traffic_s"] = now - t2
            out["cold_start_to_traffic_s"] = now - t0
        finally:
            echo.close()
            d.close()
    out["cold_cpu_s"] = _children_cpu() - cpu0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "dist" / "portunus"), help="the zipapp (default dist/portunus)")
    ap.add_argument("--source", action="store_true", help="run the source tree (python -m portunus) instead")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "control_plane.json"))
    ap.add_argument("--compare", metavar="BASELINE", help="fail if a median is >25%% worse than this JSON")
    ap.add_argument("--write-baseline", metavar="PATH")
    ap.add_argument("--deploy-only", type=int, metavar="N", help="only the fresh deploy, N times (no push figures)")
    args = ap.parse_args()
    cmd = script_command(args.bin, args.source)
    results = measure_push(cmd, args.repeat) if not args.deploy_only else {}
    for _ in range(args.deploy_only or max(1, args.repeat // 2)):
        for k, v in measure_deploy(cmd).items():
            results.setdefault(k, []).append(v)
    summary = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
               for k, v in results.items() if v}
    print(f"{'metric':<28} {'median':>10} {'min':>10} {'max':>10}  n")
    for k, s in summary.items():
        print(f"{k:<28} {s['median']:>10.2f} {s['min']:>10.2f} {s['max']:>10.2f}  {s['n']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "samples": results}, indent=2))
    if args.write_baseline:
        Path(args.write_baseline).write_text(json.dumps({"summary": summary}, indent=2))
    if args.compare:
        base = json.loads(Path(args.compare).read_text())["summary"]
        worse = [k for k, s in summary.items() if k in base and s["median"] > base[k]["median"] * 1.25]
        for k in worse:
            print(f"REGRESSION {k}: {summary[k]['median']:.2f} vs baseline {base[k]['median']:.2f}")
        return 1 if worse else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
