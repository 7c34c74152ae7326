"""`portunus-server doctor` and `portunus-client doctor` against real conditions (issue 16).

Each check both ways: a healthy server and agent, then a stopped server, a wrong pin, a revoked token, a
listen port held inside the ephemeral range, a lowered RLIMIT_NOFILE, PORTUNUS_DISABLE_SPLICE=1, a
certificate without the endpoint's SAN, a loose key, a failed rule, an offline client and a tmpfs data dir.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import resource
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import IN_CI, ROOT, free_port, free_port_block, portunus_cmd
from cp import OPERATOR_TOKEN, Server, enroll_client, wait_connected, write_server_toml

TOKEN_ENV = {"PORTUNUS_OPERATOR_TOKEN": OPERATOR_TOKEN}


def run_doctor(role: str, args: list[str], env=None, preexec_fn=None, cwd=None, fmt="json"):
    full_env = {k: v for k, v in os.environ.items() if k not in ("PORTUNUS_ALLOW_ANY_FS", "PORTUNUS_DISABLE_SPLICE")}
    full_env.update(env or {})
    # run from another dir (so ./client.bundle.json is not picked up) while `python -m portunus` still imports
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    res = subprocess.run(portunus_cmd(role) + args + ["doctor", "--format", fmt] if role == "server" else
                         portunus_cmd(role) + ["doctor", *args, "--format", fmt],
                         capture_output=True, text=True, env=full_env, timeout=60, preexec_fn=preexec_fn, cwd=cwd)
    assert res.returncode in (0, 1) and res.stdout, res.stderr
    if fmt != "json":
        return res.returncode, res.stdout
    return res.returncode, {c["id"]: c for c in json.loads(res.stdout)}


def server_doctor(server_or_dir, env=None, **kw):
    data_dir = server_or_dir.data_dir if isinstance(server_or_dir, Server) else server_or_dir
    return run_doctor("server", ["--data-dir", str(data_dir)], env={**TOKEN_ENV, **(env or {})}, **kw)


def client_doctor(bundle, tmp_path, env=None, **kw):
    return run_doctor("client", ["--bundle", str(bundle)], env=env, cwd=str(tmp_path), **kw)


def statuses(checks: dict, status: str) -> list[str]:
    return [cid for cid, c in checks.items() if c["status"] == status]


@pytest.fixture
def server(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    os.chmod(data, 0o700)
    return Server(procs, data)


def stop(proc) -> None:
    proc.signal(signal.SIGTERM)
    proc.wait(30)


# ------------------------------------------------------------------ healthy, both roles

def test_healthy_server_and_agent_pass_and_nothing_disturbs_the_session(server, procs, tmp_path):
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    port = free_port()
    assert server.cli("push-rule", "edge-01", str(port), "127.0.0.1:9").returncode == 0

    code, checks = server_doctor(server)
    assert code == 0, statuses(checks, "fail")
    assert checks["store.lock"]["status"] == "ok" and checks["store.lock"]["details"]["pid"] == server.proc.p.pid
    assert checks["store.integrity"]["summary"] == "PRAGMA quick_check: ok"  # read-only while serve writes
    assert checks["server.api"]["status"] == "ok"
    assert checks["clients.offline"]["details"]["connected"] == 1
    assert checks["rules.failed"]["status"] == "ok"
    assert checks["cert.endpoint_san"]["status"] == "warn"  # no seed: bundles point at 127.0.0.1
    assert checks["limits.nofile"]["details"]["limit_source"] == f"running serve pid {server.proc.p.pid}"
    assert checks["limits.nofile"]["details"]["need_breakdown"]["client_sessions"] == 1
    assert checks["ports.privileged"]["status"] == "ok"

    code, checks = client_doctor(bundle, tmp_path)
    assert code == 0, statuses(checks, "fail")
    assert checks["tls.pin"]["status"] == "ok"
    # the agent's own connection answers the token check: no hello, so its session is not replaced
    assert checks["auth.token"]["details"]["agent_pid"] == agent.p.pid
    assert checks["limits.nofile"]["details"]["limit_source"] == f"running agent pid {agent.p.pid}"
    assert checks["limits.nofile"]["details"]["need_breakdown"]["listen_sockets"] == 1
    assert checks["splice.env"]["status"] == "ok"
    assert not server.proc.events("control.server_error") and not agent.events("control.server_error")
    assert len(server.proc.events("client.connected")) == 1

    code, text = client_doctor(bundle, tmp_path, fmt="text")
    assert code == 0 and "✓ the server's leaf certificate matches the pin" in text and "\x1b[" not in text
    assert json.loads(bundle.read_text())["token"] not in text


def test_disable_splice_env_is_reported_without_failing(server, procs, tmp_path):
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01", env={"PORTUNUS_DISABLE_SPLICE": "1"})
    code, checks = client_doctor(bundle, tmp_path)  # read from the running agent's environment
    assert code == 0, statuses(checks, "fail")
    assert checks["splice.env"]["status"] == "warn" and "userspace" in checks["splice.env"]["summary"]
    assert checks["splice.env"]["details"]["environment_of"] == f"the agent (pid {agent.p.pid})"
    stop(agent)
    code, checks = client_doctor(bundle, tmp_path)  # no agent: this shell's environment decides
    assert code == 0 and checks["splice.env"]["status"] == "ok"
    code, checks = client_doctor(bundle, tmp_path, env={"PORTUNUS_DISABLE_SPLICE": "1"})
    assert code == 0 and checks["splice.env"]["status"] == "warn"


# ------------------------------------------------------------------ the client cannot connect

def test_stopped_server(server, procs, tmp_path):
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01")
    stop(agent)
    stop(server.proc)
    code, checks = server_doctor(server)
    assert code == 0, statuses(checks, "fail")
    assert checks["store.lock"]["status"] == "warn" and "not running" in checks["store.lock"]["summary"]
    assert checks["server.api"]["status"] == "skip"
    code, checks = client_doctor(bundle, tmp_path)
    assert code == 1
    assert checks["endpoint.tcp"]["status"] == "fail" and "ECONNREFUSED" in checks["endpoint.tcp"]["summary"]
    assert "control_listen" in checks["endpoint.tcp"]["fix"]
    assert checks["tls.pin"]["status"] == "skip"


def test_wrong_pin_fails_and_the_token_is_never_sent(server, procs, tmp_path):
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01")
    stop(agent)
    data = json.loads(bundle.read_text())
    data["server_cert_sha256"] = "0" * 64
    wrong = tmp_path / "wrong.bundle.json"
    wrong.write_text(json.dumps(data))
    os.chmod(wrong, 0o600)
    connected_before = len(server.proc.events("client.connected"))
    code, checks = client_doctor(wrong, tmp_path)
    assert code == 1
    pin = checks["tls.pin"]
    assert pin["status"] == "fail" and "control.tls_pinned_mismatch" in pin["summary"]
    assert pin["details"] == {"expected": "0" * 64, "got": server.info["server_cert_sha256"]}
    assert "enroll" in pin["fix"]
    assert checks["auth.token"]["status"] == "skip"
    assert len(server.proc.events("client.connected")) == connected_before
    assert not server.proc.events("auth.failure")


def test_revoked_token(server, procs, tmp_path):
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01")
    assert server.cli("revoke", "edge-01").returncode == 0
    agent.wait(30)  # the agent exits on token_revoked
    code, checks = client_doctor(bundle, tmp_path)
    assert code == 1
    token = checks["auth.token"]
    assert token["status"] == "fail" and token["details"]["code"] == "token_revoked"
    assert "re-enrollment" in token["fix"]
    assert checks["tls.pin"]["status"] == "ok"


def test_another_clients_agent_on_the_host_does_not_vouch_for_a_revoked_bundle(server, procs, tmp_path):
    """edge-a's agent runs on this host; edge-b's bundle is revoked: the doctor must judge edge-b's token
    itself (a connection of another client says nothing about it)."""
    enroll_client(server, procs, tmp_path, "edge-a")
    b_agent, b_bundle = enroll_client(server, procs, tmp_path, "edge-b")
    assert server.cli("revoke", "edge-b").returncode == 0
    b_agent.wait(30)
    code, checks = client_doctor(b_bundle, tmp_path)
    assert code == 1
    assert checks["auth.token"]["status"] == "fail" and checks["auth.token"]["details"]["code"] == "token_revoked"


def test_token_accepted_without_an_agent_replays_the_rules(server, procs, tmp_path):
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01")
    port = free_port()
    assert server.cli("push-rule", "edge-01", str(port), "127.0.0.1:9").returncode == 0
    stop(agent)
    wait_connected(server, "edge-01", connected=False)
    code, checks = client_doctor(bundle, tmp_path)
    assert code == 0, statuses(checks, "fail")
    assert checks["auth.token"]["status"] == "ok" and "1 rule(s) replayed" in checks["auth.token"]["summary"]
    assert checks["ports.free"]["status"] == "ok"


# ------------------------------------------------------------------ what the rules need of the host

def _free_ephemeral_port() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        lo, hi = (int(x) for x in f.read().split())
    for _ in range(200):
        port = random.randrange(lo, hi)
        s = socket.socket()
        try:
            s.bind(("0.0.0.0", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port in the ephemeral range")


def test_listen_port_held_inside_the_ephemeral_range(server, procs, tmp_path):
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01")
    port = _free_ephemeral_port()
    assert server.cli("push-rule", "edge-01", str(port), "127.0.0.1:9").returncode == 0
    stop(agent)
    listener = socket.create_server(("127.0.0.1", 0))
    outgoing = socket.socket()
    try:
        outgoing.bind(("127.0.0.1", port))  # an outgoing connection that took the rule's port
        outgoing.connect(listener.getsockname())
        code, checks = client_doctor(bundle, tmp_path)
    finally:
        outgoing.close()
        listener.close()
    assert code == 1
    assert checks["ports.ephemeral"]["status"] == "warn" and str(port) in checks["ports.ephemeral"]["summary"]
    held = checks["ports.free"]
    assert held["status"] == "fail" and held["details"]["held"] == {str(port): "tcp ESTABLISHED"}
    assert "port_in_use" in held["summary"]


def test_nofile_lowered_below_a_range_rules_need(server, procs, tmp_path):
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01")
    listen, target = free_port_block(200), free_port_block(200)
    res = server.cli("push-rule", "edge-01", f"{listen}-{listen + 199}", f"127.0.0.1:{target}-{target + 199}")
    assert res.returncode == 0, res.stderr
    stop(agent)

    def low_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (150, 150))
    code, checks = client_doctor(bundle, tmp_path, preexec_fn=low_nofile)
    assert code == 1
    nofile = checks["limits.nofile"]
    assert nofile["status"] == "fail" and nofile["details"]["limit"] == 150
    assert nofile["details"]["estimated_need"] >= 200 and "LimitNOFILE" in nofile["fix"]
    assert any(k.endswith(f"(tcp {listen}-{listen + 199})") and v == 200
               for k, v in nofile["details"]["need_breakdown"].items())


# ------------------------------------------------------------------ server: rules, clients, certificate

def test_failed_rule_and_offline_client(server, procs, tmp_path):
    agent, _bundle = enroll_client(server, procs, tmp_path, "edge-01")
    holder = socket.create_server(("0.0.0.0", free_port()))
    try:
        port = holder.getsockname()[1]
        res = server.cli("push-rule", "edge-01", str(port), "127.0.0.1:9")
        assert res.returncode == 5, res.stderr
        stop(agent)
        wait_connected(server, "edge-01", connected=False)
        code, checks = server_doctor(server)
    finally:
        holder.close()
    assert code == 1
    failed = checks["rules.failed"]
    assert failed["status"] == "fail" and "remove-rule" in failed["fix"]
    assert any(f"tcp {port}" in v for v in failed["details"]["failed"].values())
    offline = checks["clients.offline"]
    assert offline["status"] == "warn" and "last connected" in offline["details"]["offline"]["edge-01"]


def _write_cert(data_dir, sans: list[str], key_mode=0o600) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
            .sign(key, hashes.SHA256()))
    (data_dir / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (data_dir / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    os.chmod(data_dir / "server.key", key_mode)


def test_certificate_without_the_endpoints_san(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    _write_cert(data, ["other.example"])
    seed = {"PORTUNUS_ADVERTISED_ENDPOINT": "proxy.example.com:7443"}
    server = Server(procs, data, env=seed)
    code, checks = server_doctor(server)
    assert code == 1
    san = checks["cert.endpoint_san"]
    assert san["status"] == "fail" and "not covered" in san["details"]["diagnostic"]
    assert san["details"]["cert_sans"] == ["other.example"]
    stop(server.proc)
    code, checks = server_doctor(data, env=seed)  # offline, the same tiers from the seed
    assert checks["cert.endpoint_san"]["status"] == "fail"
    code, checks = server_doctor(data, env={"PORTUNUS_ADVERTISED_ENDPOINT": "proxy.other.example:7443"})
    assert checks["cert.endpoint_san"]["status"] == "fail"


def test_certificate_covering_the_seed_and_a_loose_key(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    _write_cert(data, ["proxy.example.com"], key_mode=0o644)
    code, checks = server_doctor(data, env={"PORTUNUS_ADVERTISED_ENDPOINT": "proxy.example.com:7443"})
    assert code == 1
    assert checks["cert.key_mode"]["status"] == "fail" and checks["cert.key_mode"]["fix"].startswith("chmod 600")
    assert checks["cert.endpoint_san"]["status"] == "ok"
    os.chmod(data / "server.key", 0o600)
    code, checks = server_doctor(data, env={"PORTUNUS_ADVERTISED_ENDPOINT": "proxy.example.com:7443"})
    assert checks["cert.key_mode"]["status"] == "ok" and checks["cert.expiry"]["status"] == "ok"


# ------------------------------------------------------------------ the data dir

@pytest.fixture
def tmpfs_dir(tmp_path):
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                         capture_output=True, text=True) if os.geteuid() == 0 else None
    if res is not None and res.returncode == 0:
        yield mount_point
        subprocess.run(["umount", str(mount_point)], capture_output=True)
        return
    if os.path.isdir("/dev/shm") and subprocess.run(["stat", "-f", "-c", "%T", "/dev/shm"], capture_output=True,
                                                    text=True).stdout.strip() == "tmpfs":
        with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
            yield d
        return
    if IN_CI:
        pytest.fail("CI must be able to mount a tmpfs")
    pytest.skip("cannot mount a tmpfs here and /dev/shm is not one")


def test_tmpfs_data_dir(tmpfs_dir):
    data = os.path.join(str(tmpfs_dir), "data")
    write_server_toml(Path(data))
    code, checks = server_doctor(data)
    assert code == 1
    fs = checks["datadir.filesystem"]
    assert fs["status"] == "fail" and fs["details"]["filesystem"] == "tmpfs"
    assert "startup.unsupported_filesystem" in fs["summary"] and "local" in fs["fix"]
    # serve really refuses it, with the same code
    res = subprocess.run(portunus_cmd("server") + ["--data-dir", data, "serve"], capture_output=True, text=True,
                         timeout=30, env={k: v for k, v in os.environ.items() if k != "PORTUNUS_ALLOW_ANY_FS"})
    assert res.returncode == 1 and "unsupported_filesystem" in res.stderr
