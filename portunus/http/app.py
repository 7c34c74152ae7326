"""Operator HTTP API on ``http.server``: a routing table you can read top to bottom."""

from __future__ import annotations

import json
import re
import secrets
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from .. import __version__
from ..errors import PortunusError
from ..log import log
from ..store import operators as store_operators
from .auth import AuthSeam

MAX_BODY = 1 << 20
REQUEST_TIMEOUT = 15.0
SSE_KEEPALIVE = 30.0


def _flag(query: dict, name: str) -> bool:
    return query.get(name, ["false"])[-1].lower() in ("1", "true", "yes")


# ---------------------------------------------------------------- handlers
# Each takes (api, principal, match, query, body, ctx) and returns (status, payload).

def auth_status(api, p, m, q, body, ctx):
    return 200, {"version": __version__, "bootstrap_required": not store_operators.has_superadmin(api.store)}


def enroll_client(api, p, m, q, body, ctx):
    body = _object(body)
    _only(body, {"name", "client_name", "address", "ttl_secs"})
    name = body.get("name", body.get("client_name"))
    return 201, api.core.enroll_client(name, address=body.get("address"), ttl_secs=body.get("ttl_secs"),
                                       request_host=ctx["host"])


def reenroll_client(api, p, m, q, body, ctx):
    body = _object(body or {})
    _only(body, {"ttl_secs"})
    client = api.client_ref(m["id"])
    return 201, api.core.reenroll_client(client["client_id"], ttl_secs=body.get("ttl_secs"),
                                         request_host=ctx["host"])


def list_clients(api, p, m, q, body, ctx):
    return 200, {"clients": api.core.list_clients()}


def get_client(api, p, m, q, body, ctx):
    return 200, api.core.client_view(api.client_ref(m["id"]))


def put_client(api, p, m, q, body, ctx):
    body = _object(body)
    _only(body, {"address"})
    if "address" not in body:
        raise PortunusError("validation.missing_field", "address is required (null clears it)")
    return 200, api.core.set_address(api.client_ref(m["id"])["client_id"], body["address"])


def rename_client(api, p, m, q, body, ctx):
    body = _object(body)
    _only(body, {"name", "client_name"})
    return 200, api.core.rename_client(api.client_ref(m["id"])["client_id"], body.get("name", body.get("client_name")))


def revoke_client(api, p, m, q, body, ctx):
    return 200, api.core.revoke_client(api.client_ref(m["id"])["client_id"])


def delete_client(api, p, m, q, body, ctx):
    api.core.delete_client(api.client_ref(m["id"])["client_id"])
    return 200, {"deleted": True}


def push_rule(api, p, m, q, body, ctx):
    body = _object(body)
    ack = body.pop("ack_timeout_secs", None)
    ack = 2.0 if ack is None else ack
    if isinstance(ack, bool) or not isinstance(ack, (int, float)) or not 0 <= ack <= 60:
        raise PortunusError("validation.invalid_ack_timeout", f"ack_timeout_secs must be 0..60, got {ack!r}")
    return api.core.push_rule(body, owner=p.user_id if p else None, ack_timeout=float(ack),
                              request_id=ctx["request_id"])


def list_rules(api, p, m, q, body, ctx):
    client = q.get("client", [None])[-1]
    owner = q.get("owner", [None])[-1]
    return 200, {"rules": api.core.list_rules(client=client, owner=owner)}


def get_rule(api, p, m, q, body, ctx):
    return 200, api.core.get_rule(m["id"])


def put_rule(api, p, m, q, body, ctx):
    raise PortunusError("rate_limit_unsupported_by_client", "rate limits are not available in this build yet")


def delete_rule(api, p, m, q, body, ctx):
    return 200, api.core.remove_rule(m["id"], request_id=ctx["request_id"])


def rule_stats(api, p, m, q, body, ctx):
    return 200, api.core.rule_stats(m["id"], per_port=_flag(q, "per_port"), per_target=_flag(q, "per_target"))


def metrics(api, p, m, q, body, ctx):
    AuthSeam.require_superadmin(p)
    return 200, ("text/plain; version=0.0.4; charset=utf-8", api.core.metrics_text())


def get_advertised_endpoint(api, p, m, q, body, ctx):
    AuthSeam.require_superadmin(p)
    info = api.core.advertised_endpoint_info(ctx["host"])
    info.pop("error", None)
    return 200, info


def put_advertised_endpoint(api, p, m, q, body, ctx):
    AuthSeam.require_superadmin(p)
    body = _object(body)
    _only(body, {"override"})
    if "override" not in body:
        raise PortunusError("validation.missing_field", "override is required (a host:port, or null to clear it)")
    return 200, api.core.set_advertised_override(body["override"])


def get_audit(api, p, m, q, body, ctx):
    AuthSeam.require_superadmin(p)
    from ..store import audit as store_audit

    def one(name):
        return q.get(name, [None])[-1]

    def integer(name, default=None):
        v = one(name)
        if v is None:
            return default
        if not v.isdigit():
            raise PortunusError("validation.out_of_range", f"{name} must be a positive integer, got {v!r}")
        return int(v)
    outcome = one("outcome")
    if any(one(k) is not None for k in ("since", "until", "cursor")):
        return 200, store_audit.page(api.store, since=one("since"), until=one("until"), cursor=integer("cursor"),
                                     limit=integer("limit", 100), outcome=outcome)
    return 200, {"entries": store_audit.list_entries(api.store, limit=min(integer("limit", 100), 1000),
                                                     outcome=outcome)}


def openapi(api, p, m, q, body, ctx):
    from .openapi import document
    return 200, document(ROUTES)


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise PortunusError("bad_request", "the request body must be a JSON object")
    return body


def _only(body: dict, allowed: set) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise PortunusError("validation.unknown_field", f"unknown field(s): {', '.join(extra)}")


_ID = r"(?P<id>[^/]+)"
ROUTES = [
    ("GET", r"/v1/auth/status", auth_status, "Whether onboarding is still required."),
    ("POST", r"/v1/client-enrollments", enroll_client, "Create a client and a one-time enrollment command."),
    ("GET", r"/v1/clients", list_clients, "List clients."),
    ("GET", rf"/v1/clients/{_ID}", get_client, "One client."),
    ("PUT", rf"/v1/clients/{_ID}", put_client, "Set the client's address."),
    ("PATCH", rf"/v1/clients/{_ID}/name", rename_client, "Rename a client (keeps id and session)."),
    ("POST", rf"/v1/clients/{_ID}/enrollment", reenroll_client, "Re-enroll: new code, same id and rules."),
    ("POST", rf"/v1/clients/{_ID}/revoke", revoke_client, "Revoke the token and disconnect now."),
    ("DELETE", rf"/v1/clients/{_ID}", delete_client, "Delete a revoked client."),
    ("POST", r"/v1/rules", push_rule, "Push a rule and wait for the client's ack."),
    ("GET", r"/v1/rules", list_rules, "List rules (?client=&owner=)."),
    ("GET", rf"/v1/rules/{_ID}", get_rule, "One rule."),
    ("PUT", rf"/v1/rules/{_ID}", put_rule, "Change a rule's rate_limit."),
    ("DELETE", rf"/v1/rules/{_ID}", delete_rule, "Drain and remove a rule."),
    ("GET", rf"/v1/rules/{_ID}/stats", rule_stats, "Latest counters (?per_port=true&per_target=true)."),
    ("GET", rf"/v1/rules/{_ID}/stats/stream", None, "Server-Sent Events: a snapshot per report tick."),
    ("GET", r"/v1/settings/advertised-endpoint", get_advertised_endpoint,
     "The host:port enrollment commands point at, and where it comes from (superadmin)."),
    ("PUT", r"/v1/settings/advertised-endpoint", put_advertised_endpoint,
     "Set (or clear with null) the advertised endpoint override; must be covered by the cert SAN."),
    ("GET", r"/v1/audit", get_audit, "Audit rows, newest first (?limit=&outcome=, or ?since=&until=&cursor=&limit= "
                                     "for {entries, next_cursor, count}; superadmin)."),
    ("GET", r"/v1/metrics", metrics, "Prometheus text (superadmin)."),
    ("GET", r"/v1/openapi.json", openapi, "This API, described."),
]
_COMPILED = [(method, re.compile(f"^{pattern}$"), fn, pattern) for method, pattern, fn, _ in ROUTES]


class OperatorAPI:
    def __init__(self, core, store):
        self.core = core
        self.store = store
        self.auth = AuthSeam(store, core)

    def client_ref(self, ref: str) -> dict:
        from ..store import clients as store_clients
        return store_clients.resolve_client_ref(self.store, ref)


class Handler(BaseHTTPRequestHandler):
    server_version = f"portunus/{__version__}"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT
    api: OperatorAPI = None  # set on the subclass built by make_server

    def log_message(self, fmt, *args):  # access logging is the audit seam's job
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = parse_qs(url.query)
        request_id = self.headers.get("X-Request-Id") or secrets.token_hex(8)
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", request_id):
            request_id = secrets.token_hex(8)
        principal = None
        if not path.startswith("/v1/") and path != "/v1":
            self._send(404, {"error": {"code": "not_found", "message": f"no such page {path!r}"}}, request_id)
            return
        route, match, allowed = None, None, []
        for m_, rx, fn, _pattern in _COMPILED:
            mm = rx.match(path)
            if mm:
                allowed.append(m_)
                if m_ == method:
                    route, match = fn, mm
                    break
        auth = self.api.auth
        try:
            principal = auth.authenticate(method, path, self.headers)
            if not allowed:
                raise PortunusError("not_found", f"no route {method} {path}")
            if route is None and path.endswith("/stats/stream") and method == "GET":
                self._stream_stats(re.match(r"^/v1/rules/(?P<id>[^/]+)/stats/stream$", path), request_id,
                                   principal, method, path)
                return
            if route is None:
                raise PortunusError("method_not_allowed", f"{method} is not allowed on {path} "
                                                          f"(allowed: {', '.join(allowed)})")
            body = self._read_body(method)
            status, payload = route(self.api, principal, match.groupdict(), query, body,
                                    {"request_id": request_id, "host": self.headers.get("Host")})
        except PortunusError as exc:
            status = exc.http_status
            outcome = "deny" if status in (401, 403) else "allow"
            auth.audit(principal, method, path, outcome, exc.code, status, request_id)
            self._send(status, exc.to_json(), request_id)
            return
        except Exception as exc:  # a bug must not kill the server or leak a traceback
            log.error("http.handler_error", method=method, path=path, error=f"{type(exc).__name__}: {exc}",
                      request_id=request_id)
            auth.audit(principal, method, path, "allow", "internal", 500, request_id)
            self._send(500, {"error": {"code": "internal", "message": "internal error; see the server log",
                                       "request_id": request_id}}, request_id)
            return
        auth.audit(principal, method, path, "allow", None, status, request_id)
        self._send(status, payload, request_id)

    def _read_body(self, method: str):
        if method in ("GET", "DELETE"):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self._drain(length)
            return None
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise PortunusError("bad_request", "chunked bodies are not supported; send Content-Length")
        raw_len = self.headers.get("Content-Length")
        if raw_len is None:
            return None
        if not raw_len.isdigit():
            self.close_connection = True
            raise PortunusError("bad_request", f"bad Content-Length {raw_len!r}")
        length = int(raw_len)
        if length > MAX_BODY:
            self.close_connection = True
            raise PortunusError("payload_too_large", f"body of {length} bytes exceeds the {MAX_BODY}-byte limit")
        data = self.rfile.read(length) if length else b""
        if len(data) != length:
            self.close_connection = True
            raise PortunusError("bad_request", "body shorter than Content-Length")
        if not data:
            return None
        ctype = self.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        if ctype not in ("application/json", ""):
            raise PortunusError("bad_request", f"Content-Type must be application/json, got {ctype!r}")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PortunusError("bad_request", f"body is not valid JSON: {exc}") from None

    def _drain(self, length: int) -> None:
        if length > MAX_BODY:
            self.close_connection = True
            return
        self.rfile.read(length)

    def _send(self, status: int, payload, request_id: str) -> None:
        if isinstance(payload, tuple):
            ctype, text = payload
            data = text.encode()
        else:
            ctype = "application/json"
            data = (json.dumps(payload, indent=None, separators=(",", ":")) + "\n").encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Request-Id", request_id)
            self.send_header("Cache-Control", "no-store")
            if status == 429:
                self.send_header("Retry-After", "60")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def _stream_stats(self, match, request_id: str, principal, method: str, path: str) -> None:
        rule_id = match.group("id")
        core = self.api.core
        try:
            snap = core.rule_stats(rule_id, per_port=True, per_target=True)
        except PortunusError as exc:
            self.api.auth.audit(principal, method, path, "allow", exc.code, exc.http_status, request_id)
            self._send(exc.http_status, exc.to_json(), request_id)
            return
        self.api.auth.audit(principal, method, path, "allow", None, 200, request_id)
        self.close_connection = True
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Request-Id", request_id)
            self.end_headers()
            self.wfile.write(f"event: stats\ndata: {json.dumps(snap)}\n\n".encode())
            self.wfile.flush()
            tick = core.stats.tick
            last_write = time.monotonic()
            while not getattr(self.server, "stopping", False):
                new_tick = core.stats.wait_tick(tick, 1.0)
                if new_tick != tick:
                    tick = new_tick
                    snap = core.rule_stats(rule_id, per_port=True, per_target=True)
                    self.wfile.write(f"event: stats\ndata: {json.dumps(snap)}\n\n".encode())
                    self.wfile.flush()
                    last_write = time.monotonic()
                elif time.monotonic() - last_write >= SSE_KEEPALIVE:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                    last_write = time.monotonic()
        except (OSError, PortunusError):
            return


class APIServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        log.warn("http.connection_error", peer=str(client_address[0]))


def make_server(host: str, port: int, api: OperatorAPI) -> APIServer:
    handler = type("BoundHandler", (Handler,), {"api": api})
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    APIServer.address_family = fam
    try:
        srv = APIServer((host, port), handler)
    except OSError as exc:
        raise PortunusError("startup.listen_failed",
                            f"cannot listen on operator_http_listen {host}:{port}: {exc.strerror}") from None
    srv.stopping = False
    return srv


class MetricsHandler(BaseHTTPRequestHandler):
    core = None
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        if urlsplit(self.path).path != "/metrics":
            body, status, ctype = b"not found; try /metrics\n", 404, "text/plain"
        else:
            try:
                body, status = self.core.metrics_text().encode(), 200
            except Exception as exc:
                log.error("metrics.render_failed", error=f"{type(exc).__name__}: {exc}")
                body, status = b"metrics unavailable\n", 500
            ctype = "text/plain; version=0.0.4; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def make_metrics_server(host: str, port: int, core) -> APIServer:
    handler = type("BoundMetricsHandler", (MetricsHandler,), {"core": core})
    try:
        return APIServer((host, port), handler)
    except OSError as exc:
        raise PortunusError("startup.listen_failed",
                            f"cannot listen on metrics_listen {host}:{port}: {exc.strerror}") from None


def serve_in_thread(srv: APIServer, name: str) -> threading.Thread:
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, name=name, daemon=True)
    t.start()
    return t

