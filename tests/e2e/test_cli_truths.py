"""Small truths of the server and client CLI, as an operator meets them: a missing data dir is said
so, endpoint errors name what is wrong, restore leaves the input alone, a dry-run prune reads beside a
running server, push-rule names the capabilities its flags need and binds --listen-host, rule-stats
names the client, absurdly nested JSON is a clear error, not a RecursionError, and a DNS failure
names the DNS server with its port."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from conftest import ROOT, free_port, portunus_cmd
from cp import Server, enroll_client, write_server_toml
from peers import TcpEchoServer
from test_server_cli import assert_cli_error, server_cli
from test_standalone_tcp import roundtrip

DEEP_JSON = "[" * 20000 + "]" * 20000  # far past the parser's recursion limit, within one argv string


@pytest.mark.parametrize("command", [
    ["list-clients"], ["list-rules"], ["enroll-client", "edge-01"], ["reenroll-client", "edge-01"],
    ["revoke", "edge-01"], ["push-rule", "edge-01", "8080", "127.0.0.1:80"], ["rule-stats", "R"],
    ["backup", "--out", "/tmp"], ["reset"], ["audit", "prune", "--before", "2026-01-01T00:00:00Z"],
    ["rotate-cert"],
])
def test_a_data_dir_that_does_not_exist_is_said_so(tmp_path, command):
    missing = tmp_path / "no-such-dir"
    res = server_cli(missing, *command, env={"PORTUNUS_OPERATOR_TOKEN": "t" * 43})
    assert_cli_error(res, 1, "io_error", f"data dir {missing} (--data-dir) does not exist")
    assert not missing.exists()


def test_a_data_dir_from_the_environment_that_does_not_exist_is_said_so(tmp_path):
    missing = tmp_path / "nope"
    res = subprocess.run(portunus_cmd("server") + ["list-clients"], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "PORTUNUS_DATA_DIR": str(missing),
                              "PORTUNUS_OPERATOR_TOKEN": "t" * 43, "PYTHONPATH": str(ROOT)})
    assert_cli_error(res, 1, "io_error", f"data dir {missing} ($PORTUNUS_DATA_DIR) does not exist")


@pytest.mark.parametrize("endpoint, words", [
    ("https://edge.example.net:7443", "has a scheme (https://)"),
    ("[2001:db8::1]:7443", "IPv6 literal"),
    ("2001:db8::1", "IPv6 literal"),
    ("edge.example.net:7443/enroll", "has a path ('/enroll')"),
    ("edge.example.net :7443", "contains whitespace"),
    ("edge.example.net", "missing port"),
])
def test_endpoint_invalid_names_what_is_wrong(tmp_path, endpoint, words):
    data = tmp_path / "server"
    write_server_toml(data)
    res = server_cli(data, "rotate-cert", "--advertised-endpoint", endpoint)
    assert_cli_error(res, 3, "endpoint_invalid", words)
    if "IPv6" not in words:
        assert "IPv6" not in res.stderr, res.stderr
    assert not (data / "server.crt").exists()  # refused before anything was written


def test_a_bad_seed_is_logged_once_with_one_set_of_fields(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    server = Server(procs, data, env={"PORTUNUS_ADVERTISED_ENDPOINT": "https://edge.example.net:7443"})
    events = server.proc.events("startup.advertised_endpoint_invalid")
    assert len(events) == 1, server.proc.log_text()
    assert events[0]["code"] == "endpoint_invalid" and events[0]["source"] == "seed"
    assert "has a scheme" in events[0]["reason"]


def test_restore_leaves_no_wal_or_shm_next_to_its_input(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    server = Server(procs, data)
    assert server.cli("enroll-client", "edge-01").returncode == 0
    backup = tmp_path / "backup.db"
    assert server.cli("backup", "--out", str(backup)).returncode == 0
    server.proc.signal(15)
    assert server.proc.wait(20) == 0
    target = tmp_path / "restored"
    res = server_cli(target, "restore", "--in", str(backup))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("backup.db")) == ["backup.db"]
    assert not [p.name for p in target.iterdir() if "restore-source" in p.name or p.name.endswith(".d")]


def test_audit_prune_dry_run_reads_while_serve_runs(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    server = Server(procs, data)
    assert server.cli("list-clients").returncode == 0  # one audit row at least
    res = server.cli("audit", "prune", "--before", "2999-01-01T00:00:00Z", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("would delete ") and int(res.stdout.split()[2]) >= 1, res.stdout
    res = server.cli("audit", "prune", "--before", "2999-01-01T00:00:00Z")
    assert_cli_error(res, 75, "store_in_use")


def test_push_rule_help_names_the_capabilities_its_flags_need():
    res = subprocess.run(portunus_cmd("server") + ["push-rule", "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for words in ("--sni PATTERN TLS SNI pattern (exact or *.domain) [needs sni]", "[udp needs udp]",
                  "[a range needs port_range]", "[more than one needs multi_target]", "[needs rate_limit]",
                  "all interfaces (0.0.0.0) unless --listen-host is given", "exit 3"):
        assert words in text, words


def test_listen_host_binds_one_address_is_listed_and_rule_stats_names_the_client(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    server = Server(procs, data)
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01")
    cid = json.loads(bundle.read_text())["client_id"]
    listen, target = free_port(), free_port()
    echo = TcpEchoServer([target])
    try:
        res = server.cli("push-rule", "edge-01", str(listen), f"127.0.0.1:{target}", "--listen-host", "127.0.0.1",
                         "--ack-timeout", "5")
        assert res.returncode == 0, res.stderr
        rule_id = res.stdout.strip()
        assert roundtrip(listen, b"bound to one address") == b"bound to one address"
        with pytest.raises(ConnectionRefusedError):  # another loopback address of the same host
            socket.create_connection(("127.0.0.2", listen), timeout=5).close()
        listing = server.cli("list-rules").stdout
        assert f"127.0.0.1:{listen}" in listing, listing
        assert json.loads(server.cli("list-rules", "--format", "json").stdout)[0]["listen_host"] == "127.0.0.1"
        stats = server.cli("rule-stats", rule_id)
        assert stats.returncode == 0, stats.stderr
        assert f"on client edge-01 ({cid})" in stats.stdout, stats.stdout
    finally:
        echo.close()


def test_deeply_nested_targets_json_is_a_usage_error(tmp_path):
    data = tmp_path / "server"
    data.mkdir()
    res = server_cli(data, "--server", f"http://127.0.0.1:{free_port()}", "push-rule", "edge-01", "8080",
                     "--targets-json", DEEP_JSON, env={"PORTUNUS_OPERATOR_TOKEN": "t" * 43})
    assert_cli_error(res, 2, "usage", "--targets-json is nested too deeply")


def test_deeply_nested_bundle_is_bundle_invalid(tmp_path):
    bundle = tmp_path / "client.bundle.json"
    bundle.write_text(DEEP_JSON)
    bundle.chmod(0o600)
    res = subprocess.run(portunus_cmd("client") + ["--bundle", str(bundle)], capture_output=True, text=True,
                         timeout=30)
    assert_cli_error(res, 1, "bundle_invalid", "nested too deeply", str(bundle))


def test_a_dns_failure_names_the_server_with_its_port(standalone, tmp_path):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    dns_port = s.getsockname()[1]
    s.close()  # nothing answers there: ICMP port unreachable
    listen = free_port()
    p = standalone(f"""
[global]
dns_servers = ["127.0.0.1:{dns_port}"]
[stats]
socket_path = "{tmp_path / 'stats.sock'}"
[[rule]]
name = "named"
listen_port = {listen}
target = "backend.test:{free_port()}"
""")
    c = socket.create_connection(("127.0.0.1", listen), timeout=10)
    try:
        c.recv(1)  # the connection is dropped when the name cannot be resolved
    except OSError:
        pass
    finally:
        c.close()
    ev = p.wait_event("rule.dns_failed", timeout=15)
    assert f"DNS server 127.0.0.1:{dns_port} unreachable" in ev["reason"], ev
