"""In-process harness for the data-plane tests: a real loop on a thread, counting peers, log capture."""

from __future__ import annotations

import io
import json
import socket
import threading

from portunus.log import log
from portunus.loop import Loop
from portunus.model import Rule
from portunus.relay.runtime import RuleRuntime, RuntimeSettings


class LoopThread:
    """A Loop and a RuleRuntime running on their own thread; ``call`` runs code on the loop."""

    def __init__(self):
        self.loop = Loop()
        self.runtime = RuleRuntime(self.loop, RuntimeSettings(drain_timeout=1.0))
        self.enforcer = self.runtime.ctx.enforcer
        self.t = threading.Thread(target=self.loop.run, daemon=True)
        self.t.start()

    def call(self, fn, *args):
        done = threading.Event()
        box = {}

        def run():
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # surface in the test thread
                box["error"] = exc
            done.set()
        self.loop.call_soon_threadsafe(run)
        assert done.wait(10), "loop did not run the call"
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def snapshot(self, rule_id: str) -> dict:
        return self.call(self.runtime.snapshot, rule_id)

    def close(self):
        self.loop.stop_threadsafe()
        self.t.join(5)
        self.loop.close()


def tcp_rule(rule_id: str, listen: int, target: int, **kw) -> Rule:
    return Rule.from_dict({"rule_id": rule_id, "listen_port": listen, "target": f"127.0.0.1:{target}", **kw})


class CountingSink:
    """Accepts on ``port`` and counts every byte received, per connection and in total."""

    def __init__(self, port: int):
        self.total = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self._stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._drain, args=(c,), daemon=True).start()

    def _drain(self, c: socket.socket) -> None:
        c.settimeout(0.2)
        with c:
            while not self._stop:
                try:
                    data = c.recv(262144)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    return
                with self.lock:
                    self.total += len(data)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self.t.join(2)


class Blaster:
    """Sends ``chunk`` bytes over and over to ``sock`` from a thread until stopped or cut."""

    def __init__(self, sock: socket.socket, limit: int | None = None):
        self.sock, self.limit = sock, limit
        self.sent = 0
        self.error: OSError | None = None
        self._stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        chunk = b"x" * 65536
        self.sock.settimeout(0.5)
        while not self._stop and (self.limit is None or self.sent < self.limit):
            try:
                self.sent += self.sock.send(chunk)
            except socket.timeout:
                continue
            except OSError as exc:
                self.error = exc
                return

    def stop(self) -> None:
        self._stop = True
        self.t.join(5)


class LogCapture:
    """The JSON events the process logger writes while the capture is installed."""

    def __init__(self, monkeypatch):
        self.buf = io.StringIO()
        monkeypatch.setattr(log, "stream", self.buf)
        monkeypatch.setattr(log, "fmt", "json")

    def events(self, name: str, **match) -> list[dict]:
        out = []
        for line in self.buf.getvalue().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == name and all(rec.get(k) == v for k, v in match.items()):
                out.append(rec)
        return out


def refused(port: int) -> bool:
    """Connect and send a byte: True when the relay answered with RST (accept-then-reset)."""
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
    except ConnectionResetError:  # the RST can beat connect() back on loopback
        return True
    try:
        c.sendall(b"x")
        got = c.recv(1)
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        c.close()
    assert got == b"x", f"neither echoed nor reset: {got!r}"
    return False
