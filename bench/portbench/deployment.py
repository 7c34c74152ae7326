"""A real server and one enrolled client on 127.0.0.1 (the client-* paths of
bench/run.py, and bench/control_plane.py)."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from .procs import ChildProcess


class Deployment:
    """A real server and one enrolled client ("bench-edge") on 127.0.0.1.

    bench/run.py passes `spawn` so that every process runs in its own session under
    its process manager, and `client_env` / `client_args` for the client process.
    `spawn(name, argv, env)` must return a ChildProcess whose log_path is its stderr."""

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
        self.procs: list[ChildProcess] = []
        self.server_proc: ChildProcess | None = None
        self.client_proc: ChildProcess | None = None
        self.client_env = client_env
        self.client_args = list(client_args)
        self._spawn = spawn or self._default_spawn
        self.server_log_path = self.dir / "server.log"
        self.client_log_path = self.dir / "client.log"
        self.info: dict = {}        # the server's serve.json, once it is up
        self.api = ""               # its operator API URL
        # never send the loopback API calls through an HTTP proxy from the environment
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _default_spawn(self, name: str, argv: list[str], env=None) -> ChildProcess:
        path = self.server_log_path if name == "server" else self.client_log_path
        with open(path, "a") as fh:
            return ChildProcess(name, path, argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=fh)

    def _start(self, name: str, argv: list[str], env=None) -> ChildProcess:
        p = self._spawn(name, argv, env)
        self.procs.append(p)
        return p

    def start_server(self, timeout: float = 30):
        p = self.server_proc = self._start("server", self.cmd + ["server", "--data-dir", str(self.data), "serve"])
        self.server_log_path = p.log_path or self.server_log_path
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
            raise RuntimeError(f"client enroll failed (exit {rc}); see {p.log_path}")
        return bundle

    def start_client(self, bundle: Path, timeout: float = 30):
        p = self.client_proc = self._start("client", self.cmd + ["client", "--bundle", str(bundle)]
                                           + self.client_args, self.client_env)
        self.client_log_path = p.log_path or self.client_log_path
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
