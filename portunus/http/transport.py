"""HTTP/1.1 transport limits under ``http.server``: deadlines, a connection cap, JSON protocol errors.

Why each limit exists (docs/server.md "Operator listener limits"):
- ``http.server`` only times out *between* bytes, so a client dripping one byte every
  few seconds held a thread forever. Here the whole header block must arrive within
  ``header_secs`` and the body within ``body_secs``.
- One thread per connection: the listener holds at most ``max_connections`` at once.
  When full, the oldest connection that is still (or again) waiting for request
  headers for longer than ``EVICT_AFTER_SECS`` is cut to make room — drippers and idle
  keep-alive connections, never a request being served. If there is none, the new
  connection gets ``503`` at once and is closed, without a thread.
- A connection whose descriptor number is within ``FD_RESERVE`` of the process limit is
  refused the same way, so the API can never take the last descriptors from the control
  listener; accept failing with EMFILE/ENFILE backs off instead of spinning.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import resource
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import PortunusError
from ..log import log

EVICT_AFTER_SECS = 1.0
WRITE_TIMEOUT_SECS = 15.0
ACCEPT_BACKOFF_SECS = 0.05
FD_RESERVE = 128  # descriptors the API never takes, for the control listener and client sessions
# tests shrink the limits with this variable (e.g. "header_secs=1,body_secs=1,max_connections=8");
# it is not a product setting and server.toml has no equivalent
LIMITS_ENV = "PORTUNUS_TEST_HTTP_LIMITS"


@dataclass(frozen=True)
class Limits:
    header_secs: float = 10.0
    body_secs: float = 30.0
    max_connections: int = 256

    @classmethod
    def from_env(cls, **defaults) -> "Limits":
        values = dict(defaults)
        for item in filter(None, os.environ.get(LIMITS_ENV, "").split(",")):
            key, _, raw = (part.strip() for part in item.partition("="))
            try:
                if key not in ("header_secs", "body_secs", "max_connections"):
                    raise ValueError(f"unknown key {key!r}")
                values[key] = int(raw) if key == "max_connections" else float(raw)
            except ValueError as exc:
                raise PortunusError("config_invalid", f"{LIMITS_ENV}: bad entry {item!r} ({exc})") from None
        return cls(**values)


class DeadlineReader(io.RawIOBase):
    """A socket reader whose every recv waits only until ``deadline`` (monotonic), if set."""

    def __init__(self, sock: socket.socket):
        super().__init__()
        self._sock = sock
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("request deadline passed")
            self._sock.settimeout(remaining)
        return self._sock.recv_into(buf)


class SocketWriter(io.BufferedIOBase):
    """Unbuffered writes with their own timeout (a stalled reader cannot hold a thread forever)."""

    def __init__(self, sock: socket.socket):
        super().__init__()
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._sock.settimeout(WRITE_TIMEOUT_SECS)
        self._sock.sendall(data)
        return len(data)


def fd_ceiling() -> int:
    """The lowest fd number an accepted API connection may have: FD_RESERVE below the soft limit.

    The kernel hands out the lowest free number, so a high one means the process is nearly out
    of descriptors; the API then refuses, and the control listener and client sessions keep theirs.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(soft - FD_RESERVE, 0) if soft != resource.RLIM_INFINITY else 1 << 30


@dataclass
class _Connection:
    since: float
    waiting_for_headers: bool = True


def _busy_response() -> bytes:
    # "server_busy" is not in errors.py yet (see the handover notes); the status is fixed here
    body = json.dumps({"error": {"code": "server_busy",
                                 "message": "too many concurrent operator connections; retry shortly"}}) + "\n"
    return (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}").encode()


class APIServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, *, family: int, limits: Limits, request_scope=None):
        self.address_family = family  # per instance: the class attribute is shared by every listener
        self.limits = limits
        self.stopping = False
        # a context manager factory around each request (the store's pooled connections)
        self.request_scope = request_scope or contextlib.nullcontext
        self._conn_lock = threading.Lock()
        self._open: dict[socket.socket, _Connection] = {}
        super().__init__(address, handler)

    def server_bind(self):
        """Bind without ``HTTPServer.server_bind``'s ``socket.getfqdn`` of the bind address: that
        reverse lookup stalls ``serve`` for the resolver's timeout on a host whose resolver is slow
        and whose /etc/hosts lacks the address; ``server_name`` is only used by CGI handlers."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port

    # ---- the connection cap -------------------------------------------------------
    def process_request(self, request, client_address):
        if request.fileno() >= fd_ceiling():
            self._refuse_busy(request, client_address, reason="file descriptors near the process limit")
            return
        with self._conn_lock:
            admitted = len(self._open) < self.limits.max_connections or self._evict_one_locked()
            if admitted:
                self._open[request] = _Connection(time.monotonic())
        if not admitted:
            self._refuse_busy(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def waiting_for_headers(self, request, waiting: bool) -> None:
        """The handler's phase: True while it waits for (the next) request headers."""
        with self._conn_lock:
            conn = self._open.get(request)
            if conn is not None:
                conn.waiting_for_headers = waiting
                conn.since = time.monotonic()

    @property
    def open_connections(self) -> int:
        with self._conn_lock:
            return len(self._open)

    def _forget(self, request) -> None:
        with self._conn_lock:
            self._open.pop(request, None)

    def _evict_one_locked(self) -> bool:
        now = time.monotonic()
        idle = [(c.since, id(s), s) for s, c in self._open.items()
                if c.waiting_for_headers and now - c.since >= EVICT_AFTER_SECS]
        if not idle:
            return False
        _, _, victim = min(idle)
        del self._open[victim]
        try:
            victim.shutdown(socket.SHUT_RDWR)  # its thread's recv returns at once and the thread ends
        except OSError:
            pass
        log.limited("warn", "http.connection_evicted", key=self.name, every=10.0, listener=self.name,
                    reason="connection cap reached; cut the oldest connection still waiting for headers")
        return True

    def _refuse_busy(self, request, client_address, reason: str = "too many concurrent connections") -> None:
        try:
            request.setblocking(False)
            try:
                request.recv(65536)  # what already arrived, so closing does not turn into a reset
            except OSError:
                pass
            request.send(_busy_response())
        except OSError:
            pass
        self.shutdown_request(request)
        log.limited("warn", "http.connection_refused", key=self.name, every=10.0, listener=self.name,
                    peer=str(client_address[0]), limit=self.limits.max_connections, reason=reason)

    @property
    def name(self) -> str:
        return f"{self.server_address[0]}:{self.server_address[1]}"

    # ---- accept without spinning on EMFILE -------------------------------------------
    def get_request(self):
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.limited("warn", "http.accept_error", key=self.name, every=10.0, listener=self.name,
                            error=errno.errorcode.get(exc.errno, str(exc.errno)))
                time.sleep(ACCEPT_BACKOFF_SECS)  # the accept thread only; lets fds free up
            raise

    def handle_error(self, request, client_address):
        log.warn("http.connection_error", peer=str(client_address[0]))


class DeadlineRequestHandler(BaseHTTPRequestHandler):
    """``BaseHTTPRequestHandler`` with whole-request deadlines; every method goes to ``respond``."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # so even a garbled request line gets a status line back
    server: APIServer

    def setup(self):
        self.connection = self.request
        try:  # headers and body go out as two writes: without this, Nagle + delayed ACK add ~40 ms per answer
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)
        self.wfile = SocketWriter(self.connection)

    def log_message(self, fmt, *args):  # access logging is the audit seam's job
        pass

    def handle_one_request(self):
        with self.server.request_scope():
            self._handle_one_request()

    def _handle_one_request(self):
        limits = self.server.limits
        self.server.waiting_for_headers(self.request, True)
        self.reader.deadline = time.monotonic() + limits.header_secs
        self.close_connection = True
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                return
            if len(self.raw_requestline) > 65536:
                self.requestline, self.request_version, self.command = "", "HTTP/1.0", None
                self.send_error(414, "request line longer than 65536 bytes")
                return
            if not self.parse_request():
                return
        except (TimeoutError, OSError, ValueError):
            # headers incomplete within the deadline, or the peer went away: close. parse_request may
            # have set close_connection = False (HTTP/1.1) before its header read timed out; without
            # this the handler would loop into a second request with a fresh deadline (20 s, not 10 s)
            self.close_connection = True
            return
        self.server.waiting_for_headers(self.request, False)
        if len(self.requestline.split()) == 2:  # HTTP/0.9 has no status line or headers to answer with
            self.send_error(400, "HTTP/0.9 requests are not supported; send HTTP/1.0 or HTTP/1.1")
            return
        self.reader.deadline = time.monotonic() + limits.body_secs
        self.respond()

    def respond(self) -> None:
        raise NotImplementedError

    def send_error(self, code, message=None, explain=None):
        """Protocol errors found by ``http.server`` itself, as JSON 400s (never its HTML pages)."""
        self.close_connection = True
        text = message or "malformed request"
        self.protocol_error(f"{text} (HTTP {int(code)})" if int(code) != 400 else text)

    def protocol_error(self, message: str) -> None:
        body = (json.dumps({"error": {"code": "bad_request", "message": message}}) + "\n").encode()
        try:
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass
