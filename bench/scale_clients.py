#!/usr/bin/env python3
"""One server, N connected clients (issue 15): push p50/p99, server RSS and idle CPU.

A real server (the zipapp, or the source tree with --source) on 127.0.0.1, and ONE harness
process that plays N clients over the real protocol and real TLS: it uses the product's own
loop, TLS channel, frame codec and message constructors (portunus.loop, portunus.control.*),
so the server sees exactly what N agents would send. Nothing inside the server is faked.

Phases (each timed):
  enroll    N x POST /v1/client-enrollments, then every code redeemed over TLS (pin checked),
            `--window` redemptions in flight at once;
  connect   N channels: TLS, pin check, hello, welcome (a reconnect storm of `--window`
            handshakes in flight); confirmed with the server's portunus_clients_connected;
  idle      `--idle-secs` with every client connected and no rules: the server answers
            nothing but heartbeats (ping every 15 s, pong back) -> server CPU % of a core;
  push      `--pushes` POST /v1/rules to random clients (POST -> client's rule_status ack ->
            201, from this process) plus the server's own `rule.pushed duration_ms`;
  stats     `--idle-secs` with every client reporting stats_report for its rules at the
            interval the server's welcome gave (5 s by default), like the agent does
            (per_port + per_target rows, control.agent.stats_reports) -> server CPU %.
Server RSS (VmRSS / VmHWM) is read after each phase. The fake clients ack a push without
binding its port (this measures the control plane, not the relay).

Prints a table and writes JSON (bench/results/scale_clients.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from portbench import REPO as ROOT               # bench/ is sys.path[0] when this file is run
from portbench.deployment import Deployment
from portbench.machine import print_machine_load
from portbench.procs import free_port, proc_mem_kib
from portbench.product import script_command

sys.path.insert(0, str(ROOT))
from portunus import __version__  # noqa: E402  (the harness speaks the product's own protocol code)
from portunus.control import messages as m  # noqa: E402
from portunus.control.agent import stats_reports  # noqa: E402
from portunus.control.channel import Channel  # noqa: E402
from portunus.control.enrollment import parse_uri  # noqa: E402
from portunus.control.tls import client_context, pins_match  # noqa: E402
from portunus.loop import Loop  # noqa: E402
from portunus.netio import Connect  # noqa: E402
from portunus.relay.stats import RuleCounters  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- /proc readings

def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_cpu_secs(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime + stime


def proc_nofile(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


def metric_value(url: str, name: str) -> float | None:
    """The sum of a family's samples (portunus_clients_connected is one 0/1 sample per client)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    total, seen = 0.0, False
    with opener.open(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
                seen = True
    return total if seen else None


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


# ---------------------------------------------------------------- the N clients

class FakeAgent:
    """One client on the harness loop: pin, hello, pong, ack pushes, report stats at the interval."""

    def __init__(self, fleet: "Fleet", bundle: dict):
        self.fleet = fleet
        self.bundle = bundle
        self.channel: Channel | None = None
        self.welcomed = False
        self.rules: dict[str, tuple[dict, RuleCounters]] = {}
        self.stats_interval = 5.0
        self.timer = None
        self.started_at = 0.0
        self.attempt = 0

    def start(self) -> None:
        self.started_at = time.perf_counter()
        self.welcomed = False
        host, port = self.bundle["server_endpoint"].rsplit(":", 1)
        Connect(self.fleet.loop, host, int(port), 30.0, self._on_tcp)

    def _on_tcp(self, sock, err) -> None:
        if sock is None:
            if self.fleet.reconnecting:
                self._reconnect()
                return
            self.fleet.failed(self, f"connect: {err}")
            return
        self.channel = Channel(self.fleet.loop, sock, self.fleet.ctx, server_side=False, peer_role="server",
                               on_open=self._on_open, on_message=self._on_message, on_close=self._on_close)

    def _on_open(self, ch: Channel) -> None:
        if not pins_match(self.bundle["server_cert_sha256"], ch.peer_cert_der() or b""):
            ch.close("pin mismatch")
            return
        ch.send(m.hello(self.bundle["token"], __version__, list(m.CAPABILITIES)))

    def _on_message(self, ch: Channel, msg: dict) -> None:
        t = msg["type"]
        if t == "welcome":
            self.welcomed = True
            self.attempt = 0
            self.stats_interval = float(msg["stats_interval_secs"])
            self.fleet.welcomed(self)
            # like control.agent: the first report one interval after the welcome (agents connected in
            # a storm report in the same band every interval, as real ones do)
            self.timer = self.fleet.loop.call_later(self.stats_interval, self._report)
        elif t == "ping":
            ch.send(m.pong(msg["nonce"]))
        elif t == "rule_update":
            rid, req = msg["rule_id"], msg.get("request_id")
            if msg["action"] == "push":
                rule = msg["rule"]
                lo = rule["listen_port"]
                hi = rule.get("listen_port_end") or lo
                self.rules[rid] = (rule, RuleCounters(range(lo, hi + 1)))
                ch.send(m.rule_status(rid, "active", port=lo, request_id=req))
            else:
                self.rules.pop(rid, None)
                ch.send(m.rule_status(rid, "removed", request_id=req))
        elif t == "error":
            self.fleet.errors.append(f"{msg['code']}: {msg['message']}")

    def _snapshots(self) -> list[dict]:
        out = []
        for rid, (rule, counters) in self.rules.items():
            snap = {"rule_id": rid, "protocol": rule.get("protocol", "tcp"), "state": "active", "reason": None}
            snap.update(counters.snapshot(per_port=True))
            snap["per_target"] = [
                {"index": i, "host": t["host"], "port": t["port"], "priority": t.get("priority", 0),
                 "proxy_protocol": t.get("proxy_protocol"), "health": "healthy", "consecutive_failures": 0,
                 "last_failure_at": None, "last_success_at": None, "bytes_in": 0, "bytes_out": 0,
                 "connections": 0}
                for i, t in enumerate(rule.get("targets") or [])]
            out.append(snap)
        return out

    def _report(self) -> None:
        self.timer = None
        ch = self.channel
        if ch is None or ch.closed:
            return
        for msg in stats_reports(self._snapshots(), time.time(), None):
            ch.send(msg)
            self.fleet.reports_sent += 1
        self.timer = self.fleet.loop.call_later(self.stats_interval, self._report)

    def _on_close(self, ch: Channel, reason: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.fleet.stopping:
            return
        if self.fleet.reconnecting:
            self._reconnect()
            return
        self.fleet.failed(self, f"closed: {reason}")

    def _reconnect(self) -> None:
        """control.agent's backoff: full jitter, uniform(0, min(30, 0.5 * 2^attempt))."""
        delay = random.uniform(0, min(30.0, 0.5 * 2 ** min(self.attempt, 30)))
        self.attempt += 1
        self.channel = None
        self.fleet.loop.call_later(delay, self._restart)

    def _restart(self) -> None:
        self.welcomed = False
        host, port = self.bundle["server_endpoint"].rsplit(":", 1)
        Connect(self.fleet.loop, host, int(port), 30.0, self._on_tcp)


class Enrollment:
    """Redeem one enrollment URI over the real TLS path (what `client enroll` does, on the loop)."""

    def __init__(self, fleet: "Fleet", uri_text: str, done):
        self.fleet, self.uri, self.done = fleet, parse_uri(uri_text), done
        Connect(fleet.loop, self.uri.host, self.uri.port, 30.0, self._on_tcp)

    def _on_tcp(self, sock, err) -> None:
        if sock is None:
            self.done(None, f"connect: {err}")
            return
        Channel(self.fleet.loop, sock, self.fleet.ctx, server_side=False, peer_role="server",
                on_open=self._on_open, on_message=self._on_message, on_close=self._on_close)

    def _on_open(self, ch: Channel) -> None:
        if not pins_match(self.uri.fingerprint, ch.peer_cert_der() or b""):
            ch.close("pin mismatch")
            return
        ch.send(m.enroll(self.uri.code, __version__))

    def _on_message(self, ch: Channel, msg: dict) -> None:
        if msg["type"] == "enrolled":
            bundle = {"version": 1, "client_id": msg["client_id"], "client_name": msg["client_name"],
                      "server_endpoint": f"{self.uri.host}:{self.uri.port}",
                      "server_cert_sha256": self.uri.fingerprint, "token": msg["token"]}
            done, self.done = self.done, None
            done(bundle, None)
        elif msg["type"] == "error":
            done, self.done = self.done, None
            done(None, msg["code"])

    def _on_close(self, ch: Channel, reason: str) -> None:
        if self.done is not None:
            done, self.done = self.done, None
            done(None, reason)


class Fleet:
    """The harness loop (its own thread) and every fake agent on it."""

    def __init__(self):
        self.loop = Loop()
        self.ctx = client_context()
        self.agents: list[FakeAgent] = []
        self.errors: list[str] = []
        self.n_welcomed = 0
        self.connect_times: list[float] = []
        self.reports_sent = 0
        self.stopping = False
        self.reconnecting = False   # a server restart: agents come back on their own, with backoff
        self.rewelcomed = 0
        self._queue: list = []
        self._window = 1
        self._inflight = 0
        self._all_done = threading.Event()
        self.thread = threading.Thread(target=self.loop.run, name="fleet-loop", daemon=True)
        self.thread.start()

    def on_loop(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    # windowed work: start `window` jobs, each finished job starts the next
    def _run_windowed(self, jobs: list, window: int, timeout: float) -> None:
        self._all_done.clear()
        self._total, self._finished = len(jobs), 0

        def start() -> None:
            self._queue = list(jobs)
            self._window, self._inflight = window, 0
            self._pump()
        self.on_loop(start)
        if not self._all_done.wait(timeout):
            raise RuntimeError(f"timed out: {self._finished}/{self._total} done; errors: {self.errors[:5]}")

    def _pump(self) -> None:
        while self._queue and self._inflight < self._window:
            job = self._queue.pop()
            self._inflight += 1
            job()
        if self._finished >= self._total:
            self._all_done.set()

    def _job_done(self) -> None:
        self._inflight -= 1
        self._finished += 1
        self._pump()

    def enroll_all(self, uris: list[str], window: int, timeout: float) -> list[dict]:
        bundles: list[dict] = []

        def job(uri: str):
            def run() -> None:
                def done(bundle, err) -> None:
                    if bundle is None:
                        self.errors.append(f"enroll: {err}")
                    else:
                        bundles.append(bundle)
                    self._job_done()
                Enrollment(self, uri, done)
            return run
        self._run_windowed([job(u) for u in uris], window, timeout)
        return bundles

    def connect_all(self, bundles: list[dict], window: int, timeout: float) -> None:
        self.agents = [FakeAgent(self, b) for b in bundles]
        self._run_windowed([a.start for a in self.agents], window, timeout)

    def welcomed(self, agent: FakeAgent) -> None:
        if self.reconnecting:
            self.rewelcomed += 1
            return
        self.n_welcomed += 1
        self.connect_times.append(time.perf_counter() - agent.started_at)
        self._job_done()

    def failed(self, agent: FakeAgent, why: str) -> None:
        self.errors.append(why)
        if not agent.welcomed:
            self._job_done()

    def close(self) -> None:
        self.stopping = True

        def shut() -> None:
            for a in self.agents:
                if a.channel is not None:
                    a.channel.close("harness done")
            self.loop.stop()
        self.on_loop(shut)
        self.thread.join(10)


# ---------------------------------------------------------------- the run

def measure_idle(pid: int, secs: float) -> dict:
    h0, c0, t0 = os.times(), proc_cpu_secs(pid), time.monotonic()
    time.sleep(secs)
    c1, t1, h1 = proc_cpu_secs(pid), time.monotonic(), os.times()
    harness = (h1.user + h1.system) - (h0.user + h0.system)
    return {"server_cpu_pct": 100 * (c1 - c0) / (t1 - t0), "harness_cpu_pct": 100 * harness / (t1 - t0),
            "secs": t1 - t0, **{f"server_{k}_kib": v for k, v in proc_mem_kib(pid).items()}}


def restart_storm(d: Deployment, fleet: Fleet, n: int, settle: float) -> dict:
    """SIGTERM the server, start it again on the same data and port: every agent comes back by
    itself with the agent's jittered backoff (a reconnect storm), its rules replayed."""
    fleet.reconnecting, fleet.rewelcomed = True, 0
    old = d.server_proc
    old.send_signal(signal.SIGTERM)
    old.wait(30)
    (d.data / "serve.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    d.start_server()
    pid = d.server_proc.pid
    print(f"restarted server pid {pid}", flush=True)
    out = {"server_start_s": time.perf_counter() - t0, "server_start_cpu_s": proc_cpu_secs(pid)}
    deadline = time.monotonic() + 120
    while fleet.rewelcomed < n and time.monotonic() < deadline:
        time.sleep(0.05)
    out["all_back_s"] = time.perf_counter() - t0
    out["back"] = fleet.rewelcomed
    out["server_cpu_s"] = proc_cpu_secs(pid)  # start + n handshakes, hellos and replays
    out["mem_kib_all_back"] = proc_mem_kib(pid)
    time.sleep(settle)  # a heartbeat tick after the hub's TRIM_EVERY hands the storm's free heap back
    out["settle_s"] = settle
    out["mem_kib_settled"] = proc_mem_kib(pid)
    out["connected_metric"] = metric_value(d.info["metrics_url"], "portunus_clients_connected")
    return out


def run(cmd: list[str], n: int, pushes: int, idle_secs: float, window: int, restart: bool = True,
        settle: float = 12.0) -> dict:
    out: dict = {"clients": n, "harness_nofile": raise_nofile()}
    with tempfile.TemporaryDirectory(prefix="portunus-scale-") as tmp:
        d = Deployment(cmd, tmp)
        toml = d.data / "server.toml"  # a fixed control port: the bundles still point at it after a restart
        toml.write_text(toml.read_text().replace('control_listen = "127.0.0.1:0"',
                                                 f'control_listen = "127.0.0.1:{free_port()}"'))
        fleet = None
        try:
            d.start_server()
            pid = d.server_proc.pid
            print(f"server pid {pid}", flush=True)
            out["server_nofile"] = proc_nofile(pid)
            time.sleep(0.5)
            out["server_start_mem_kib"] = proc_mem_kib(pid)
            metrics = d.info["metrics_url"]

            t0 = time.perf_counter()
            uris = [d.call("POST", "/v1/client-enrollments", {"name": f"scale-{i:05d}"})[1]["enrollment_uri"]
                    for i in range(n)]
            out["enroll_create_s"] = time.perf_counter() - t0
            fleet = Fleet()
            t0 = time.perf_counter()
            bundles = fleet.enroll_all(uris, window, timeout=max(60, n / 5))
            out["enroll_redeem_s"] = time.perf_counter() - t0
            if len(bundles) != n:
                raise RuntimeError(f"only {len(bundles)}/{n} enrolled: {fleet.errors[:5]}")

            t0 = time.perf_counter()
            fleet.connect_all(bundles, window, timeout=max(60, n / 5))
            out["connect_all_s"] = time.perf_counter() - t0
            ct = [x * 1000 for x in fleet.connect_times]
            out["connect_ms"] = {"p50": pct(ct, 50), "p99": pct(ct, 99), "max": max(ct)}
            if fleet.n_welcomed != n:
                raise RuntimeError(f"only {fleet.n_welcomed}/{n} connected: {fleet.errors[:5]}")
            deadline = time.monotonic() + 30
            while (got := metric_value(metrics, "portunus_clients_connected")) != n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"portunus_clients_connected is {got}, not {n}")
                time.sleep(0.1)
            out["metric_clients_connected"] = got
            time.sleep(1.0)  # the replay of each client (and its logging) settles
            out["idle_heartbeats"] = measure_idle(pid, idle_secs)

            rng = random.Random(15)
            lat, rids, used = [], [], set()
            for i in range(pushes):
                agent = rng.choice(fleet.agents)
                while True:
                    port = rng.randint(20000, 60000)
                    if (agent.bundle["client_id"], port) not in used:
                        used.add((agent.bundle["client_id"], port))
                        break
                t0 = time.perf_counter()
                status, rule = d.call("POST", "/v1/rules", {"client": agent.bundle["client_id"],
                                                            "listen_port": port, "target": "127.0.0.1:9"})
                lat.append((time.perf_counter() - t0) * 1000)
                if status != 201:
                    raise RuntimeError(f"push {i}: {status} {rule}")
                rids.append(rule["rule_id"])
            time.sleep(0.3)
            server_ms = [v for k, v in d.server_push_durations().items() if k in set(rids)]
            out["push_ms"] = {"n": len(lat), "p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99),
                              "max": max(lat), "mean": statistics.fmean(lat)}
            if server_ms:
                out["push_server_ms"] = {"n": len(server_ms), "p50": pct(server_ms, 50),
                                         "p99": pct(server_ms, 99), "max": max(server_ms)}
            out["clients_with_rules"] = sum(1 for a in fleet.agents if a.rules)
            r0 = fleet.reports_sent
            out["idle_stats"] = measure_idle(pid, idle_secs)
            out["idle_stats"]["reports_per_s"] = (fleet.reports_sent - r0) / out["idle_stats"]["secs"]
            out["server_end_mem_kib"] = proc_mem_kib(pid)
            out["harness_errors"] = fleet.errors[:20]
            out["still_connected"] = metric_value(metrics, "portunus_clients_connected")
            if restart:
                out["restart"] = restart_storm(d, fleet, n, settle)
        finally:
            if fleet is not None:
                fleet.close()
            d.close()
    return out


def print_table(r: dict) -> None:
    idle, st = r["idle_heartbeats"], r["idle_stats"]
    rows = [
        ("clients connected (metric)", f"{r['metric_clients_connected']:.0f} / {r['clients']}"),
        ("fd limit harness / server", f"{r['harness_nofile']} / {r['server_nofile']}"),
        ("enroll: create codes (HTTP)", f"{r['enroll_create_s']:.2f} s"),
        ("enroll: redeem over TLS", f"{r['enroll_redeem_s']:.2f} s"),
        ("connect all (TLS+hello+welcome)", f"{r['connect_all_s']:.2f} s"),
        ("connect per client p50 / p99", f"{r['connect_ms']['p50']:.1f} / {r['connect_ms']['p99']:.1f} ms"),
        ("push POST->201 p50 / p99 / max", f"{r['push_ms']['p50']:.2f} / {r['push_ms']['p99']:.2f} / "
                                           f"{r['push_ms']['max']:.2f} ms (n={r['push_ms']['n']})"),
    ]
    if "push_server_ms" in r:
        s = r["push_server_ms"]
        rows.append(("push server-side p50 / p99", f"{s['p50']:.2f} / {s['p99']:.2f} ms"))
    rows += [
        ("server RSS at start", f"{r['server_start_mem_kib']['VmRSS'] / 1024:.1f} MiB"),
        ("server RSS, N idle clients", f"{idle['server_VmRSS_kib'] / 1024:.1f} MiB"),
        ("server idle CPU (heartbeats)", f"{idle['server_cpu_pct']:.2f} % of a core over {idle['secs']:.0f} s"),
        ("server CPU (stats reports)", f"{st['server_cpu_pct']:.2f} % of a core, "
                                       f"{st['reports_per_s']:.0f} reports/s"),
        ("server RSS / HWM at end", f"{r['server_end_mem_kib']['VmRSS'] / 1024:.1f} / "
                                    f"{r['server_end_mem_kib']['VmHWM'] / 1024:.1f} MiB"),
        ("harness CPU (idle / stats)", f"{idle['harness_cpu_pct']:.1f} / {st['harness_cpu_pct']:.1f} %"),
    ]
    for k, v in rows:
        print(f"{k:<34} {v}")
    if "restart" in r:
        x = r["restart"]
        print(f"{'restart: serve up / all back':<34} {x['server_start_s']:.2f} s / {x['all_back_s']:.2f} s "
              f"({x['back']} of {r['clients']} back, agents' jittered backoff)")
        print(f"{'restart: server CPU to all back':<34} {x['server_cpu_s']:.2f} s (start alone "
              f"{x['server_start_cpu_s']:.2f} s)")
        print(f"{'restart: RSS all back / settled':<34} {x['mem_kib_all_back']['VmRSS'] / 1024:.1f} / "
              f"{x['mem_kib_settled']['VmRSS'] / 1024:.1f} MiB {x['settle_s']:g} s later "
              f"(HWM {x['mem_kib_settled']['VmHWM'] / 1024:.1f})")
    if r["harness_errors"]:
        print("harness errors:", r["harness_errors"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "dist" / "portunus"), help="the zipapp (default dist/portunus)")
    ap.add_argument("--source", action="store_true", help="run the source tree (python -m portunus) instead")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--pushes", type=int, default=500)
    ap.add_argument("--idle-secs", type=float, default=31.0, help="per idle phase (>= 2 ping intervals)")
    ap.add_argument("--window", type=int, default=128, help="TLS handshakes in flight at once")
    ap.add_argument("--restart", action=argparse.BooleanOptionalAction, default=True,
                    help="end with a server restart and the agents' reconnect storm")
    ap.add_argument("--settle-secs", type=float, default=12.0,
                    help="after the storm, before the last RSS reading (the hub trims at most every 10 s)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale_clients.json"))
    args = ap.parse_args()
    load = print_machine_load()
    res = run(script_command(args.bin, args.source), args.clients, args.pushes, args.idle_secs, args.window,
              args.restart, args.settle_secs)
    res["machine_load"] = load
    print_table(res)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    back = res.get("restart", {}).get("back", args.clients)
    return 0 if not res["harness_errors"] and res["still_connected"] == args.clients and back == args.clients else 1


if __name__ == "__main__":
    sys.exit(main())
