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
    connected -> 3 rules -> traffic on 3 ports (with its phases).
Prints a table, writes JSON (bench/results/control_plane.json), and with
--compare fails when a median is more than 25 % worse than the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def free_block(n: int) -> int:
    import random
    for _ in range(500):
        base = random.randrange(10000, 32000 - n)
        ok = True
        for p in range(base, base + n):
            s = socket.socket()
            try:
                s.bind(("0.0.0.0", p))
            except OSError:
                ok = False
            finally:
                s.close()
            if not ok:
                break
        if ok:
            return base
    raise RuntimeError("no free port block")


class Echo:
    def __init__(self, ports):
        self.socks = []
        for p in ports:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", p))
            s.listen(128)
            self.socks.append(s)
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    @staticmethod
    def _serve(s):
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            threading.Thread(target=Echo._echo, args=(c,), daemon=True).start()

    @staticmethod
    def _echo(c):
        with c:
            while True:
                b = c.recv(65536)
                if not b:
                    return
                c.sendall(b)

    def close(self):
        for s in self.socks:
            s.close()


class Deployment:
    """A real server and one enrolled client ("bench-edge") on 127.0.0.1.

    Also used by bench/run.py (the client-splice / client-userspace paths), which passes
    `spawn` so that every process runs in its own session under its process manager, and
    `client_env` / `client_args` for the client process."""

    CLIENT_NAME = "bench-edge"

    def __init__(self, cmd: list[str], workdir: str, *, spawn=None, client_env: dict | None = None,
                 client_args: list[str] | tuple = ()):
        self.cmd = cmd
        self.dir = Path(workdir)
        self.data = self.dir / "server"
        self.data.mkdir()
        self.token = secrets.token_urlsafe(32)
        (self.data / "server.toml").write_text(
            'control_listen = "127.0.0.1:0"\noperator_http_listen = "127.0.0.1:0"\n'
            f'metrics_listen = "127.0.0.1:0"\noperator_token = "{self.token}"\nlog_format = "json"\n')
        self.procs: list[subprocess.Popen] = []
        self.server_proc: subprocess.Popen | None = None
        self.client_proc: subprocess.Popen | None = None
        self.client_env = client_env
        self.client_args = list(client_args)
        self._spawn = spawn or self._default_spawn
        self.server_log_path = self.dir / "server.log"
        self.client_log_path = self.dir / "client.log"
        # never send the loopback API calls through an HTTP proxy from the environment
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _default_spawn(self, name: str, argv: list[str], env=None) -> subprocess.Popen:
        path = self.server_log_path if name == "server" else self.client_log_path
        with open(path, "a") as fh:
            p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=fh)
        p.log_path = path       # type: ignore[attr-defined]
        return p

    def _start(self, name: str, argv: list[str], env=None) -> subprocess.Popen:
        p = self._spawn(name, argv, env)
        self.procs.append(p)
        return p

    def start_server(self, timeout: float = 30):
        p = self.server_proc = self._start("server", self.cmd + ["server", "--data-dir", str(self.data), "serve"])
        self.server_log_path = getattr(p, "log_path", self.server_log_path)
        info = self.data / "serve.json"
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.info = json.loads(info.read_text())
                self.api = self.info["operator_http_url"]
                return
            except (OSError, ValueError, KeyError):
                pass        # not there yet (or half written)
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; see {self.server_log_path}")
            time.sleep(0.005)

    def call(self, method, path, body=None, timeout: float = 30):
        req = urllib.request.Request(self.api + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/json")
        with self._http.open(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())

    def enroll(self, timeout: float = 60) -> Path:
        _, res = self.call("POST", "/v1/client-enrollments", {"name": self.CLIENT_NAME})
        bundle = self.dir / "bundle.json"
        p = self._start("client-enroll", self.cmd + ["client", "enroll", res["enrollment_uri"], "--out", str(bundle)])
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise RuntimeError(f"client enroll timed out after {timeout:.0f}s")
        if rc != 0:
            raise RuntimeError(f"client enroll failed (exit {rc}); see {getattr(p, 'log_path', '')}")
        return bundle

    def start_client(self, bundle: Path, timeout: float = 30):
        p = self.client_proc = self._start("client", self.cmd + ["client", "--bundle", str(bundle)]
                                           + self.client_args, self.client_env)
        self.client_log_path = getattr(p, "log_path", self.client_log_path)
        deadline = time.monotonic() + timeout
        while True:
            _, r = self.call("GET", "/v1/clients")
            if any(c["connected"] for c in r["clients"]):
                return
            if p.poll() is not None:
                raise RuntimeError(f"client exited with code {p.returncode}; see {self.client_log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError("client did not connect")
            time.sleep(0.005)

    def enroll_and_start_client(self):
        self.start_client(self.enroll())

    def server_push_durations(self) -> dict[str, float]:
        out = {}
        for line in Path(self.server_log_path).read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "rule.pushed":
                out[rec["rule"]] = rec["duration_ms"]
        return out

    def close(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def roundtrip_ok(port: int) -> bool:
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=2)
    except OSError:
        return False
    with c:
        c.settimeout(2)
        c.sendall(b"x")
        try:
            return c.recv(1) == b"x"
        except OSError:
            return False


def measure_push(cmd, repeat: int) -> dict:
    results = {"push_single_ms": [], "push_single_server_ms": [], "push_range100_ms": [],
               "push_range100_server_ms": [], "push_cli_single_ms": []}
    with tempfile.TemporaryDirectory(prefix="portunus-bench-") as tmp:
        d = Deployment(cmd, tmp)
        target = free_port()
        echo = Echo([target])
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


def measure_deploy(cmd) -> dict:
    """Cold: nothing running -> traffic on 3 ports. Warm: a connected client -> 3 rules -> traffic."""
    ports = [free_port() for _ in range(3)]
    targets = [free_port() for _ in range(3)]
    echo = Echo(targets)
    out = {}
    with tempfile.TemporaryDirectory(prefix="portunus-bench-") as tmp:
        d = Deployment(cmd, tmp)
        try:
            t0 = time.perf_counter()
            d.start_server()
            out["cold_server_start_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            d.enroll_and_start_client()
            out["cold_enroll_and_connect_s"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            for p, t in zip(ports, targets):
                status, _ = d.call("POST", "/v1/rules", {"client": "bench-edge", "listen_port": p,
                                                         "target": f"127.0.0.1:{t}"})
                assert status == 201
            for p in ports:
                while not roundtrip_ok(p):
                    time.sleep(0.001)
            now = time.perf_counter()
            out["deploy_to_traffic_s"] = now - t2
            out["cold_start_to_traffic_s"] = now - t0
            return out
        finally:
            echo.close()
            d.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "dist" / "portunus"), help="the zipapp (default dist/portunus)")
    ap.add_argument("--source", action="store_true", help="run the source tree (python -m portunus) instead")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "control_plane.json"))
    ap.add_argument("--compare", metavar="BASELINE", help="fail if a median is >25%% worse than this JSON")
    ap.add_argument("--write-baseline", metavar="PATH")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "portunus"] if args.source else [sys.executable, args.bin]
    results = measure_push(cmd, args.repeat)
    for _ in range(max(1, args.repeat // 2)):
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
