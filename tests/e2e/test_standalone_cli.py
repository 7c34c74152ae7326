"""The standalone CLI as an operator uses it (SPEC §7.4): --check, --help, --version, stats, exit codes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess

import pytest

from conftest import free_port, portunus_cmd, rule_stats, wait_until
from peers import UdpEchoServer


def run(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def check(path) -> subprocess.CompletedProcess:
    return run(portunus_cmd("standalone") + ["--check", "--config", str(path)])


RULE = """
[[rule]]
name = "{name}"
listen_port = {listen}
target = "127.0.0.1:{target}"
"""


def rule(name: str = "r", listen: int = 20001, target: int = 20002, extra: str = "") -> str:
    return RULE.format(name=name, listen=listen, target=target) + extra + "\n"


GOOD = """
[global]
label = "edge-1"
log_level = "info"
log_format = "json"
shutdown_drain_secs = 5
[defaults]
protocol = "tcp"
udp_max_flows = 1024
udp_flow_idle_secs = 60
prefer_ipv6 = false
[stats]
socket_path = "/tmp/portunus-check-only.sock"
refresh_ms = 500
[[rule]]
name = "web"
listen_port = 20001
target = "127.0.0.1:8000"
[[rule]]
name = "range"
listen_ports = "20010-20019"
target = "localhost:30010-30019"
[[rule]]
name = "dns"
protocol = "udp"
listen_port = 20001
targets = [{host = "127.0.0.1", port = 53}]
udp_max_flows = 100
udp_flow_idle_secs = 30
"""


def test_check_on_a_good_config_prints_ok_and_exits_0(tmp_path):
    cfg = tmp_path / "good.toml"
    cfg.write_text(GOOD)
    r = check(cfg)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
    assert r.stderr == ""


def _rule_raw(listen_line: str, target_line: str = 'target = "127.0.0.1:20002"', name: str = "r") -> str:
    return f'[[rule]]\nname = "{name}"\n{listen_line}\n{target_line}\n'


# (id, config text, substrings the one-line error must contain)
BAD_CONFIGS = [
    ("unknown_top_level_table", "[bogus]\nx = 1\n" + rule(), ["top level", "'bogus'"]),
    ("unknown_rule_field", rule(extra="colour = \"red\""), ["[[rule]] #1 ('r')", "'colour'"]),
    ("port_0", _rule_raw("listen_port = 0"), ["('r')", "listen port", "got 0"]),
    ("port_70000", _rule_raw("listen_port = 70000"), ["listen port", "got 70000"]),
    ("port_abc", _rule_raw('listen_port = "abc"'), ["listen port", "got 'abc'"]),
    ("target_port_0", _rule_raw("listen_port = 20001", 'target = "127.0.0.1:0"'), ["target port", "got 0"]),
    ("width_mismatch", _rule_raw('listen_ports = "20001-20004"', 'target = "127.0.0.1:30001-30003"'),
     ["20001-20004", "4 ports", "127.0.0.1:30001-30003", "3"]),
    ("range_to_single_port", _rule_raw('listen_ports = "20001-20004"', 'target = "127.0.0.1:30001"'),
     ["20001-20004", "30001-30004"]),
    ("toml_syntax_error", '[[rule]]\nname = "r"\nlisten_port = 20001\ntarget = "127.0.0.1:20002\n',
     ["TOML syntax error", "line 4"]),
    ("duplicate_rule_names", rule("same", 20001) + rule("same", 20003), ["[[rule]] #2", "duplicate rule name 'same'"]),
    ("two_rules_same_tcp_port", rule("a", 20001) + rule("b", 20001, 20005),
     ["tcp port 20001", "'a'", "'b'"]),
    ("nine_targets", _rule_raw("listen_port = 20001", "targets = [" + ", ".join(
        f'{{host = "127.0.0.1", port = {p}}}' for p in range(1, 10)) + "]"), ["at most 8 targets", "got 9"]),
    ("proxy_protocol_v3", _rule_raw("listen_port = 20001",
                                    'targets = [{host = "127.0.0.1", port = 1, proxy_protocol = "v3"}]'),
     ["proxy_protocol", "'v3'"]),
    ("proxy_protocol_on_udp", _rule_raw('listen_port = 20001\nprotocol = "udp"',
                                        'targets = [{host = "127.0.0.1", port = 1, proxy_protocol = "v1"}]'),
     ["proxy_protocol", "TCP rules only"]),
    ("udp_max_flows_0", rule(extra='protocol = "udp"\nudp_max_flows = 0'), ["udp_max_flows", "1..65535", "got 0"]),
    ("udp_max_flows_65536", rule(extra='protocol = "udp"\nudp_max_flows = 65536'),
     ["udp_max_flows", "1..65535", "got 65536"]),
    ("defaults_udp_max_flows_0", "[defaults]\nudp_max_flows = 0\n" + rule(),
     ["[defaults] udp_max_flows", "got 0"]),
    ("udp_flow_idle_secs_29", rule(extra='protocol = "udp"\nudp_flow_idle_secs = 29'),
     ["udp_flow_idle_secs", "30..300", "got 29"]),
    ("udp_flow_idle_secs_301", rule(extra='protocol = "udp"\nudp_flow_idle_secs = 301'),
     ["udp_flow_idle_secs", "30..300", "got 301"]),
    ("defaults_udp_flow_idle_secs_10", "[defaults]\nudp_flow_idle_secs = 10\n" + rule(),
     ["[defaults] udp_flow_idle_secs", "got 10"]),
    ("log_format_invalid", '[global]\nlog_format = "xml"\n' + rule(), ["[global] log_format", "'xml'", "json"]),
    ("no_listen_port", '[[rule]]\nname = "r"\ntarget = "127.0.0.1:1"\n', ["('r')", "listen_port", "listen_ports"]),
    ("no_rules", '[global]\nlabel = "x"\n', ["no rules"]),
]


@pytest.mark.parametrize("text,needles", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_check_refuses_a_bad_config_with_one_line_naming_the_problem(tmp_path, text, needles):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    r = check(cfg)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("error: config_invalid: "), line
    assert str(cfg) in line, "the error names the file"
    for needle in needles:
        assert needle in line, f"{needle!r} missing from: {line}"


def test_check_on_a_missing_file_exits_2_naming_it(tmp_path):
    missing = tmp_path / "nope" / "portunus.toml"
    r = check(missing)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: config_invalid: ")
    assert str(missing) in r.stderr and "no such file" in r.stderr


def test_help_and_version():
    r = run(portunus_cmd("standalone") + ["--help"])
    assert r.returncode == 0
    assert "--config" in r.stdout and "--check" in r.stdout
    cmd = portunus_cmd("standalone")[:-1]  # the bare `portunus`
    r = run(cmd + ["--version"])
    assert r.returncode == 0
    out = r.stdout.strip()
    assert out.startswith("portunus ") and any(ch.isdigit() for ch in out.split(" ", 1)[1]), out


def test_stats_once_prints_a_json_snapshot_of_a_running_instance(standalone, tmp_path):
    tcp_listen, udp_listen, udp_target = free_port(), free_port(), free_port()
    sock = str(tmp_path / "stats.sock")
    echo = UdpEchoServer([udp_target])
    p = standalone(f"""
[global]
label = "cli-test"
[stats]
socket_path = "{sock}"
[[rule]]
name = "web"
listen_port = {tcp_listen}
target = "127.0.0.1:{free_port()}"
[[rule]]
name = "dns"
protocol = "udp"
listen_port = {udp_listen}
target = "127.0.0.1:{udp_target}"
""")
    try:
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.settimeout(5)
        c.sendto(b"q", ("127.0.0.1", udp_listen))
        assert c.recv(100) == f"{udp_target}:q".encode()
        c.close()
        wait_until(lambda: rule_stats(sock, "dns")["datagrams_out"] == 1)

        r = run(portunus_cmd("standalone") + ["stats", "--once", "--config", str(p.config_path)])
        assert r.returncode == 0, r.stderr
        snap = json.loads(r.stdout)
        assert snap["label"] == "cli-test"
        rules = {row["rule_id"]: row for row in snap["rules"]}
        assert set(rules) == {"web", "dns"}
        assert rules["web"]["protocol"] == "tcp" and rules["dns"]["protocol"] == "udp"
        assert rules["dns"]["datagrams_in"] == rules["dns"]["datagrams_out"] == 1
        assert rules["dns"]["active_flows"] == 1
        assert all(row["state"] == "active" for row in rules.values())

        # --socket works without the config
        r = run(portunus_cmd("standalone") + ["stats", "--once", "--socket", sock, "--config", "/nonexistent"])
        assert r.returncode == 0, r.stderr
        assert {row["rule_id"] for row in json.loads(r.stdout)["rules"]} == {"web", "dns"}
    finally:
        echo.close()


def test_stats_once_without_a_running_instance_is_one_clear_error(tmp_path):
    cfg = tmp_path / "c.toml"
    sock = tmp_path / "nobody.sock"
    cfg.write_text(f'[stats]\nsocket_path = "{sock}"\n' + rule())
    r = run(portunus_cmd("standalone") + ["stats", "--once", "--config", str(cfg)])
    assert r.returncode == 1
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: io_error: ") and str(sock) in r.stderr


def test_udp_port_already_held_exits_5_naming_the_port(standalone, tmp_path):
    held = free_port()
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("0.0.0.0", held))
    try:
        p = standalone(f"""
[stats]
socket_path = "{tmp_path / 's.sock'}"
[[rule]]
name = "u"
protocol = "udp"
listen_port = {held}
target = "127.0.0.1:{free_port()}"
""", wait_ready=False)
        assert p.wait(20) == 5
        errors = [line for line in p.lines if line.startswith("error: ")]
        assert errors == [f"error: port_in_use: rule 'u': port_in_use (port {held} already bound)"], p.log_text()
        assert not any("Traceback" in line for line in p.lines)
        assert p.events("process.ready") == []
        assert not (tmp_path / "s.sock").exists(), "a failed start must not leave a stats socket behind"
    finally:
        holder.close()


@pytest.mark.parametrize("fmt", ["json", "compact", "pretty"])
def test_log_format_vocabulary_is_json_or_compact_with_pretty_as_alias(tmp_path, fmt):
    cfg = tmp_path / "fmt.toml"
    cfg.write_text(f'[global]\nlog_format = "{fmt}"\n' + rule())
    assert check(cfg).returncode == 0
    r = run(portunus_cmd("standalone") + ["--check", "--log-format", fmt, "--config", str(cfg)])
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_help_names_json_and_compact_log_formats():
    r = run(portunus_cmd("standalone") + ["--help"])
    assert "--log-format json|compact" in r.stdout
    assert "pretty is an alias of compact" in " ".join(r.stdout.split())


def test_compact_log_format_writes_text_lines(procs, tmp_path):
    cfg = tmp_path / "compact.toml"
    cfg.write_text('[global]\nlog_format = "json"\n' + rule(listen=free_port(), target=free_port()))
    p = procs(portunus_cmd("standalone") + ["--config", str(cfg), "--log-format", "compact"])
    wait_until(lambda: any(" INFO  process.ready " in line for line in p.lines), timeout=20,
               what="a compact process.ready line")
    assert p.events() == [], "compact lines are not JSON"
    p.signal(signal.SIGTERM)
    assert p.wait(20) == 0


def test_command_line_log_settings_survive_a_reload(procs, tmp_path):
    cfg = tmp_path / "reload.toml"
    cfg.write_text('[global]\nlog_format = "json"\n' + rule(listen=free_port(), target=free_port()))
    p = procs(portunus_cmd("standalone") + ["--config", str(cfg), "--log-format", "compact"])
    wait_until(lambda: any(" process.ready " in line for line in p.lines), timeout=20, what="process.ready")
    p.signal(signal.SIGHUP)
    wait_until(lambda: any(" config.reloaded " in line for line in p.lines), timeout=20,
               what="a compact config.reloaded line")
    assert p.events() == [], "the file's json must not replace --log-format compact on reload"
    p.signal(signal.SIGTERM)
    assert p.wait(20) == 0
