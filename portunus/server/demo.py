"""`portunus-server demo`: the whole system on loopback in a temporary data dir.

Starts a server, enrolls and starts a client, runs a small HTTP backend and
pushes a sample rule in front of it, prints where to look, and runs until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import PortunusError


def self_command() -> list[str]:
    """How to run this same program again (a zipapp, a symlink to it, or the source tree)."""
    argv0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if argv0.endswith("__main__.py") or not os.path.isfile(argv0):
        return [sys.executable, "-m", "portunus"]
    return [sys.executable, argv0]


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = (b"<!doctype html><title>Portunus demo</title><h1>Hello through Portunus</h1>"
                b"<p>This page came from the demo backend, forwarded by the demo client.</p>\n")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _port_free(port: int) -> bool:
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _api(url: str, token: str, method: str, path: str, body=None) -> dict:
    req = urllib.request.Request(url + path, method=method, data=None if body is None else json.dumps(body).encode())
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        err = json.loads(exc.read() or b"{}").get("error", {})
        raise PortunusError(err.get("code", "internal"), err.get("message", f"HTTP {exc.code}")) from None


def run_demo(keep: bool = False) -> int:
    me = self_command()
    tmp = tempfile.mkdtemp(prefix="portunus-demo-")
    data = os.path.join(tmp, "server")
    os.makedirs(data, mode=0o700)
    token = secrets.token_urlsafe(32)
    with open(os.path.join(data, "server.toml"), "w") as f:
        f.write('control_listen = "127.0.0.1:0"\noperator_http_listen = "127.0.0.1:0"\n'
                'metrics_listen = "127.0.0.1:0"\nstats_report_interval_secs = 1\n'
                f'operator_token = "{token}"\nlog_format = "compact"\n')
    logs = open(os.path.join(tmp, "demo.log"), "w")
    children: list[subprocess.Popen] = []
    backend = None

    def stop_all() -> None:
        for p in reversed(children):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(children):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if backend is not None:
            backend.shutdown()
        logs.close()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)

    try:
        server = subprocess.Popen(me + ["server", "--data-dir", data, "serve"], stdout=logs, stderr=logs,
                                  stdin=subprocess.DEVNULL)
        children.append(server)
        info_path = os.path.join(data, "serve.json")
        deadline = time.monotonic() + 30
        while not os.path.exists(info_path):
            if server.poll() is not None or time.monotonic() > deadline:
                raise PortunusError("internal", f"the demo server did not start; see {logs.name}")
            time.sleep(0.05)
        with open(info_path) as f:
            info = json.load(f)
        api = info["operator_http_url"]

        enrollment = _api(api, token, "POST", "/v1/client-enrollments", {"name": "demo-edge"})
        bundle = os.path.join(tmp, "client.bundle.json")
        subprocess.run(me + ["client", "enroll", enrollment["enrollment_uri"], "--out", bundle],
                       check=True, stdout=subprocess.DEVNULL, stderr=logs, timeout=30)
        client = subprocess.Popen(me + ["client", "--bundle", bundle, "--log-format", "compact"],
                                  stdout=logs, stderr=logs, stdin=subprocess.DEVNULL)
        children.append(client)

        backend_port = _free_port()
        backend = ThreadingHTTPServer(("127.0.0.1", backend_port), _Hello)
        threading.Thread(target=backend.serve_forever, daemon=True).start()

        deadline = time.monotonic() + 30
        while not any(c["connected"] for c in _api(api, token, "GET", "/v1/clients")["clients"]):
            if client.poll() is not None or time.monotonic() > deadline:
                raise PortunusError("internal", f"the demo client did not connect; see {logs.name}")
            time.sleep(0.1)
        listen = 18080 if _port_free(18080) else _free_port()
        rule = _api(api, token, "POST", "/v1/rules",
                    {"client": "demo-edge", "listen_port": listen, "target": f"127.0.0.1:{backend_port}"})

        shown = "python3 -m portunus" if me[1:2] == ["-m"] else os.path.relpath(me[1])
        print(f"""
Portunus demo is running (Ctrl-C to stop). State lives in {tmp}.

  Sample rule   http://127.0.0.1:{listen}/  ->  demo backend 127.0.0.1:{backend_port}
                (rule {rule['rule_id']} on client demo-edge)
  Operator API  {api}
  Metrics       {info['metrics_url']}
  Login         bearer token {token}
  Web UI        not part of this build yet; use the CLI below.

Try, in another terminal:
  export PORTUNUS_SERVER={api}
  export PORTUNUS_OPERATOR_TOKEN={token}
  {shown} server list-clients
  {shown} server list-rules
  {shown} server rule-stats {rule['rule_id']} --per-port
  curl http://127.0.0.1:{listen}/
Logs: {logs.name}
""", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.is_set():
                if any(p.poll() is not None for p in children):
                    print(f"a demo process exited; see {logs.name}", file=sys.stderr)
                    return 1
                stop.wait(0.5)
        except KeyboardInterrupt:
            pass
        print("stopping the demo…", file=sys.stderr)
        return 0
    finally:
        stop_all()
