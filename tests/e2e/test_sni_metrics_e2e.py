"""SNI counters through a real client agent to the server's surfaces (SPEC §2.8, §8.1; issue 12
point 4): real TLS sites, connections by name, garbage, then /metrics rows, promtool, the rule
stats API and list-rules."""

from __future__ import annotations

import json
import re
import socket
import subprocess

from conftest import free_port, require_tool, wait_until
from cp import Server, enroll_client, wait_connected, write_server_toml
from rawpeer import api
from test_sni_routing import sites  # noqa: F401  (the fixture: four TLS sites with their own certs)
from tlssites import closed_without_answer, tls_ask
from quota_env import scrape


def sample(text: str, family: str, **labels) -> float | None:
    """The value of the one row of ``family`` whose labels include ``labels``."""
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(family)}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return None


def test_sni_route_counters_rise_on_metrics_and_in_rule_stats(procs, tmp_path, sites):  # noqa: F811
    data = tmp_path / "server"
    write_server_toml(data)
    server = Server(procs, data)
    enroll_client(server, procs, tmp_path, "edge-sni")
    wait_connected(server, "edge-sni")
    listen = free_port()

    def push(*args) -> str:
        res = server.cli("push-rule", "edge-sni", str(listen), *args)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()
    exact = push(f"127.0.0.1:{sites['exact'].port}", "--sni", "a.example.com")
    wild = push(f"127.0.0.1:{sites['wild'].port}", "--sni", "*.example.com")
    fallback = push(f"127.0.0.1:{sites['fallback'].port}")

    for _ in range(3):
        assert tls_ask(listen, "a.example.com", sites["exact"].cert) == b"exact:ping"
    assert tls_ask(listen, "q.example.com", sites["wild"].cert) == b"wild:ping"
    assert tls_ask(listen, "other.test", sites["fallback"].cert) == b"fallback:ping"
    garbage = socket.create_connection(("127.0.0.1", listen), timeout=10)
    garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed_without_answer(garbage)
    garbage.close()

    def reported():
        text = scrape(server)
        rows = (sample(text, "portunus_tls_sni_route_total", rule=exact, result="exact"),
                sample(text, "portunus_tls_sni_listener_parse_failures_total", client="edge-sni", port=listen))
        return text if rows == (3, 1) else None
    text = wait_until(reported, timeout=20, interval=0.3, what="SNI counters on /metrics")
    assert sample(text, "portunus_tls_sni_route_total", rule=wild, result="wildcard") == 1
    assert sample(text, "portunus_tls_sni_route_total", rule=fallback, result="fallback") == 1
    assert sample(text, "portunus_tls_sni_route_total", rule=exact, result="wildcard") == 0
    assert sample(text, "portunus_tls_sni_routes_active", client="edge-sni") == 2
    assert sample(text, "portunus_tls_sni_listener_miss_total", client="edge-sni", port=listen) == 0
    assert sample(text, "portunus_tls_client_hello_peek_duration_seconds_count", client="edge-sni",
                  port=listen) == 6
    assert sample(text, "portunus_tls_client_hello_peek_duration_seconds_bucket", client="edge-sni", port=listen,
                  le="+Inf") == 6
    assert len([ln for ln in text.splitlines()
                if ln.startswith("portunus_tls_sni_listener_miss_total{")]) == 1  # one row per (client, port)

    promtool = require_tool("promtool")
    res = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr

    status, stats = api(server, "GET", f"/v1/rules/{exact}/stats")
    assert status == 200 and stats["sni_pattern"] == "a.example.com"
    assert stats["sni_routes"] == {"exact": 3, "wildcard": 0, "fallback": 0}
    assert stats["sni_listener"]["listen_port"] == listen and stats["sni_listener"]["parse_failures"] == 1
    fb = api(server, "GET", f"/v1/rules/{fallback}/stats")[1]
    assert fb["sni_pattern"] is None and fb["sni_routes"]["fallback"] == 1

    lines = server.cli("list-rules", check=True).stdout.splitlines()
    start, end = lines[0].index("CAPS"), lines[0].index("OWNER")
    caps = {line.split()[0]: line[start:end].strip() for line in lines[1:]}
    assert caps == {exact: "sni=a.example.com", wild: "sni=*.example.com", fallback: "sni=fallback"}
    assert json.loads(server.cli("rule-stats", exact, "--format", "json", check=True).stdout)["sni_routes"]["exact"] == 3
    text_stats = server.cli("rule-stats", exact, check=True).stdout
    assert "  sni a.example.com: routed exact 3, wildcard 0, fallback 0" in text_stats
    assert f"  sni listener port {listen} (sni, 2 patterns, fallback yes): misses 0, parse failures 1" in text_stats

    # removing a rule removes its rows
    server.cli("remove-rule", wild, check=True)
    assert sample(scrape(server), "portunus_tls_sni_route_total", rule=wild, result="wildcard") is None
