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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import PortunusError
from .api_client import ApiClient

LOG_TAIL_LINES = 20
DEMO_USER = "admin"  # the superadmin the demo creates for the Web UI


def self_command() -> list[str]:
    """How to run this same program again, role not included (the caller adds it).

    The role symlinks (portunus-server …) resolve to the one file, so re-running
    never depends on the name this process was called by.
    """
    argv0 = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if argv0.endswith("__main__.py") or not os.path.isfile(argv0):
        return [sys.executable, "-m", "portunus"]
    return [sys.executable, argv0]


def shown_server_command() -> str:
    """`portunus-server` as the user typed it, for the hints the demo prints."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if argv0.endswith("__main__.py") or not os.path.isfile(argv0):
        return "python3 -m portunus server"
    name = os.path.basename(argv0)
    if os.path.dirname(argv0) and shutil.which(name) and os.path.samefile(shutil.which(name), argv0):
        argv0 = name  # found on PATH: the bare name is what the user typed
    return argv0 if name == "portunus-server" else f"{argv0} server"


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


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})\n"


class DemoFailed(Exception):
    """A demo child did not come up or died; the temp dir is kept for its log."""


class Demo:
    """The demo's children, its temp dir and its backend; `stop` undoes all of it."""

    def __init__(self, keep: bool):
        self.keep = keep
        self.me = self_command()
        self.tmp = tempfile.mkdtemp(prefix="portunus-demo-")
        self.data = os.path.join(self.tmp, "server")
        os.makedirs(self.data, mode=0o700)
        self.token = secrets.token_urlsafe(32)
        self.password = secrets.token_urlsafe(12)  # the Web login of the demo's superadmin (16 characters)
        with open(os.path.join(self.data, "server.toml"), "w") as f:
            f.write('control_listen = "127.0.0.1:0"\noperator_http_listen = "127.0.0.1:0"\n'
                    'metrics_listen = "127.0.0.1:0"\nstats_report_interval_secs = 1\n'
                    f'operator_token = "{self.token}"\nlog_format = "compact"\n')
        self.log_path = os.path.join(self.tmp, "demo.log")
        self.logs = open(self.log_path, "w")
        self.children: dict[str, subprocess.Popen] = {}
        self.backend: ThreadingHTTPServer | None = None
        # the demo's state is meant to vanish, so a tmpfs /tmp is fine for it; and it is loopback only,
        # so an advertised endpoint meant for a real server must not reach its server
        self.env = {k: v for k, v in os.environ.items() if k != "PORTUNUS_ADVERTISED_ENDPOINT"}
        self.env["PORTUNUS_ALLOW_ANY_FS"] = "1"

    def spawn(self, what: str, args: list[str]) -> subprocess.Popen:
        # own process group: a terminal's Ctrl-C reaches only the demo, which stops its children in order
        p = subprocess.Popen(self.me + args, stdout=self.logs, stderr=self.logs, stdin=subprocess.DEVNULL,
                             env=self.env, process_group=0)
        self.children[what] = p
        return p

    def failed(self, what: str, p: subprocess.Popen | None) -> DemoFailed:
        status = "" if p is None or p.poll() is None else f" (exit {p.returncode})"
        self.keep = True
        self.logs.flush()
        return DemoFailed(f"{what}{status}")

    def start(self) -> dict:
        """Server, enrolled client, backend and rule; returns what to print."""
        server = self.spawn("server", ["server", "--data-dir", self.data, "serve"])
        info_path = os.path.join(self.data, "serve.json")
        deadline = time.monotonic() + 30
        while not os.path.exists(info_path):
            if server.poll() is not None or time.monotonic() > deadline:
                raise self.failed("the demo server did not start", server)
            time.sleep(0.05)
        with open(info_path) as f:
            info = json.load(f)
        api = info["operator_http_url"]
        client_api = ApiClient(api, self.token)

        _, enrollment = client_api.call("POST", "/v1/client-enrollments", {"name": "demo-edge"})
        bundle = os.path.join(self.tmp, "client.bundle.json")
        enroll = subprocess.run(self.me + ["client", "enroll", enrollment["enrollment_uri"], "--out", bundle],
                                stdout=subprocess.DEVNULL, stderr=self.logs, env=self.env, timeout=30)
        if enroll.returncode != 0:
            raise self.failed(f"the demo client could not enroll (exit {enroll.returncode})", None)
        client = self.spawn("client", ["client", "--bundle", bundle, "--log-format", "compact"])

        backend_port = _free_port()
        self.backend = ThreadingHTTPServer(("127.0.0.1", backend_port), _Hello)
        threading.Thread(target=self.backend.serve_forever, daemon=True).start()

        deadline = time.monotonic() + 30
        while not any(c["connected"] for c in client_api.get("/v1/clients")["clients"]):
            if client.poll() is not None or time.monotonic() > deadline:
                raise self.failed("the demo client did not connect", client)
            time.sleep(0.1)
        listen = 18080 if _port_free(18080) else _free_port()
        # loopback only: the demo must not open the backend to the network
        _, rule = client_api.call("POST", "/v1/rules", {"client": "demo-edge", "listen_port": listen,
                                                        "listen_host": "127.0.0.1",
                                                        "target": f"127.0.0.1:{backend_port}"})
        client_api.call("POST", "/v1/users", {"user_id": DEMO_USER, "display_name": "Demo admin",
                                              "role": "superadmin", "password": self.password})
        return {"api": api, "metrics": info["metrics_url"], "listen": listen, "backend_port": backend_port,
                "rule_id": rule["rule_id"]}

    def banner(self, s: dict) -> str:
        shown = shown_server_command()
        return f"""
Portunus demo is running (Ctrl-C to stop). State lives in {self.tmp}.

  Sample rule   http://127.0.0.1:{s['listen']}/  ->  demo backend 127.0.0.1:{s['backend_port']}
                (rule {s['rule_id']} on client demo-edge)
  Operator API  {s['api']}
  Metrics       {s['metrics']}
  Web UI        {s['api']}/   user {DEMO_USER}, password {self.password}
  Login         bearer token {self.token}

Try, in another terminal:
  export PORTUNUS_SERVER={s['api']}
  export PORTUNUS_OPERATOR_TOKEN={self.token}
  {shown} list-clients
  {shown} list-rules
  {shown} rule-stats {s['rule_id']} --per-port
  curl http://127.0.0.1:{s['listen']}/
Logs: {self.log_path}
"""

    def catch_stop_signals(self) -> threading.Event:
        """Ctrl-C, SIGTERM and SIGHUP (the terminal closed) set the returned event from now on.

        Installed before the banner is printed: whoever reads it may press Ctrl-C at once.
        A handler, not KeyboardInterrupt, which can land inside Event.wait's lock juggling.
        """
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda *_: stop.set())
        return stop

    def watch(self, stop: threading.Event) -> None:
        """Until ``stop`` is set; raises DemoFailed when a child exits on its own."""
        while not stop.is_set():
            for what, p in self.children.items():
                if p.poll() is not None:
                    raise self.failed(f"the demo {what} exited", p)
            stop.wait(0.5)

    def stop(self) -> None:
        for p in reversed(list(self.children.values())):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(list(self.children.values())):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self.backend is not None:
            self.backend.shutdown()
        self.logs.close()
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def run_demo(keep: bool = False) -> int:
    demo = Demo(keep)
    try:
        try:
            shown = demo.start()
            stop = demo.catch_stop_signals()
            print(demo.banner(shown), flush=True)
            demo.watch(stop)
        except (DemoFailed, PortunusError) as exc:
            demo.keep = True
            demo.stop()
            reason = exc.cli_line() if isinstance(exc, PortunusError) else f"error: demo_failed: {exc}"
            print(f"{reason}\n--- last lines of {demo.log_path} ---\n{log_tail(demo.log_path)}"
                  f"--- the demo's temp dir is kept: {demo.tmp}", file=sys.stderr)
            return 1
        print("stopping the demo…", file=sys.stderr)
        return 0
    finally:
        if not demo.logs.closed:
            demo.stop()
