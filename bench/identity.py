#!/usr/bin/env python3
"""Identity benchmark: what logins cost, and that a login flood leaves the control plane alone.

Starts a real server and client (the built zipapp by default, --source for the tree) on
127.0.0.1 and measures:
  * login_ok_per_s: good-password logins (every one pays an Argon2id hash, m=19 MiB t=2;
    at most 2 run at once in the server) from --workers threads, one user each (the
    throttle counts an attempt before its hash, so one user's parallel logins from one
    address would lock themselves out: that is the throttle working, not a login rate);
  * login_locked_per_s: logins against a locked throttle key (429 rate_limited, no hash);
  * push_idle_ms / push_under_logins_ms: POST /v1/rules until 201 (client ack included),
    with nothing else running, then while --flood threads (default 50) log in non-stop.
Prints a table and writes JSON (bench/results/identity.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from portbench import REPO as ROOT               # bench/ is sys.path[0] when this file is run
from portbench.deployment import Deployment
from portbench.origins import TcpEcho
from portbench.procs import free_port
from portbench.product import script_command

PASSWORD = "bench password 000001"
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def login(api: str, user_id: str, password: str) -> int:
    req = urllib.request.Request(api + "/v1/auth/login", method="POST",
                                 data=json.dumps({"user_id": user_id, "password": password}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with _http.open(req, timeout=60) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


def login_rate(api: str, user_ids: list[str], password: str, secs: float, want: int) -> float:
    """Logins per second from one thread per user id for ``secs``; every answer must be ``want``."""
    done, bad = [0], []
    stop = time.monotonic() + secs
    lock = threading.Lock()

    def work(user_id):
        while time.monotonic() < stop:
            status = login(api, user_id, password)
            with lock:
                done[0] += 1
                if status != want:
                    bad.append(status)
    t0 = time.monotonic()
    threads = [threading.Thread(target=work, args=(u,)) for u in user_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if bad:
        raise RuntimeError(f"{len(bad)} logins answered {sorted(set(bad))}, wanted {want}")
    return done[0] / (time.monotonic() - t0)


def push_latencies(d: Deployment, target: int, count: int) -> list[float]:
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        status, rule = d.call("POST", "/v1/rules", {"client": "bench-edge", "listen_port": free_port(),
                                                    "target": f"127.0.0.1:{target}"})
        out.append((time.perf_counter() - t0) * 1000)
        assert status == 201, rule
        d.call("DELETE", f"/v1/rules/{rule['rule_id']}")
    return out


def measure(cmd, workers: int, flood: int, secs: float, pushes: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="portunus-bench-") as tmp:
        d = Deployment(cmd, tmp)
        target = free_port()
        echo = TcpEcho([target])
        try:
            d.start_server()
            d.enroll_and_start_client()
            users = [f"user-{i}" for i in range(max(workers, flood))]
            for user_id in users + ["victim"]:
                d.call("POST", "/v1/users", {"user_id": user_id, "display_name": user_id, "role": "user",
                                             "password": PASSWORD})
            out = {"login_ok_per_s": login_rate(d.api, users[:workers], PASSWORD, secs, 200)}
            for _ in range(5):  # lock the victim's key (5 failures within 15 minutes)
                login(d.api, "victim", "wrong password 000000")
            out["login_locked_per_s"] = login_rate(d.api, ["victim"] * workers, PASSWORD, secs, 429)
            out["push_idle_ms"] = push_latencies(d, target, pushes)
            stop = threading.Event()
            counts = [0] * flood

            def flood_worker(i):
                while not stop.is_set():
                    login(d.api, users[i], PASSWORD)
                    counts[i] += 1
            threads = [threading.Thread(target=flood_worker, args=(i,), daemon=True) for i in range(flood)]
            for t in threads:
                t.start()
            time.sleep(1.0)  # let the flood fill the hash slots and the queue
            t0 = time.monotonic()
            out["push_under_logins_ms"] = push_latencies(d, target, pushes)
            out["flood_logins_per_s"] = sum(counts) / (time.monotonic() - t0 + 1.0)
            stop.set()
            for t in threads:
                t.join(60)
            return out
        finally:
            echo.close()
            d.close()


def summary(values) -> str:
    if isinstance(values, float):
        return f"{values:.1f}"
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
    return f"median {statistics.median(values):.1f}  p95 {p95:.1f}  max {values[-1]:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=str(ROOT / "dist" / "portunus"), help="the zipapp (default dist/portunus)")
    ap.add_argument("--source", action="store_true", help="run the source tree instead of --bin")
    ap.add_argument("--workers", type=int, default=8, help="threads for the login rates (default 8)")
    ap.add_argument("--flood", type=int, default=50, help="concurrent login threads during pushes (default 50)")
    ap.add_argument("--secs", type=float, default=5.0, help="seconds per login rate (default 5)")
    ap.add_argument("--pushes", type=int, default=30, help="pushes per latency series (default 30)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "identity.json"))
    args = ap.parse_args(argv)
    res = measure(script_command(args.bin, args.source), args.workers, args.flood, args.secs, args.pushes)
    for key, values in res.items():
        print(f"{key:24s} {summary(values)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
