"""The operator listener under hostile input (issue 8 points 3, 4, 5, 9; issue 7 point 7).

Every malformed /v1 request gets a 4xx JSON error and exactly one audit row, never
a 500 or http.server's HTML; slow clients are cut off by whole-request deadlines; the
connection cap keeps the API and the control plane answering; finished request
threads give their store connections back.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import ssl
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import Proc, portunus_cmd, wait_until
from cp import OPERATOR_TOKEN, write_server_toml

# short deadlines so the slow-client tests take seconds (transport.LIMITS_ENV, a test-only knob)
FAST_LIMITS = "header_secs=2,body_secs=2"
AUTH = f"Authorization: Bearer {OPERATOR_TOKEN}\r\n"


# ------------------------------------------------------------------ helpers shared with test_http_fuzz.py

class RunningServer:
    def __init__(self, data_dir: Path, limits: str | None = FAST_LIMITS, preexec_fn=None, **toml):
        write_server_toml(data_dir, **toml)
        env = {"PORTUNUS_OPERATOR_TOKEN": OPERATOR_TOKEN, "PORTUNUS_ALLOW_ANY_FS": "1"}
        if limits:
            env["PORTUNUS_TEST_HTTP_LIMITS"] = limits
        self.data_dir = data_dir
        self.proc = Proc(portunus_cmd("server") + ["--data-dir", str(data_dir), "serve"], env=env,
                         preexec_fn=preexec_fn)
        try:
            ready = self.proc.wait_event("server.ready", timeout=30)
        except BaseException:
            self.proc.kill()
            raise
        self.pid = self.proc.p.pid
        host, port = ready["operator_http_url"].removeprefix("http://").rsplit(":", 1)
        self.http_addr = (host.strip("[]"), int(port))
        self.api = ready["operator_http_url"]
        self.metrics_url = ready["metrics_url"]
        self.control_port = int(ready["control_listen"].rsplit(":", 1)[1])

    def stop(self) -> None:
        self.proc.kill()

    def audit_count(self) -> int:
        db = sqlite3.connect(f"file:{self.data_dir / 'state.db'}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        finally:
            db.close()

    def last_audit(self) -> dict:
        db = sqlite3.connect(f"file:{self.data_dir / 'state.db'}?mode=ro", uri=True, timeout=5)
        db.row_factory = sqlite3.Row
        try:
            return dict(db.execute("SELECT * FROM audit ORDER BY id DESC LIMIT 1").fetchone())
        finally:
            db.close()

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def thread_count(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return int(next(line for line in f if line.startswith("Threads:")).split()[1])

    def connect(self, timeout: float = 10.0) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.http_addr[0] else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.http_addr)
        return s

    def raw(self, data: bytes, timeout: float = 10.0):
        """Send ``data`` on a fresh connection; (status, headers, body) of the reply, or None when closed silently."""
        s = self.connect(timeout)
        try:
            try:
                s.sendall(data)
            except OSError:
                pass  # the server may answer and close before reading everything
            return read_response(s)
        finally:
            s.close()

    def get_json(self, path: str, token: bool = True):
        req = urllib.request.Request(self.api + path, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}
                                     if token else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


def read_response(s: socket.socket):
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    if b"\r\n\r\n" not in buf:
        return None
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    try:
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return status, headers, body


def request(method: str, path: str, *, headers: str = AUTH, body: bytes = b"", length: str | None = None,
            version: str = "HTTP/1.1") -> bytes:
    head = f"{method} {path} {version}\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}"
    if length is None and body:
        length = str(len(body))
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return head.encode("utf-8") + b"\r\n" + body


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = RunningServer(tmp_path_factory.mktemp("hostile") / "data")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client_id(server):
    res = server.raw(request("POST", "/v1/client-enrollments", body=b'{"name":"edge-hostile"}',
                             headers=AUTH + "Content-Type: application/json\r\n"))
    assert res is not None and res[0] == 201, res
    return json.loads(res[2])["client"]["client_id"]


def assert_json_4xx(server, data: bytes, status: int | None = None, code: str | None = None, audited: bool = True,
                    timeout: float = 10.0):
    before = server.audit_count()
    res = server.raw(data, timeout=timeout)
    assert res is not None, f"no response to {data[:120]!r}"
    got, headers, body = res
    assert 400 <= got < 500, (got, body[:300])
    if status is not None:
        assert got == status, (got, body[:300])
    assert headers.get("content-type") == "application/json", headers
    error = json.loads(body)["error"]
    if code is not None:
        assert error["code"] == code, error
    assert "Traceback" not in error["message"]
    if audited:
        assert server.audit_count() - before == 1
    return headers, error


# ------------------------------------------------------------------ point 3: malformed input

DEEP = [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 40 + b"]" * 40]


@pytest.mark.parametrize("body", DEEP, ids=["deep-array", "deep-object", "deeper-than-allowed"])
def test_deeply_nested_bodies_are_400(server, body):
    _, error = assert_json_4xx(server, request("POST", "/v1/client-enrollments", body=body), 400, "bad_request")
    assert "nest" in error["message"] or "JSON" in error["message"]


@pytest.mark.parametrize("value", ["abc", "-1", "0x10", "1e3", "5, 5", "٣", "²", "５", "+5", " ", "99999999999999999999"])
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_bad_content_length_is_400(server, value, method):
    path = "/v1/client-enrollments" if method == "POST" else "/v1/clients"
    _, error = assert_json_4xx(server, request(method, path, body=b"{}", length=value), 400, "bad_request")
    assert "Content-Length" in error["message"]


@pytest.mark.parametrize("raw", [b"\xb2", b"\xb9", b"\xbc"])  # "²", "¹", "¼" once http.server decodes latin-1
def test_latin1_digit_content_length_is_400(server, raw):
    data = request("POST", "/v1/client-enrollments").replace(b"\r\n\r\n", b"\r\nContent-Length: " + raw +
                                                             b"\r\n\r\n") + b"{}"
    assert_json_4xx(server, data, 400, "bad_request")


def test_latin1_digit_query_limit_is_400(server):
    assert_json_4xx(server, request("GET", "/v1/audit?limit=").replace(b"limit=", b"limit=\xb2"), 400,
                    "validation.out_of_range")


def test_two_content_lengths_are_400(server):
    data = request("POST", "/v1/client-enrollments", headers=AUTH + "Content-Length: 2\r\n", body=b"{}")
    assert_json_4xx(server, data, 400, "bad_request")


@pytest.mark.parametrize("field", ["name", "address"])
def test_lone_surrogates_in_enrollment_fields_are_named(server, field):
    body = {"name": "edge-x", field: "a\\ud800b"}
    raw = json.dumps(body).replace("\\\\ud800", "\\ud800").encode()
    _, error = assert_json_4xx(server, request("POST", "/v1/client-enrollments", body=raw), 400,
                               "validation.invalid_string")
    assert error["field"] == field and field in error["message"]


def test_lone_surrogates_in_address_rename_and_rules(server, client_id):
    _, error = assert_json_4xx(server, request("PUT", f"/v1/clients/{client_id}", body=b'{"address":"\\udfff"}'),
                               400, "validation.invalid_string")
    assert error["field"] == "address"
    _, error = assert_json_4xx(server, request("PATCH", f"/v1/clients/{client_id}/name",
                                               body=b'{"name":"x\\ud800"}'), 400, "validation.invalid_string")
    assert error["field"] == "name"
    body = b'{"client":"edge-hostile","protocol":"tcp","listen_port":20000,"targets":["h\\ud834:80"]}'
    _, error = assert_json_4xx(server, request("POST", "/v1/rules", body=body), 400, "validation.invalid_string")
    assert error["field"] == "targets[0]"
    _, error = assert_json_4xx(server, request("POST", "/v1/rules", body=b'{"\\ud800":1}'), 400,
                               "validation.invalid_string")


@pytest.mark.parametrize("query", ["limit=%C2%B2", "limit=\u00b2", "limit=%D9%A3", "limit=1e3", "limit=-1",
                                   "cursor=9223372036854775808", "cursor=99999999999999999999999999",
                                   "since=2000-01-01T00:00:00Z&cursor=%C2%B2",
                                   "since=2000-01-01T00:00:00Z&limit=9223372036854775808"])
def test_bad_query_integers_are_400(server, query):
    assert_json_4xx(server, request("GET", f"/v1/audit?{query}"), 400)


def test_body_shorter_than_content_length_is_400_after_the_deadline(server):
    t0 = time.monotonic()
    _, error = assert_json_4xx(server, request("POST", "/v1/client-enrollments", body=b"{}", length="10"),
                               400, "bad_request")
    assert "shorter" in error["message"]
    assert time.monotonic() - t0 < 6  # body_secs=2 here, plus slack


def test_nan_and_huge_integers_are_refused(server):
    assert_json_4xx(server, request("POST", "/v1/client-enrollments", body=b'{"name":"a","ttl_secs":NaN}'),
                    400, "bad_request")
    assert_json_4xx(server, request("POST", "/v1/client-enrollments",
                                    body=b'{"name":"a","ttl_secs":123456789012345678901234567890}'), 400)


# ------------------------------------------------------------------ point 4: every method through the API layer

@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "TRACE", "CONNECT", "get", "post", "FOO", "PROPFIND"])
def test_every_method_is_a_json_405_with_allow_and_an_audit_row(server, method):
    before = server.audit_count()
    res = server.raw(request(method, "/v1/clients"))
    assert res is not None
    status, headers, body = res
    assert status == 405
    assert headers["allow"] == "GET"
    assert headers["content-type"] == "application/json"
    if method != "HEAD":  # a HEAD answer carries the headers only
        assert json.loads(body)["error"]["code"] == "method_not_allowed"
    assert server.audit_count() - before == 1
    row = server.last_audit()
    assert (row["method"], row["path"], row["reason"]) == (method, "/v1/clients", "method_not_allowed")


def test_unknown_method_without_a_token_is_still_json_and_audited(server):
    assert_json_4xx(server, request("BREW", "/v1/clients", headers=""), 401, "unauthenticated")


@pytest.mark.parametrize("line", [b"GET /v1/clients HTTP/2.0", b"GET /v1/clients HTTP/1.x", b"GET /v1/clients",
                                  b"GET  /v1/clients HTTP/1.1 extra", b"\x00\xff\xfe garbage"])
def test_garbled_request_lines_are_json_400(server, line):
    res = server.raw(line + b"\r\nHost: x\r\n\r\n")
    assert res is not None
    status, headers, body = res
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "bad_request"


@pytest.mark.parametrize("path", ["/a%00.js", "/%2e%2e/%2e%2e/etc/passwd.js", "/" + "n" * 5000 + ".js", "/.env"])
def test_hostile_static_paths_are_404_json(server, path):
    res = server.raw(request("GET", path, headers=""))
    assert res is not None and res[0] == 404 and res[1]["content-type"] == "application/json", res


def test_too_many_headers_on_v1_is_json_400_and_audited(server):
    many = "".join(f"X-{i}: y\r\n" for i in range(150))
    assert_json_4xx(server, request("GET", "/v1/clients", headers=AUTH + many), 400, "bad_request")


def test_put_rule_is_the_caps_route_and_the_stream_is_a_table_route(server):
    status, spec = server.get_json("/v1/openapi.json", token=False)
    assert status == 200
    assert spec["paths"]["/v1/rules/{id}"]["put"]["x-portunus-access"] == "owner"  # {rate_limit} only
    assert "get" in spec["paths"]["/v1/rules/{id}/stats/stream"]
    assert "security" not in spec["paths"]["/v1/auth/status"]["get"]
    assert spec["paths"]["/v1/audit"]["get"]["security"] == [{"bearer": []}, {"session": []}]
    assert_json_4xx(server, request("PUT", "/v1/rules/01ARZ3NDEKTSV4RRFFQ69G5FAV", body=b"{}"), 400,
                    "validation.missing_field")
    headers, _ = assert_json_4xx(server, request("PATCH", "/v1/rules/01ARZ3NDEKTSV4RRFFQ69G5FAV", body=b"{}"), 405,
                                 "method_not_allowed")
    assert headers["allow"] == "GET, DELETE, PUT"
    assert_json_4xx(server, request("GET", "/v1/rules/01ARZ3NDEKTSV4RRFFQ69G5FAV/stats/stream"), 404, "not_found")


# ------------------------------------------------------------------ point 5: slow clients

def test_a_header_dripper_is_cut_off_within_the_deadline(server):
    s = server.connect(timeout=10)
    t0 = time.monotonic()
    s.sendall(b"GET /v1/clients HTTP/1.1\r\n")
    closed_after = None
    try:
        for i in range(40):  # one header line every 0.2 s: never idle long enough for a per-byte timeout
            s.sendall(f"X-Drip-{i}: 1\r\n".encode())
            time.sleep(0.2)
    except OSError:
        closed_after = time.monotonic() - t0
    if closed_after is None:
        s.settimeout(5)
        try:
            assert s.recv(1024) == b""
        except ConnectionResetError:
            pass
        closed_after = time.monotonic() - t0
    s.close()
    assert closed_after < 2 + 1.5, f"dripper held for {closed_after:.1f} s (header deadline 2 s)"
    assert server.get_json("/v1/auth/status")[0] == 200


def test_a_request_line_then_one_byte_at_a_time_gets_one_deadline_not_two(server):
    """The deadline covers the request line and the headers together: a complete request line
    followed by a slow trickle is closed at the header deadline (it once got a second one)."""
    s = server.connect(timeout=10)
    t0 = time.monotonic()
    s.sendall(b"GET /v1/clients HTTP/1.1\r\n")
    closed_after = None
    try:
        for _ in range(20):
            s.sendall(b"X")  # never completes a header line
            time.sleep(0.3)
    except OSError:
        closed_after = time.monotonic() - t0
    if closed_after is None:
        s.settimeout(5)
        try:
            s.recv(1024)
        except (ConnectionResetError, TimeoutError):
            pass
        closed_after = time.monotonic() - t0
    s.close()
    assert closed_after < 2 + 1.5, f"held for {closed_after:.1f} s (header deadline 2 s)"


def test_a_full_listener_answers_503_at_once(tmp_path):
    srv = RunningServer(tmp_path / "data", limits="header_secs=10,body_secs=10,max_connections=4")
    held = []
    try:
        for _ in range(4):  # headers complete, body pending: being served, so never evicted
            s = srv.connect()
            s.sendall(request("POST", "/v1/client-enrollments", length="100"))
            held.append(s)
        wait_until(lambda: srv.thread_count() >= 4 + 3, timeout=10, what="4 request threads")
        t0 = time.monotonic()
        res = srv.raw(request("GET", "/v1/auth/status", headers=""), timeout=5)
        assert res is not None and res[0] == 503, res
        assert json.loads(res[2])["error"]["code"] == "server_busy"
        assert time.monotonic() - t0 < 2
    finally:
        for s in held:
            s.close()
        srv.stop()


def test_a_thousand_drippers_leave_the_api_and_the_control_plane_answering(tmp_path):
    srv = RunningServer(tmp_path / "data", limits=None)  # the real limits: 10 s headers, 256 connections
    drippers = []
    try:
        for i in range(1000):
            s = srv.connect(timeout=5)
            s.setblocking(False)
            try:
                s.send(b"GET /v1/clients HTTP/1.1\r\nX-Slow: ")
            except OSError:
                pass
            drippers.append(s)
        assert srv.thread_count() < 256 + 40
        time.sleep(1.2)  # the cap cuts only connections that waited for headers at least 1 s

        def api_answers():
            t0 = time.monotonic()
            status, body = srv.get_json("/v1/auth/status", token=False)
            return status == 200 and time.monotonic() - t0 < 1.0
        wait_until(api_answers, timeout=10, interval=0.1, what="API answering under 1000 drippers")
        _control_plane_accepts(srv)
        assert srv.thread_count() < 256 + 40
        assert urllib.request.urlopen(srv.metrics_url, timeout=5).status == 200
    finally:
        for s in drippers:
            s.close()
        srv.stop()


def _control_plane_accepts(srv) -> None:
    raw = socket.create_connection(("127.0.0.1", srv.control_port), timeout=5)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() is not None


def test_the_api_never_takes_the_last_file_descriptors(tmp_path):
    import resource

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))  # serve cannot raise it past the hard limit
    srv = RunningServer(tmp_path / "data", limits=None, preexec_fn=low_limit)
    held = []
    try:
        for _ in range(250):  # below the 256 connection cap, above what 300 - 128 reserved descriptors allow
            s = srv.connect(timeout=5)
            s.setblocking(False)
            held.append(s)
        wait_until(lambda: srv.fd_count() >= 300 - 128 - 10, timeout=10, what="the API near its fd ceiling")
        res = srv.raw(request("GET", "/v1/auth/status", headers=""), timeout=5)
        assert res is not None and res[0] == 503, res
        assert srv.fd_count() <= 300 - 128 + 4
        _control_plane_accepts(srv)
        assert not srv.proc.events("http.accept_error")
    finally:
        for s in held:
            s.close()
        srv.stop()


# ------------------------------------------------------------------ point 9: store connections of finished threads

POOL_SIZE = 32  # portunus.store.db.POOL_SIZE: two fds (database, -wal) per pooled connection


def _burst(server, n: int) -> None:
    conns = []
    for _ in range(n):  # n live keep-alive connections: n request threads at once
        s = server.connect()
        s.sendall(f"GET /v1/clients HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n".encode())
        conns.append(s)
    for s in conns:
        assert read_response(s)[0] == 200
    for s in conns:
        s.close()


def test_fd_count_is_flat_after_bursts_of_connections(server):
    assert server.get_json("/v1/clients")[0] == 200
    baseline = server.fd_count()
    _burst(server, 60)
    wait_until(lambda: server.fd_count() <= baseline + 2 * POOL_SIZE, timeout=15, interval=0.2,
               what="fds bounded by the pool after 60 connections")
    _burst(server, 120)
    # a bigger burst may fill more of the pool (on a loaded machine more requests overlap), never beyond it
    wait_until(lambda: server.fd_count() <= baseline + 2 * POOL_SIZE, timeout=15, interval=0.2,
               what=f"fds bounded by the pool after 120 more connections (baseline {baseline})")


# ------------------------------------------------------------------ issue 7 point 7: per-instance address family

def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_api_on_ipv6_and_metrics_on_ipv4(tmp_path):
    srv = RunningServer(tmp_path / "data", operator_http_listen="[::1]:0", metrics_listen="127.0.0.1:0")
    try:
        assert srv.api.startswith("http://[::1]:")
        assert srv.get_json("/v1/auth/status")[0] == 200
        assert srv.metrics_url.startswith("http://127.0.0.1:")
        assert urllib.request.urlopen(srv.metrics_url, timeout=5).status == 200
    finally:
        srv.stop()
