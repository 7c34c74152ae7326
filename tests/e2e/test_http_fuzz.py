"""A seeded fuzzer for the operator listener (issue 8 point 10, HTTP part).

Raw-socket requests with mutated request lines, headers, bodies and JSON. Asserts:
no 5xx, no traceback or handler error in the server log, the server still answers,
fds and threads back to their baseline. A few hundred cases by default;
``PORTUNUS_FUZZ_CASES=5000`` for more, ``PORTUNUS_FUZZ_SEED=N`` to replay a run.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import wait_until
from cp import OPERATOR_TOKEN
from test_http_hostile import POOL_SIZE, RunningServer

CASES = int(os.environ.get("PORTUNUS_FUZZ_CASES", "300"))
SEED = int(os.environ.get("PORTUNUS_FUZZ_SEED", "20261201"))
WORKERS = 8
ULID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT", "get", "Post", "FOO",
           "M-SEARCH", "G\x00T", "X" * 300]
PATHS = ["/v1/auth/status", "/v1/client-enrollments", "/v1/clients", "/v1/clients/{id}", "/v1/clients/{id}/name",
         "/v1/clients/{id}/enrollment", "/v1/clients/{id}/revoke", "/v1/rules", "/v1/rules/{id}",
         "/v1/rules/{id}/stats", "/v1/rules/{id}/stats/stream", "/v1/settings/advertised-endpoint", "/v1/audit",
         "/v1/metrics", "/v1/openapi.json", "/v1", "/v1/", "/", "*", "/v1/nothing", "/v1//clients", "/metrics",
         "/index.html", "/js/app.js", "/a%00.js", "/%2e%2e/%2e%2e/etc/passwd", "/.hidden", "/x/" + "y" * 300 + ".css"]
IDS = [ULID, "edge-fuzz", "{client}", "%00", "%ff%fe", "..", "%2e%2e%2f", "\x80\xff", "a" * 3000, "", "é", "%F0%9F%98%80",
       "-1", "0", "9" * 30, "%ud800", "null"]
QUERY_KEYS = ["limit", "cursor", "since", "until", "outcome", "per_port", "per_target", "client", "owner", "x"]
QUERY_VALUES = ["1", "0", "-1", "²", "%C2%B2", "%D9%A3", "1e3", "9223372036854775808", "9" * 40, "", "true", "allow",
                "deny", "2026-01-01T00:00:00Z", "2026-13-45T99:00:00", "%ff", "%", "a%2", "\x85", "null", "[]"]
FIELDS = ["name", "client_name", "address", "ttl_secs", "client", "protocol", "listen_port", "listen_port_end",
          "listen_host", "targets", "target", "rate_limit", "override", "ack_timeout_secs", "sni_pattern", "proxy_protocol",
          "health_check_interval_secs", "rule_id", "owner", "id", "features"]
STRINGS = ["edge-fuzz", "", "tcp", "udp", "127.0.0.1:80", "h:1@1", "[::1]:80", "localhost:5399", "\ud800", "a\udfffb",
           "\x00", "é" * 100, "x" * 5000, "../../etc/passwd", "%s%n", "${jndi:x}", "127.0.0.1:0", "host:99999"]


def _json_value(rng: random.Random, depth: int = 0):
    kind = rng.random()
    if depth > 3 or kind < 0.25:
        return rng.choice([0, 1, -1, 65535, 65536, 2 ** 31, 2 ** 63, -2 ** 63 - 1, 10 ** 40, 0.5, 1e308, -0.0,
                           True, False, None])
    if kind < 0.55:
        return rng.choice(STRINGS)
    if kind < 0.75:
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(FIELDS + STRINGS[:3]): _json_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def _body(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.55:
        obj = {rng.choice(FIELDS): _json_value(rng) for _ in range(rng.randrange(1, 6))}
        if rng.random() < 0.5:
            obj.setdefault("client", rng.choice(["edge-fuzz", ULID, ""]))
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
        return text.encode("utf-8", "surrogatepass")
    if kind < 0.65:
        return rng.choice([b"[", b"{"]) * rng.choice([10, 40, 1000, 100_000])
    if kind < 0.75:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind < 0.85:
        return rng.choice([b"NaN", b"Infinity", b'{"a":1,}', b'{"a"}', b"\"\\ud800\"", b"[1,2", b"{}{}",
                           b'{"name":"\xff"}', b"\xef\xbb\xbf{}", b"null", b"[]", b'"str"', b"1e999"])
    return b""


def _path(rng: random.Random, client_id: str) -> str:
    path = rng.choice(PATHS).replace("{id}", rng.choice(IDS)).replace("{client}", client_id)
    if rng.random() < 0.4:
        pairs = [f"{rng.choice(QUERY_KEYS)}={rng.choice(QUERY_VALUES)}" for _ in range(rng.randrange(1, 4))]
        path += "?" + "&".join(pairs)
    if rng.random() < 0.05:
        path = "http://127.0.0.1" + path
    return path


def _headers(rng: random.Random, body: bytes) -> list[bytes]:
    lines = [b"Host: " + rng.choice([b"127.0.0.1", b"localhost:7080", b"", b"[::1", b"\xff\xfe", b"a" * 300])]
    auth = rng.random()
    if auth < 0.8:
        lines.append(f"Authorization: Bearer {OPERATOR_TOKEN}".encode())
    elif auth < 0.9:
        lines.append(rng.choice([b"Authorization: Bearer", b"Authorization: Basic Zm9vOmJhcg==",
                                 b"Authorization: Bearer \xff\x00", b"Authorization: bearer " + b"x" * 5000]))
    length = rng.random()
    if length < 0.7:
        lines.append(f"Content-Length: {len(body)}".encode())
    elif length < 0.85:
        lines.append(b"Content-Length: " + rng.choice([b"abc", b"-1", b"0x10", b"1e3", b"5, 5", b"\xb2", b"",
                                                       str(len(body) + rng.randrange(1, 50)).encode(),
                                                       str(max(0, len(body) - 3)).encode(), b"99999999999"]))
    elif length < 0.9:
        lines += [f"Content-Length: {len(body)}".encode()] * 2
    elif length < 0.95:
        lines.append(b"Transfer-Encoding: chunked")
    extras = [b"Content-Type: application/json", b"Content-Type: text/plain", b"Content-Type: ", b"Expect: 100-continue",
              b"Connection: keep-alive", b"Connection: close", b"X-Request-Id: " + b"r" * 80, b"X-Request-Id: \xff",
              b"no-colon-here", b" folded continuation", b"X-Long: " + b"v" * 70_000, b"\x00: \x00",
              b"X-Many: " + b",".join([b"a"] * 100), b"Content-Type: application/json; charset=utf-16"]
    lines += rng.sample(extras, rng.randrange(0, 3))
    if rng.random() < 0.03:
        lines += [f"X-{i}: y".encode() for i in range(120)]
    return lines


# well-formed requests to every route, whose JSON values the fuzzer then varies: these reach the handlers
ROUTE_CALLS = [("GET", "/v1/clients"), ("GET", "/v1/clients/{client}"), ("PUT", "/v1/clients/{client}"),
               ("PATCH", "/v1/clients/{client}/name"), ("POST", "/v1/clients/{client}/enrollment"),
               ("POST", "/v1/client-enrollments"), ("POST", "/v1/rules"), ("GET", "/v1/rules"),
               ("GET", "/v1/rules/{id}"), ("DELETE", "/v1/rules/{id}"), ("GET", "/v1/rules/{id}/stats"),
               ("GET", "/v1/audit"), ("GET", "/v1/settings/advertised-endpoint"),
               ("PUT", "/v1/settings/advertised-endpoint"), ("GET", "/v1/metrics"), ("GET", "/v1/auth/status")]
RULE_TEMPLATE = {"client": "{client}", "protocol": "tcp", "listen_port": 20000, "targets": ["127.0.0.1:80"]}


def _well_formed(rng: random.Random, client_id: str) -> bytes:
    method, path = rng.choice(ROUTE_CALLS)
    path = path.replace("{client}", rng.choice([client_id, "edge-fuzz"])).replace("{id}", rng.choice(IDS[:3]))
    if method == "GET" and rng.random() < 0.5:
        path += "?" + "&".join(f"{rng.choice(QUERY_KEYS)}={rng.choice(QUERY_VALUES)}" for _ in range(2))
    body = b""
    if method in ("POST", "PUT", "PATCH"):
        obj = dict(RULE_TEMPLATE) if path == "/v1/rules" else {}
        for _ in range(rng.randrange(1, 4)):
            obj[rng.choice(FIELDS)] = _json_value(rng)
        obj = {k: (client_id if v == "{client}" else v) for k, v in obj.items()}
        body = json.dumps(obj).encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {OPERATOR_TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1", "replace") + body


def make_case(rng: random.Random, client_id: str) -> tuple[bytes, bool]:
    """(request bytes, whether to half-close after sending)."""
    if rng.random() < 0.35:
        return _well_formed(rng, client_id), True
    method = rng.choice(METHODS) if rng.random() < 0.4 else rng.choice(["GET", "POST", "PUT", "PATCH", "DELETE"])
    body = _body(rng) if method not in ("GET", "HEAD") or rng.random() < 0.1 else b""
    version = rng.choice(["HTTP/1.1"] * 8 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.x", "", "HTTP/1.1 extra", "http/1.1"])
    line = f"{method} {_path(rng, client_id)} {version}".rstrip().encode("latin-1", "replace")
    data = b"\r\n".join([line, *_headers(rng, body)]) + b"\r\n\r\n" + body
    if rng.random() < 0.08:  # byte-level mutations anywhere
        buf = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        data = bytes(buf)
    if rng.random() < 0.03:
        data = data[:rng.randrange(1, len(data))]  # cut short anywhere
    return data, rng.random() < 0.8


_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def statuses(buf: bytes) -> list[int]:
    """Status of every response in ``buf`` (framed by Content-Length), or what could be read."""
    found = []
    while buf:
        m = _STATUS.match(buf)
        if m is None:
            break
        found.append(int(m.group(1)))
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if not sep:
            break
        length = re.search(rb"\r\nContent-Length: (\d+)", head)
        if found[-1] == 100:
            buf = rest
            continue
        buf = rest[int(length.group(1)) if length else len(rest):]
    return found


def run_case(server: RunningServer, data: bytes, half_close: bool) -> list[int]:
    s = server.connect(timeout=15)
    try:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        buf = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return statuses(buf)
    finally:
        s.close()


@pytest.fixture
def server(tmp_path):
    srv = RunningServer(tmp_path / "data", limits="header_secs=2,body_secs=1")
    yield srv
    srv.stop()


def test_http_fuzz(server):
    res = server.raw(b"POST /v1/client-enrollments HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: "
                     b"Bearer " + OPERATOR_TOKEN.encode() + b"\r\nContent-Length: 20\r\n\r\n" +
                     b'{"name":"edge-fuzz"}')
    assert res is not None and res[0] == 201, res
    client_id = json.loads(res[2])["client"]["client_id"]
    baseline_fds, baseline_threads = server.fd_count(), server.thread_count()

    rng = random.Random(SEED)
    cases = [make_case(rng, client_id) for _ in range(CASES)]
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda case: run_case(server, *case), cases))

    bad = [(i, st, cases[i][0][:300]) for i, st in enumerate(results) if any(code >= 500 for code in st)]
    assert not bad, f"5xx answers (seed {SEED}): " + "\n".join(f"case {i}: {st} for {d!r}" for i, st, d in bad[:10])
    answered = sum(1 for st in results if st)
    assert answered >= CASES * 0.8, f"only {answered} of {CASES} requests got an answer"

    log = "\n".join(server.proc.lines)
    assert "Traceback" not in log
    for event in ("http.handler_error", "http.connection_error", "audit.write_failed"):
        assert not server.proc.events(event), server.proc.events(event)[:3]
    assert server.get_json("/v1/auth/status")[0] == 200
    assert server.get_json("/v1/clients")[0] == 200
    wait_until(lambda: server.thread_count() <= baseline_threads, timeout=15, interval=0.2,
               what="request threads to finish")
    wait_until(lambda: server.fd_count() <= baseline_fds + 2 * min(WORKERS + 1, POOL_SIZE), timeout=15,
               interval=0.2, what=f"fds back near the baseline {baseline_fds}")
