"""Operator HTTP API on ``http.server``: dispatch every request through the routing table and the auth seam.

``routes.py`` holds the table and handlers, ``auth.py`` the one seam, ``parse.py`` the
input parsing, ``transport.py`` the deadlines and the connection cap, ``sse.py`` the
stats stream. Everything below HTTP is reached through ``server.access.OperatorAccess``
and ``server.core.ServerCore``.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import threading
from urllib.parse import parse_qs, urlsplit

from .. import __version__
from ..errors import PortunusError
from ..log import log
from ..server.access import OperatorAccess
from ..server.identity import SESSION_ABSOLUTE_SECS, retry_after_header
from . import routes, static
from .auth import AUTHENTICATED, SESSION_COOKIE, AuthSeam, Request, session_cookie
from .parse import MAX_BODY, content_length, json_body
from .routes import StatsStream
from .sse import write_stats_stream
from .transport import APIServer, DeadlineRequestHandler, Limits

METRICS_MAX_CONNECTIONS = 64
BODY_METHODS = ("POST", "PUT", "PATCH")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class OperatorAPI:
    """What the handlers see: the domain services (``core``), the access layer and the auth seam.

    ``public_origin`` is ``operator_http_public_origin`` as configured (None when unset): CSRF
    compares ``Origin`` with it, and an https one makes the session cookie ``Secure``.
    """

    def __init__(self, core, store, *, public_origin: str | None = None, identity=None):
        self.core = core
        self.access = OperatorAccess(store, core, identity)
        self.auth = AuthSeam(self.access, core, public_origin)
        self.cookie_secure = bool(public_origin and public_origin.lower().startswith("https://"))

    def session_cookie(self, token: str) -> str:
        """The Set-Cookie value for a session token; an empty token deletes the cookie."""
        max_age = SESSION_ABSOLUTE_SECS if token else 0
        value = f"{SESSION_COOKIE}={token}; HttpOnly; SameSite=Lax; Path=/; Max-Age={max_age}"
        return value + "; Secure" if self.cookie_secure else value


def _v1_path(target: str | None) -> str | None:
    """The normalised path of a request target when it is under /v1, else None."""
    if not target:
        return None
    try:
        path = urlsplit(target).path
    except ValueError:
        path = target.split("?", 1)[0]
    path = path.rstrip("/") or "/"
    return path if path == "/v1" or path.startswith("/v1/") else None


class Handler(DeadlineRequestHandler):
    server_version = f"portunus/{__version__}"
    sys_version = ""
    api: OperatorAPI = None  # set on the subclass built by make_server

    def respond(self) -> None:
        self.body_consumed = False
        method = self.command
        request_id = self.headers.get("X-Request-Id") or ""
        if not _REQUEST_ID.fullmatch(request_id):
            request_id = secrets.token_hex(8)
        path = _v1_path(self.path)
        if path is None:
            if self._body_pending():
                self.close_connection = True  # static answers never read a body
            if static.serve(self):
                return
            shown = self.path.split("?", 1)[0][:200]
            self._send(404, {"error": {"code": "not_found", "message": f"no such page {shown!r}"}}, request_id)
            return
        route, params, allowed = routes.match(method, path)
        auth = self.api.auth
        request = Request(method, self.headers, self.client_address[0] if self.client_address else "",
                          has_body=self._body_announced())
        try:
            auth.admit(route.access if route else AUTHENTICATED, request, params,
                       password_change_ok=bool(route and route.password_change_ok))
            if route is None:
                if not allowed:
                    raise PortunusError("not_found", f"no route {method} {path}")
                raise PortunusError("method_not_allowed", f"{method} is not allowed on {path} "
                                                          f"(allowed: {', '.join(allowed)})", allowed=allowed)
            body = self._read_body(method)
            query = parse_qs(urlsplit(self.path).query)
            ctx = {"request_id": request_id, "host": self.headers.get("Host"), "headers": self.headers,
                   "remote_ip": request.remote_ip, "cookie": session_cookie(self.headers)}
            status, payload, *extra = route.handler(self.api, request.principal, params, query, body, ctx)
        except PortunusError as exc:
            status = exc.http_status
            outcome = "deny" if status in (401, 403, 429) else "allow"
            auth.audit(request.principal, method, path, outcome, exc.code, status, request_id)
            headers = {"Allow": ", ".join(allowed)} if exc.code == "method_not_allowed" else {}
            retry_after = retry_after_header(exc)
            if retry_after is not None:
                headers["Retry-After"] = retry_after
            self._send(status, exc.to_json(), request_id, headers)
            return
        except Exception as exc:  # a bug must not kill the server or leak a traceback
            log.error("http.handler_error", method=method, path=path, error=f"{type(exc).__name__}: {exc}",
                      request_id=request_id)
            auth.audit(request.principal, method, path, "allow", "internal", 500, request_id)
            self._send(500, {"error": {"code": "internal", "message": "internal error; see the server log",
                                       "request_id": request_id}}, request_id)
            return
        auth.audit(request.principal, method, path, "allow", None, status, request_id)
        if isinstance(payload, StatsStream):
            self._stream(payload, request_id)
        else:
            self._send(status, payload, request_id, extra[0] if extra else None)

    def protocol_error(self, message: str) -> None:
        path = _v1_path(getattr(self, "path", None))
        if self.command and path is not None:  # a /v1 request http.server could not parse: still audited
            self.api.auth.audit(None, self.command, path, "allow", "bad_request", 400, None)
        super().protocol_error(message)

    # ---- body ---------------------------------------------------------------------
    def _read_body(self, method: str):
        """The decoded JSON body of POST/PUT/PATCH (None when empty); other methods' bodies are drained."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise PortunusError("bad_request", "chunked bodies are not supported; send Content-Length")
        length = content_length(self.headers.get_all("Content-Length") or [])
        if not length:
            self.body_consumed = True
            return None
        if length > MAX_BODY:
            raise PortunusError("payload_too_large", f"body of {length} bytes exceeds the {MAX_BODY}-byte limit")
        try:
            data = self.rfile.read(length)
        except (TimeoutError, OSError):
            data = None
        if data is None or len(data) != length:
            raise PortunusError("bad_request", f"body shorter than its Content-Length {length} "
                                               f"(not complete within {self.server.limits.body_secs:g} s)")
        self.body_consumed = True
        if method not in BODY_METHODS:
            return None
        ctype = self.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        if ctype not in ("application/json", ""):
            raise PortunusError("bad_request", f"Content-Type must be application/json, got {ctype!r}")
        return json_body(data)

    def _body_announced(self) -> bool:
        """Whether the request says it has a body (CSRF's content-type rule runs before it is read)."""
        if self.headers.get("Transfer-Encoding") is not None:
            return True
        try:
            return bool(content_length(self.headers.get_all("Content-Length") or []))
        except PortunusError:
            return True

    def _body_pending(self) -> bool:
        return not getattr(self, "body_consumed", False) and self._body_announced()

    # ---- responses ----------------------------------------------------------------
    def _send(self, status: int, payload, request_id: str, headers: dict | None = None) -> None:
        if status == 204:
            ctype, data = None, b""
        elif isinstance(payload, tuple):
            ctype, text = payload
            data = text.encode()
        else:
            ctype = "application/json"
            data = (json.dumps(payload, indent=None, separators=(",", ":")) + "\n").encode()
        if self._body_pending():
            self.close_connection = True  # an unread body would be parsed as the next request
        try:
            self.send_response(status)
            if ctype is not None:
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Request-Id", request_id)
            self.send_header("Cache-Control", "no-store")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if status == 429 and "Retry-After" not in (headers or {}):
                self.send_header("Retry-After", "60")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def _stream(self, stream: StatsStream, request_id: str) -> None:
        self.close_connection = True
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Request-Id", request_id)
            self.end_headers()
        except OSError:
            return
        write_stats_stream(self.wfile, self.api.core, stream.rule_id, stream.first, lambda: self.server.stopping,
                           release=self.api.access.release_connection)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def make_server(host: str, port: int, api: OperatorAPI, limits: Limits | None = None) -> APIServer:
    handler = type("BoundHandler", (Handler,), {"api": api})
    try:
        return APIServer((host, port), handler, family=_family(host), limits=limits or Limits.from_env(),
                         request_scope=api.access.request_scope)
    except OSError as exc:
        raise PortunusError("startup.listen_failed",
                            f"cannot listen on operator_http_listen {host}:{port}: {exc.strerror}") from None


class MetricsHandler(DeadlineRequestHandler):
    core = None

    def respond(self) -> None:
        if self.command not in ("GET", "HEAD"):
            body, status, ctype = b"only GET /metrics\n", 405, "text/plain"
        elif urlsplit(self.path).path != "/metrics":
            body, status, ctype = b"not found; try /metrics\n", 404, "text/plain"
        else:
            try:
                body, status = self.core.metrics_text().encode(), 200
            except Exception as exc:
                log.error("metrics.render_failed", error=f"{type(exc).__name__}: {exc}")
                body, status = b"metrics unavailable\n", 500
            ctype = "text/plain; version=0.0.4; charset=utf-8"
        if self.headers.get("Content-Length") not in (None, "0") or self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # bodies are never read here
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if status == 405:
                self.send_header("Allow", "GET, HEAD")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            self.close_connection = True


def make_metrics_server(host: str, port: int, core, access: OperatorAccess | None = None) -> APIServer:
    handler = type("BoundMetricsHandler", (MetricsHandler,), {"core": core})
    access = access or OperatorAccess(core.store, core)
    try:
        return APIServer((host, port), handler, family=_family(host),
                         limits=Limits.from_env(max_connections=METRICS_MAX_CONNECTIONS),
                         request_scope=access.request_scope)
    except OSError as exc:
        raise PortunusError("startup.listen_failed",
                            f"cannot listen on metrics_listen {host}:{port}: {exc.strerror}") from None


def serve_in_thread(srv: APIServer, name: str) -> threading.Thread:
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, name=name, daemon=True)
    t.start()
    return t
