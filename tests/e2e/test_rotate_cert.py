"""A real deployment, on loopback with a non-default endpoint host (127.0.0.2): README's
"A real deployment" block word for word, and the fix when the advertised endpoint came too
late (endpoint_not_in_cert_san names rotate-cert; rotate-cert refuses while serve runs,
then replaces the certificate, and every client is re-enrolled)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, free_port, free_port_block, wait_until
from peers import TcpEchoServer
from test_readme import section, sh_commands
from test_standalone_tcp import roundtrip

ENDPOINT_HOST = "127.0.0.2"  # loopback, but not in a fresh certificate's SAN (hostname, localhost, 127.0.0.1)
ROLES = ("server", "client", "standalone")


def role_commands_on_path(tmp_path: Path) -> dict:
    """An environment whose PATH has portunus-server/-client/-standalone: the build under test, else the source."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    binary = os.environ.get("PORTUNUS_BIN")
    for role in ROLES:
        path = bin_dir / f"portunus-{role}"
        if binary:
            path.symlink_to(binary)
        else:
            path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m portunus {role} "$@"\n')
            path.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PORTUNUS_") or k == "PORTUNUS_BIN"}
    home = tmp_path / "home"
    home.mkdir()
    env.update({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(home),
                "XDG_STATE_HOME": str(home / "state"), "XDG_CONFIG_HOME": str(home / "config"),
                "PYTHONPATH": str(ROOT), "PORTUNUS_ALLOW_ANY_FS": "1"})
    return env


def write_loopback_toml(data_dir: Path, control_port: int) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "server.toml").write_text(
        f'control_listen = "{ENDPOINT_HOST}:{control_port}"\n'
        f'operator_http_listen = "127.0.0.1:{free_port()}"\nmetrics_listen = "127.0.0.1:{free_port()}"\n'
        'stats_report_interval_secs = 1\n')


def test_readme_real_deployment_word_for_word(procs, tmp_path):
    commands = sh_commands(section((ROOT / "README.md").read_text(), "A real deployment"))
    env = role_commands_on_path(tmp_path)
    control_port = free_port()
    write_loopback_toml(Path(env["XDG_STATE_HOME"]) / "portunus", control_port)
    listen, target = free_port_block(3), free_port_block(3)
    echo = TcpEchoServer(range(target, target + 3))
    last_stdout, uri, ran = "", None, []

    def substitute(command: str) -> str:
        command = re.sub(r"\b[\w.-]+\.example\.net:7443\b", f"{ENDPOINT_HOST}:{control_port}", command)
        command = re.sub(r"\b10\.0\.0\.5:30000-30099\b", f"127.0.0.1:{target}-{target + 2}", command)
        command = re.sub(r"\b30000-30099\b", f"{listen}-{listen + 2}", command)
        if uri:
            command = command.replace("'portunus://…'", shlex.quote(uri))
        return command.replace("=…", "=" + last_stdout.strip())

    try:
        for command in map(substitute, commands):
            assert "…" not in command, f"no substitution for {command!r}"
            ran.append(command)
            if command.startswith("export "):
                key, _, value = command[len("export "):].partition("=")
                env[key] = value
            elif command.endswith("&") or command == "portunus-client":
                args = shlex.split(command.rstrip("& "))
                p = procs(args, env=env)
                p.wait_event("server.ready" if args[0] == "portunus-server" else "control.connected", timeout=30)
            else:
                res = subprocess.run(shlex.split(command), env=env, capture_output=True, text=True, timeout=60)
                assert res.returncode == 0, f"{command!r} exited {res.returncode}:\n{res.stderr}"
                last_stdout = res.stdout
                found = re.search(r"'(portunus://[^']+)'", res.stdout)
                uri = found.group(1) if found else uri
        assert any(c.startswith("portunus-server push-rule") for c in ran), ran
        assert uri and uri.startswith(f"portunus://{ENDPOINT_HOST}:{control_port}/"), uri
        for port in range(listen, listen + 3):
            assert roundtrip(port, b"through the README") == b"through the README"
    finally:
        echo.close()


def _cli(env, *args, timeout=60):
    return subprocess.run(["portunus-server", *args], env=env, capture_output=True, text=True, timeout=timeout)


def _serve(procs, env):
    p = procs(["portunus-server", "serve"], env=env)
    p.wait_event("server.ready", timeout=30)
    return p


def _stop(p):
    p.signal(signal.SIGTERM)
    assert p.wait(30) == 0


def _enroll_and_run(procs, env, tmp_path, name):
    res = _cli(env, "enroll-client", name)
    assert res.returncode == 0, res.stderr
    uri = res.stdout.split("'")[1]
    assert uri.startswith(f"portunus://{ENDPOINT_HOST}:"), uri
    bundle = tmp_path / f"{name}.bundle.json"
    out = subprocess.run(["portunus-client", "enroll", uri, "--out", str(bundle)], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    agent = procs(["portunus-client", "--bundle", str(bundle)], env=env)
    agent.wait_event("control.connected", timeout=30)
    return agent, bundle


def test_endpoint_set_after_the_first_serve_is_fixed_by_rotate_cert(procs, tmp_path):
    env = role_commands_on_path(tmp_path)
    data = Path(env["XDG_STATE_HOME"]) / "portunus"
    control_port = free_port()
    write_loopback_toml(data, control_port)
    env["PORTUNUS_OPERATOR_TOKEN"] = _cli(env, "bootstrap-superadmin", "--name", "ops").stdout.strip()
    _stop(_serve(procs, env))  # the first run made the certificate without the endpoint host

    env["PORTUNUS_ADVERTISED_ENDPOINT"] = f"{ENDPOINT_HOST}:{control_port}"
    server = _serve(procs, env)
    invalid = server.events("startup.advertised_endpoint_invalid")
    assert len(invalid) == 1 and invalid[0]["code"] == "endpoint_not_in_cert_san", server.log_text()
    res = _cli(env, "enroll-client", "edge-01")
    assert res.returncode == 3 and "error: endpoint_not_in_cert_san: " in res.stderr, res.stderr
    assert f"rotate-cert --san {ENDPOINT_HOST}" in res.stderr and "re-enroll" in res.stderr

    res = _cli(env, "rotate-cert")
    assert res.returncode == 75 and "error: store_in_use: " in res.stderr, res.stderr
    _stop(server)

    res = _cli(env, "rotate-cert", "--san", "edge-gw.example.net")
    assert res.returncode == 0, res.stderr
    fingerprint = re.search(r"fingerprint\s+sha256:([0-9a-f]{64})", res.stdout).group(1)
    san = re.search(r"SAN\s+(.+)", res.stdout).group(1).split(", ")
    assert {"localhost", "127.0.0.1", ENDPOINT_HOST, "edge-gw.example.net"} <= set(san), san
    assert "Every enrolled client" in res.stdout and "re-enroll" in res.stdout
    assert stat.S_IMODE((data / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "server.key.prev").stat().st_mode) == 0o600

    server = _serve(procs, env)
    assert server.wait_event("server.ready")["server_cert_sha256"] == fingerprint
    assert not server.events("startup.advertised_endpoint_invalid")
    agent, bundle = _enroll_and_run(procs, env, tmp_path, "edge-01")
    _stop(server)
    agent.signal(signal.SIGTERM)
    agent.wait(30)

    # rotating again changes the pin: the enrolled client is refused until it is re-enrolled
    res = _cli(env, "rotate-cert")
    assert res.returncode == 0, res.stderr
    assert "Clients to re-enroll: edge-01 (" in res.stdout, res.stdout
    server = _serve(procs, env)
    stale = procs(["portunus-client", "--bundle", str(bundle)], env=env)
    stale.wait_event("control.tls_pinned_mismatch", timeout=30)
    stale.kill()
    res = _cli(env, "reenroll-client", "edge-01")
    assert res.returncode == 0, res.stderr
    out = subprocess.run(["portunus-client", "enroll", res.stdout.split("'")[1], "--out", str(bundle)], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    again = procs(["portunus-client", "--bundle", str(bundle)], env=env)
    again.wait_event("control.connected", timeout=30)
    wait_until(lambda: json.loads(_cli(env, "list-clients", "--format", "json").stdout)[0]["connected"],
               timeout=10, what="edge-01 connected after re-enrollment")
