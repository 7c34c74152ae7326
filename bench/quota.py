#!/usr/bin/env python3
"""Traffic-quota benchmark (issue 14): bytes over budget at the cut, CPU per GB of a
quota-bound rule vs an unbound one, and the cost of the hourly rollup.

  cut       a real server and client (splice, then userspace: `PORTUNUS_DISABLE_SPLICE=1` on
            the client); user `alice` owns a rule to a byte-counting sink and has a quota of
            --budget bytes. Each run, --conns connections send flat out until the cut; the
            bytes that reached the sink minus the budget the client installed (its
            `traffic_quota.applied_set budget_remaining_bytes`) are the overshoot. Then
            `PATCH {"clear_period_usage": true}` and the next run. The worst of --runs.
  cpu       iperf3 through alice's second rule (bound: a 1 TiB quota) and through an
            operator rule (no quota) on the same client: Gbit/s and client CPU per GB
  rollup    in-process (the product's own store code): --pairs (user, client) pairs x
            --minutes 1-minute samples in a fresh store, then the rollup of the last hour alone
            (the 60 s housekeeping's steady state, the table full) and of every hour at once
            (a server that was down for the day)

Prints the machine load first, the figures, and writes bench/results/quota.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from portbench import LOOPBACK, REPO as ROOT, BenchError   # bench/ is sys.path[0]
from portbench.deployment import Deployment
from portbench.machine import machine_info, print_machine_load
from portbench.procs import Procs, free_port, proc_cpu_secs, wait_ready
from portbench.product import script_command, splice_env
from portbench.tools import iperf_once

MiB = 1 << 20
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Sink:
    """Accepts connections and counts every byte that reaches it."""

    def __init__(self):
        self.port = free_port()
        self.total = 0
        self.sock = socket.create_server((LOOPBACK, self.port), backlog=1024)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(c,), daemon=True).start()

    def _drain(self, c):
        with c:
            while True:
                try:
                    data = c.recv(1 << 18)
                except OSError:
                    return
                if not data:
                    return
                self.total += len(data)

    def settled(self, quiet: float = 0.3, timeout: float = 10) -> int:
        """The total once it has not moved for `quiet` seconds."""
        last, since, deadline = self.total, time.monotonic(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if self.total != last:
                last, since = self.total, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    def close(self):
        self.sock.close()


def api(dep: Deployment, method: str, path: str, body=None, token: str | None = None):
    req = urllib.request.Request(dep.api + path, method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("Authorization", f"Bearer {token or dep.token}")
    req.add_header("Content-Type", "application/json")
    try:
        with _HTTP.open(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise BenchError(f"{method} {path}: HTTP {e.code} {e.read()[:300]!r}") from None


def client_events(dep: Deployment, name: str) -> list[dict]:
    out = []
    for line in Path(dep.client_log_path).read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == name:
            out.append(rec)
    return out


def wait_event(dep: Deployment, name: str, after: int, timeout: float = 15, pred=lambda e: True) -> dict:
    """The first `name` event past the first `after` ones that `pred` accepts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = [e for e in client_events(dep, name)[after:] if pred(e)]
        if ev:
            return ev[0]
        time.sleep(0.02)
    raise BenchError(f"the client never logged {name} (see {dep.client_log_path})")


def add_user(dep: Deployment, user: str) -> str:
    """A user with an API bearer. There is no route that mints a user's bearer (users log in to
    the Web UI), so one hashed operator_tokens row is written, as bootstrap-superadmin does."""
    api(dep, "POST", "/v1/users", {"user_id": user, "display_name": user.title(), "role": "user",
                                   "password": f"{user} bench password 0001"})
    token = secrets.token_urlsafe(32)
    db = sqlite3.connect(dep.data / "state.db", timeout=10)
    with db:
        db.execute("INSERT INTO operator_tokens (token_hash, user_id, name, created_at) VALUES (?, ?, 'bench', ?)",
                   (hashlib.sha256(token.encode()).hexdigest(), user, "2026-01-01T00:00:00Z"))
    db.close()
    api(dep, "POST", "/v1/grants", {"user_id": user, "client": Deployment.CLIENT_NAME, "listen_port_start": 1024,
                                    "listen_port_end": 65535, "protocols": ["tcp", "udp"]})
    return token


def push(dep: Deployment, listen: int, target: int, token: str | None = None) -> dict:
    _, rule = api(dep, "POST", "/v1/rules", {"client": Deployment.CLIENT_NAME, "listen_port": listen,
                                            "listen_host": LOOPBACK, "target": f"{LOOPBACK}:{target}"}, token)
    return rule


def blast(port: int, limit: int) -> None:
    try:
        c = socket.create_connection((LOOPBACK, port), timeout=10)
    except OSError:
        return
    chunk, sent = b"q" * 65536, 0
    try:
        while sent < limit:
            sent += c.send(chunk)
        c.shutdown(socket.SHUT_WR)
        c.recv(1)
    except OSError:
        pass
    finally:
        c.close()


def cut_runs(dep: Deployment, sink: Sink, listen: int, budget: int, runs: int, conns: int) -> list[dict]:
    quota = "/v1/users/alice/quotas/" + Deployment.CLIENT_NAME
    out = []
    applied = len(client_events(dep, "traffic_quota.applied_set"))
    api(dep, "PUT", quota, {"monthly_bytes": budget})
    for _ in range(runs):
        # the state the cut is measured against: the first one not exhausted after the PUT/PATCH
        # (the server's own "exhausted" push of the previous run may come before it)
        state = wait_event(dep, "traffic_quota.applied_set", applied, pred=lambda e: not e.get("exhausted"))
        allowed = state["budget_remaining_bytes"]
        before, reported = sink.total, len(client_events(dep, "traffic_quota.exhausted_reported"))
        senders = [threading.Thread(target=blast, args=(listen, 4 * budget)) for _ in range(conns)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(60)
        wait_event(dep, "traffic_quota.exhausted_reported", reported)
        delivered = sink.settled() - before
        out.append({"budget_bytes": allowed, "delivered_bytes": delivered, "over_bytes": delivered - allowed})
        applied = len(client_events(dep, "traffic_quota.applied_set"))
        api(dep, "PATCH", quota, {"clear_period_usage": True})
    return out


def cpu_per_gb(procs: Procs, dep: Deployment, front: int, backend: int, secs: int) -> dict:
    pid = dep.client_proc.pid
    cpu0 = proc_cpu_secs(pid)
    r = iperf_once(procs, front, backend, secs, reverse=False)
    cpu = proc_cpu_secs(pid) - cpu0
    return {"gbps": r["gbps"], "client_cpu_ms_per_gb": cpu * 1000 / max((r["bytes"] or 0) / 1e9, 1e-9)}


def one_path(procs: Procs, tmp: Path, cmd: list[str], splice: bool, args) -> dict:
    work = tmp / ("splice" if splice else "userspace")
    work.mkdir()

    def spawn(name, argv, env=None):
        return procs.spawn(name, argv, env=env)
    dep = Deployment(cmd, str(work), spawn=spawn, client_env=splice_env(splice),
                     client_args=["--shutdown-drain-timeout-secs", "1"])
    with open(dep.data / "server.toml", "a") as f:
        f.write("stats_report_interval_secs = 1\n")
    sink = Sink()
    try:
        dep.start_server()
        dep.enroll_and_start_client()
        alice = add_user(dep, "alice")
        cut_front, bound_front, open_front, iperf_be = (free_port() for _ in range(4))
        bound_rule = push(dep, bound_front, iperf_be, alice)
        push(dep, cut_front, sink.port, alice)
        push(dep, open_front, iperf_be)
        wait_ready([cut_front, bound_front, open_front], [], dep.client_proc, timeout=15)
        name = "splice" if splice else "userspace"
        print(f"{name}: {args.runs} cuts of a {args.budget} B budget, {args.conns} connections each",
              file=sys.stderr, flush=True)
        runs = cut_runs(dep, sink, cut_front, args.budget, args.runs, args.conns)
        applied = len(client_events(dep, "traffic_quota.applied_set"))
        api(dep, "PUT", "/v1/users/alice/quotas/" + Deployment.CLIENT_NAME, {"monthly_bytes": 1 << 40})
        wait_event(dep, "traffic_quota.applied_set", applied)
        print(f"{name}: iperf3 through the bound and the unbound rule", file=sys.stderr, flush=True)
        bound = cpu_per_gb(procs, dep, bound_front, iperf_be, args.iperf_secs)
        unbound = cpu_per_gb(procs, dep, open_front, iperf_be, args.iperf_secs)
        spliced = {e.get("rule") for e in client_events(dep, "proxy.splice_selected")}
        bound["splice_selected"] = bound_rule["rule_id"] in spliced
        over = [r["over_bytes"] for r in runs]
        return {"runs": runs, "worst_over_bytes": max(over), "median_over_bytes": sorted(over)[len(over) // 2],
                "bound": bound, "unbound": unbound}
    finally:
        dep.close()
        sink.close()


def fill(store, pairs: int, base: int, minutes: int) -> None:
    """pairs x minutes 1-minute rows, in primary-key order (pair, then time) with a large page
    cache: setting up a day of samples takes minutes this way rather than most of an hour."""
    keys = sorted((f"u{p % 1000}", f"c{p // 1000}") for p in range(pairs))
    with store.write() as conn:
        conn.execute("PRAGMA cache_size = -1048576")      # 1 GiB, this connection only
    for start in range(0, pairs, 100):
        with store.write() as conn:
            conn.executemany("INSERT INTO traffic_samples_1m (user_id, client_id, ts, bytes_in, bytes_out) "
                             "VALUES (?, ?, ?, ?, ?)",
                             ((u, c, base + 60 * m, 1000 + m, 2000 + m)
                              for u, c in keys[start:start + 100] for m in range(minutes)))


def rollup(pairs: int, minutes: int) -> dict:
    """The product's rollup over pairs x minutes 1-minute rows, in-process on a fresh store."""
    sys.path.insert(0, str(ROOT))
    from portunus.server.traffic import TrafficAccounting
    from portunus.store import traffic as store_traffic
    from portunus.store.db import Store

    base = 1_767_225_600                                # 2026-01-01T00:00:00Z, on the hour
    hours = max(1, minutes // 60)
    end = base + hours * 3600
    with tempfile.TemporaryDirectory(prefix="portunus-bench-rollup-", dir=os.environ.get("TMPDIR")) as data:
        store = Store.open(data)
        t0 = time.perf_counter()
        fill(store, pairs, base, hours * 60)
        fill_s = time.perf_counter() - t0
        store.close()                # the rollup runs on a connection with the product's own settings
        store = Store.open(data)
        acc = TrafficAccounting(store, None, clock=lambda: end + 61)
        store_traffic.set_rolled_until(store, end - 3600)
        t0 = time.perf_counter()
        last_hour_rows = acc.roll_up()
        last_hour_s = time.perf_counter() - t0
        with store.write() as conn:
            conn.execute("DELETE FROM traffic_samples_1h")
        store_traffic.set_rolled_until(store, base)
        t0 = time.perf_counter()
        all_rows = acc.roll_up()
        all_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(data).glob("state.db*"))
        store.close()
    return {"pairs": pairs, "minutes": hours * 60, "rows_1m": pairs * hours * 60, "fill_s": fill_s,
            "db_mib": size / MiB, "last_hour_rollup_s": last_hour_s, "last_hour_rows": last_hour_rows,
            "all_hours_rollup_s": all_s, "all_hours_rows": all_rows}


def print_figures(r: dict) -> None:
    for name in ("splice", "userspace"):
        p = r.get(name)
        if not p:
            continue
        print(f"{name:10} cut: worst {p['worst_over_bytes']} B over budget, median {p['median_over_bytes']} B "
              f"({len(p['runs'])} runs, budget {p['runs'][0]['budget_bytes']} B)")
        print(f"{'':10} bound rule {p['bound']['gbps']:.2f} Gbit/s {p['bound']['client_cpu_ms_per_gb']:.0f} ms/GB "
              f"(splice {'yes' if p['bound']['splice_selected'] else 'no'}); unbound "
              f"{p['unbound']['gbps']:.2f} Gbit/s {p['unbound']['client_cpu_ms_per_gb']:.0f} ms/GB")
    ru = r.get("rollup")
    if ru:
        print(f"rollup, {ru['pairs']} pairs x {ru['minutes']} min ({ru['rows_1m']} rows, {ru['db_mib']:.0f} MiB, "
              f"filled in {ru['fill_s']:.1f} s): last hour {ru['last_hour_rollup_s']:.2f} s "
              f"({ru['last_hour_rows']} rows), every hour at once {ru['all_hours_rollup_s']:.2f} s "
              f"({ru['all_hours_rows']} rows)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "dist" / "portunus"))
    ap.add_argument("--source", action="store_true", help="run python -m portunus from the source tree")
    ap.add_argument("--only", default="cut,rollup", help="cut (with cpu), rollup")
    ap.add_argument("--runs", type=int, default=5, help="cuts per path (issue 14: 20)")
    ap.add_argument("--budget", type=int, default=8 * MiB)
    ap.add_argument("--conns", type=int, default=2, help="concurrent senders per cut")
    ap.add_argument("--iperf-secs", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--minutes", type=int, default=120, help="of 1-minute samples (issue 14: 1440)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quota.json"))
    args = ap.parse_args()
    load = print_machine_load()
    cmd = script_command(args.bin, args.source)
    only = set(args.only.split(","))
    result: dict = {"meta": {"load": load, "machine": machine_info(), "command": sys.argv,
                             "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "options": vars(args)}}
    with tempfile.TemporaryDirectory(prefix="portunus-bench-quota-") as tmp:
        procs = Procs(Path(tmp))
        try:
            if "cut" in only:
                for splice in (True, False):
                    result["splice" if splice else "userspace"] = one_path(procs, Path(tmp), cmd, splice, args)
                    save(args.out, result)
        except (BenchError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            procs.stop_all()
    if "rollup" in only:
        print(f"rollup: {args.pairs} pairs x {args.minutes} minutes", file=sys.stderr, flush=True)
        result["rollup"] = rollup(args.pairs, args.minutes)
    print_figures(result)
    save(args.out, result)
    return 0


def save(out: str, result: dict) -> None:
    """Written after each part, so an interrupted run keeps what it measured."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
