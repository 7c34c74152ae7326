"""bench/portbench: the configs and commands the runner derives, and how it judges a
product process's exit and splice announcement (pure parts, nothing started)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from portbench.origins import Backends  # noqa: E402
from portbench.paths import ClientPath, HaproxyPath, splice_problems  # noqa: E402
from portbench.procs import exit_problems  # noqa: E402
from portbench.product import portunus_commands, standalone_config  # noqa: E402

FRONTS = Backends(41001, 41002, 41003)
BACKENDS = Backends(42001, 42002, 42003)


def test_standalone_config_three_rules_on_loopback():
    text = standalone_config(FRONTS, BACKENDS, "127.0.0.1", 1, "info")
    assert text.count("[[rule]]") == 3
    assert text.count('listen_host = "127.0.0.1"') == 3
    assert 'listen_port = 41003\ntarget = "127.0.0.1:42003"\nudp_max_flows = 4096\n' in text
    assert "shutdown_drain_secs = 1\n" in text and 'log_level = "info"' in text
    assert "listen_host" not in standalone_config(FRONTS, BACKENDS, None, 1)


def test_haproxy_config_binds_loopback_and_splices_only_when_asked(tmp_path):
    plain = HaproxyPath(tmp_path, threads=1).config_text(FRONTS, BACKENDS)
    assert "    bind 127.0.0.1:41001\n" in plain and "    server s1 127.0.0.1:42002\n" in plain
    assert "    nbthread 1\n" in plain and "splice" not in plain
    spliced = HaproxyPath(tmp_path, threads=2, splice=True)
    assert spliced.name == "haproxy-splice"
    text = spliced.config_text(FRONTS, BACKENDS)
    assert "option splice-request" in text and "option splice-response" in text


def test_client_rules_mirror_the_standalone_rules():
    rules = ClientPath.rules(FRONTS, BACKENDS)
    assert [(r["listen_port"], r["target"], r["protocol"]) for r in rules] == [
        (41001, "127.0.0.1:42001", "tcp"), (41002, "127.0.0.1:42002", "tcp"),
        (41003, "127.0.0.1:42003", "udp")]
    assert {r["client"] for r in rules} == {"bench-edge"}
    assert {r["listen_host"] for r in rules} == {"127.0.0.1"}
    assert rules[2]["udp_max_flows"] == 4096


@pytest.mark.parametrize("argv, standalone, base", [
    (["/d/portunus"], ["/d/portunus", "standalone"], ["/d/portunus"]),
    (["python3", "-m", "portunus"], ["python3", "-m", "portunus", "standalone"],
     ["python3", "-m", "portunus"]),
    (["python3", "-m", "portunus", "standalone"], ["python3", "-m", "portunus", "standalone"],
     ["python3", "-m", "portunus"]),
])
def test_role_commands_from_a_base_command(argv, standalone, base):
    assert portunus_commands(argv) == (standalone, base, None)


def test_role_symlink_uses_its_target_and_a_plain_role_file_cannot_run_clients(tmp_path):
    zipapp = tmp_path / "portunus"
    zipapp.write_text("")
    link = tmp_path / "portunus-standalone"
    link.symlink_to(zipapp)
    assert portunus_commands([str(link)]) == ([str(zipapp), "standalone"], [str(zipapp)], None)
    copy = tmp_path / "sub" / "portunus-standalone"
    copy.parent.mkdir()
    copy.write_text("")
    standalone, base, why = portunus_commands([str(copy)])
    assert standalone == [str(copy)] and base is None
    assert "picks its role (standalone) from its name" in why
    server = tmp_path / "sub" / "portunus-server"
    server.write_text("")
    assert portunus_commands([str(server)])[:2] == (None, None)


def test_exit_after_sigterm_is_judged_per_process():
    assert exit_problems("process", True, 0) == []
    assert exit_problems("client", True, -signal.SIGTERM) == []
    assert exit_problems("process", True, 3) == ["exit code 3 after SIGTERM (expected 0)"]
    assert exit_problems("server", True, 3) == ["server exit code 3 after SIGTERM (expected 0)"]
    assert exit_problems("client", False, 1) == ["client had already exited (code 1) before SIGTERM"]


def test_splice_announcement_must_match_the_path():
    assert splice_problems(True, 2, True) == []
    assert splice_problems(False, 0, True) == []
    assert splice_problems(True, 0, False) == []        # no TCP test ran: nothing to announce
    assert splice_problems(True, 0, True) == [
        "proxy.splice_selected never logged: splice fast path apparently not taken"]
    assert splice_problems(False, 1, True, " by the client") == [
        "proxy.splice_selected logged by the client although PORTUNUS_DISABLE_SPLICE=1"]
