"""`portunus-server demo`: a newcomer's first command shows a working system and cleans up.

It must work however it is called: `portunus server demo`, the `portunus-server`
symlink, or that symlink found on PATH in another directory.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import urllib.request

from conftest import portunus_cmd
from demo_run import built_binary, kill_processes_mentioning, run_demo_to_ctrl_c


def test_demo_serves_the_sample_rule_and_cleans_up_on_ctrl_c():
    # the banner's token and API address are real: the rule it names is active
    seen = {}

    def check(text):
        api = re.search(r"Operator API\s+(\S+)", text).group(1)
        token = re.search(r"bearer token (\S+)", text).group(1)
        req = urllib.request.Request(api + "/v1/rules", headers={"Authorization": f"Bearer {token}"})
        seen["rules"] = urllib.request.urlopen(req, timeout=10).read()
    run_demo_to_ctrl_c(portunus_cmd("server") + ["demo"], on_running=check)
    assert b'"state":"active"' in seen["rules"]
    assert b'"listen_host":"127.0.0.1"' in seen["rules"]  # the demo never opens its backend to the network


def test_demo_ignores_a_real_servers_endpoint_and_stops_on_hang_up():
    # a shell set up for a real deployment: the loopback demo must not advertise that host
    env = {**os.environ, "PORTUNUS_ADVERTISED_ENDPOINT": "portunus.example.net:7443"}
    run_demo_to_ctrl_c(portunus_cmd("server") + ["demo"], env=env, stop_signal=signal.SIGHUP)


def test_demo_through_a_role_symlink_found_on_path(tmp_path):
    binary = built_binary()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "portunus-server").symlink_to(binary)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    text = run_demo_to_ctrl_c(["portunus-server", "demo"], cwd=elsewhere, env=env)
    # the hints name the program as the user typed it
    assert "\n  portunus-server list-clients\n" in text, text


def test_a_failing_child_prints_its_log_tail_and_keeps_the_temp_dir(tmp_path):
    # an unusable DNS server setting makes the demo's client exit at start
    env = {**os.environ, "PORTUNUS_DNS_SERVERS": "not-an-ip::x", "TMPDIR": str(tmp_path)}
    res = subprocess.run(portunus_cmd("server") + ["demo"], capture_output=True, text=True, env=env, timeout=90,
                         stdin=subprocess.DEVNULL)
    try:
        assert res.returncode == 1, res.stderr
        assert "the demo client did not connect (exit 2)" in res.stderr
        assert "validation.invalid_dns_server" in res.stderr  # the child's own error, from its log tail
        kept = re.search(r"the demo's temp dir is kept: (\S+)", res.stderr).group(1)
        assert os.path.isfile(os.path.join(kept, "demo.log"))
        assert "Traceback" not in res.stderr
    finally:
        kill_processes_mentioning(str(tmp_path))
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_role_symlink_accepts_the_role_said_again(tmp_path):
    # `portunus-server server …` is what re-running "this program" with the role added produces
    link = tmp_path / "portunus-server"
    link.symlink_to(built_binary())
    res = subprocess.run([str(link), "server", "--version"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stdout.startswith("portunus-server "), res.stderr
