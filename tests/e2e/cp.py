"""Helpers for control-plane end-to-end tests: a real server, real clients, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from conftest import portunus_cmd, wait_until

OPERATOR_TOKEN = "test-operator-token-0123456789abcdefghijklmnop"


def write_server_toml(data_dir: Path, **extra) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    values = {
        "control_listen": "127.0.0.1:0",
        "operator_http_listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "operator_token": OPERATOR_TOKEN,
        "stats_report_interval_secs": 1,
    }
    values.update(extra)
    lines = []
    for k, v in values.items():
        lines.append(f"{k} = {json.dumps(v)}")
    (data_dir / "server.toml").write_text("\n".join(lines) + "\n")


class Server:
    def __init__(self, procs, data_dir: Path, env=None):
        self.data_dir = data_dir
        self.env = {"PORTUNUS_OPERATOR_TOKEN": OPERATOR_TOKEN, "PORTUNUS_ALLOW_ANY_FS": "1", **(env or {})}
        self.proc = procs(portunus_cmd("server") + ["--data-dir", str(data_dir), "serve"], env=self.env)
        ready = self.proc.wait_event("server.ready", timeout=30)
        self.info = ready
        self.api = ready["operator_http_url"]
        self.metrics_url = ready["metrics_url"]
        self.control_port = int(ready["control_listen"].rsplit(":", 1)[1])

    def cli(self, *args, env=None, timeout=60, check=False) -> subprocess.CompletedProcess:
        full_env = dict(os.environ)
        full_env.update(self.env)
        full_env.update(env or {})
        res = subprocess.run(portunus_cmd("server") + ["--data-dir", str(self.data_dir), *args],
                             capture_output=True, text=True, env=full_env, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"portunus-server {' '.join(args)} exited {res.returncode}:\n{res.stderr}")
        return res


def enroll_client(server: Server, procs, tmp_path: Path, name: str = "edge-01", env=None, wait=True):
    """enroll-client -> client enroll -> start the agent; returns (agent Proc, bundle path)."""
    res = server.cli("enroll-client", name, check=True)
    command = res.stdout.strip()
    uri = command.split("'")[1]
    bundle = tmp_path / f"{name}.bundle.json"
    full_env = dict(os.environ)
    full_env.update(env or {})
    out = subprocess.run(portunus_cmd("client") + ["enroll", uri, "--out", str(bundle)],
                         capture_output=True, text=True, timeout=30, env=full_env)
    assert out.returncode == 0, out.stderr
    agent = procs(portunus_cmd("client") + ["--bundle", str(bundle), "--reconnect-initial-delay-ms", "100",
                                            "--reconnect-max-delay-secs", "1", "--shutdown-drain-timeout-secs",
                                            "2"], env=env)
    if wait:
        agent.wait_event("control.connected", timeout=20)
    return agent, bundle


def wait_connected(server: Server, name: str, connected: bool = True, timeout: float = 20):
    def check():
        res = server.cli("list-clients", "--format", "json")
        if res.returncode != 0:
            return False
        for c in json.loads(res.stdout):
            if c["client_name"] == name and c["connected"] == connected:
                return c
        return False
    return wait_until(check, timeout=timeout, interval=0.2, what=f"{name} connected={connected}")


def time_it(fn):
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0
