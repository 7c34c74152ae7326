"""The server CLI as an operator meets it: enrollment edge cases, re-enrollment, the client's bundle
lookup chain, backup/restore/reset, offline commands and the store lock, operator auth, text and
JSON output, the stats SSE stream, and server.toml strictness (SPEC §3.2, §4.1, §4.2, §6, §7).

Everything runs real processes on 127.0.0.1 in tmp dirs and is judged by exit codes, stderr lines
(`error: <code>: <message>`), files and real bytes.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import ROOT, free_port, free_port_block, portunus_cmd, wait_until
from cp import OPERATOR_TOKEN, Server, enroll_client, wait_connected, write_server_toml
from peers import TcpEchoServer
from test_standalone_tcp import roundtrip

BASE_ENV = {"PORTUNUS_ALLOW_ANY_FS": "1"}
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")
RULE_KEYS = {"rule_id", "client_id", "client_name", "owner", "protocol", "listen_port", "listen_port_end", "targets",
             "prefer_ipv6", "sni_pattern", "rate_limit", "health_check_interval_secs", "state", "reason",
             "created_at"}
TARGET_KEYS = {"host", "port", "priority", "proxy_protocol"}
CLIENT_KEYS = {"client_id", "client_name", "connected", "remote_addr", "connected_at", "address", "revoked",
               "client_version", "capabilities"}
STATS_KEYS = {"rule_id", "client", "protocol", "bytes_in", "bytes_out", "active_connections", "dns_failures",
              "datagrams_in", "datagrams_out", "active_flows", "flows_dropped_overflow", "target_failovers_total",
              "updated_at"}
PER_PORT_KEYS = {"listen_port", "bytes_in", "bytes_out", "active_connections", "datagrams_in", "datagrams_out"}


# ------------------------------------------------------------------ helpers

def _env(extra=None, drop=()) -> dict:
    env = dict(os.environ)
    for k in drop:
        env.pop(k, None)
    env.update(BASE_ENV)
    env.update(extra or {})
    return env


def server_cli(data_dir: Path, *args, env=None, timeout=30) -> subprocess.CompletedProcess:
    """portunus-server with no Server object: offline commands, or a server found some other way."""
    return subprocess.run(portunus_cmd("server") + ["--data-dir", str(data_dir), *args], capture_output=True,
                          text=True, env=_env(env, drop=("PORTUNUS_SERVER", "PORTUNUS_OPERATOR_TOKEN")),
                          timeout=timeout)


def client_enroll(uri: str, out: Path, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run(portunus_cmd("client") + ["enroll", uri, "--out", str(out)], capture_output=True,
                          text=True, env=_env(), timeout=timeout)


def uri_of(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, res.stderr
    command = res.stdout.strip()
    assert command.startswith("portunus-client enroll 'portunus://"), command
    return command.split("'")[1]


def start_agent(procs, bundle: Path, env=None, cwd=None):
    return procs(portunus_cmd("client") + ["--bundle", str(bundle), "--reconnect-initial-delay-ms", "100",
                                           "--reconnect-max-delay-secs", "1", "--shutdown-drain-timeout-secs", "1"],
                 env=env, cwd=cwd)


def stop(proc, timeout=20) -> int:
    proc.signal(signal.SIGTERM)
    return proc.wait(timeout)


def assert_cli_error(res: subprocess.CompletedProcess, exit_code: int, code: str, *words: str) -> None:
    assert res.returncode == exit_code, f"exit {res.returncode}, wanted {exit_code}:\n{res.stderr}"
    assert f"error: {code}: " in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in res.stderr, f"{w!r} not in: {res.stderr}"


def clients_in_db(db: Path) -> list[str]:
    conn = sqlite3.connect(db)  # read-write: closing it removes the -wal/-shm a read-only reader would leave
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return sorted(r[0] for r in conn.execute("SELECT client_name FROM clients"))
    finally:
        conn.close()


@pytest.fixture
def server(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    return Server(procs, data)


# ------------------------------------------------------------------ 1. enrollment edge cases

def test_enrollment_offline_then_served_used_superseded_expired_malformed(procs, tmp_path):
    data = tmp_path / "server"
    control = free_port()
    write_server_toml(data, control_listen=f"127.0.0.1:{control}")

    # no server: enroll-client works offline and writes the control endpoint into the URI
    res = server_cli(data, "enroll-client", "edge-off")
    uri_off = uri_of(res)
    assert uri_off.startswith(f"portunus://127.0.0.1:{control}/enroll?pin=sha256:")
    assert_cli_error(server_cli(data, "enroll-client", "too-long", "--ttl-secs", "90000"), 2, "validation.invalid_ttl",
                     "86400")

    server = Server(procs, data)
    assert server.control_port == control

    # the offline code redeems against the running server
    b1 = tmp_path / "b1.json"
    res = client_enroll(uri_off, b1)
    assert res.returncode == 0, res.stderr
    cid = json.loads(b1.read_text())["client_id"]

    # a used code fails clearly and writes nothing
    again = tmp_path / "again.json"
    res = client_enroll(uri_off, again)
    assert res.returncode != 0
    assert "error: enrollment_invalid: " in res.stderr and "already used" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not again.exists()

    # through the running server: a 1-second code (checked at the end) and a refused 25 h code
    uri_short = uri_of(server.cli("enroll-client", "edge-short", "--ttl-secs", "1"))
    short_created = time.monotonic()
    assert_cli_error(server.cli("enroll-client", "edge-long", "--ttl-secs", "90000"), 2, "validation.invalid_ttl",
                     "86400")
    names = [c["client_name"] for c in json.loads(server.cli("list-clients", "--format", "json").stdout)]
    assert sorted(names) == ["edge-off", "edge-short"]  # neither refused enrollment created a client

    # malformed URIs: a validation error, never a traceback
    pin = uri_off.split("pin=")[1].split("&")[0]
    for bad in (f"portunus://127.0.0.1/enroll?pin={pin}&code=abc",
                f"https://127.0.0.1:{control}/enroll?pin={pin}&code=abc",
                f"portunus://127.0.0.1:{control}/enroll?pin=sha256:1234&code=abc",
                f"portunus://127.0.0.1:{control}/enroll?pin={pin}",
                "not a uri at all"):
        res = client_enroll(bad, tmp_path / "bad.json")
        assert res.returncode != 0, bad
        assert "error: validation.enrollment_uri_invalid: " in res.stderr, (bad, res.stderr)
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "bad.json").exists()

    # a newer code supersedes the older one; the client keeps its id; the old token dies on redeem
    old_agent = start_agent(procs, b1)
    old_agent.wait_event("control.connected", timeout=20)
    uri2 = uri_of(server.cli("reenroll-client", "edge-off"))
    uri3 = uri_of(server.cli("reenroll-client", cid))
    res = client_enroll(uri2, tmp_path / "b2.json")
    assert res.returncode != 0
    assert "error: enrollment_invalid: " in res.stderr and "newer code" in res.stderr, res.stderr
    b3 = tmp_path / "b3.json"
    res = client_enroll(uri3, b3)
    assert res.returncode == 0, res.stderr
    assert json.loads(b3.read_text())["client_id"] == cid
    assert json.loads(b3.read_text())["token"] != json.loads(b1.read_text())["token"]

    stop(old_agent)
    restarted = start_agent(procs, b1)
    assert restarted.wait(20) != 0
    ev = restarted.events("auth.failure")
    assert ev and ev[0]["reason"] == "token_revoked", restarted.log_text()
    new_agent = start_agent(procs, b3)
    new_agent.wait_event("control.connected", timeout=20)
    c = wait_connected(server, "edge-off")
    assert c["client_id"] == cid
    assert [x["client_id"] for x in json.loads(server.cli("list-clients", "--format", "json").stdout)
            if x["client_name"] == "edge-off"] == [cid]

    # the 1-second code is expired by now
    time.sleep(max(0.0, short_created + 2 - time.monotonic()))
    res = client_enroll(uri_short, tmp_path / "short.json")
    assert res.returncode != 0
    assert "error: enrollment_invalid: " in res.stderr and "expired" in res.stderr, res.stderr
    assert not (tmp_path / "short.json").exists()


# ------------------------------------------------------------------ 2. re-enrollment keeps id and rules

def test_reenroll_keeps_client_id_and_rules(server, procs, tmp_path):
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01")
    cid = json.loads(bundle.read_text())["client_id"]
    listen, target = free_port(), free_port()
    echo = TcpEchoServer([target])
    try:
        res = server.cli("push-rule", "edge-01", str(listen), f"127.0.0.1:{target}", "--ack-timeout", "3")
        assert res.returncode == 0, res.stderr
        rule_id = res.stdout.strip()
        payload = os.urandom(64 << 10)
        assert roundtrip(listen, payload) == payload

        uri = uri_of(server.cli("reenroll-client", "edge-01"))
        new_bundle = tmp_path / "new.bundle.json"
        res = client_enroll(uri, new_bundle)
        assert res.returncode == 0, res.stderr
        assert json.loads(new_bundle.read_text())["client_id"] == cid

        assert stop(agent) == 0
        agent2 = start_agent(procs, new_bundle)
        agent2.wait_event("rule.activated", timeout=20, pred=lambda e: e.get("rule") == rule_id)

        def active():
            rules = json.loads(server.cli("list-rules", "--format", "json").stdout)
            return rules if [(r["rule_id"], r["client_id"], r["state"]) for r in rules] == \
                [(rule_id, cid, "active")] else None
        wait_until(active, timeout=10, interval=0.2, what="rule active again after re-enrollment")
        assert roundtrip(listen, payload) == payload
        clients = json.loads(server.cli("list-clients", "--format", "json").stdout)
        assert [(c["client_id"], c["connected"]) for c in clients] == [(cid, True)]
    finally:
        echo.close()


# ------------------------------------------------------------------ 3. bundle lookup chain

def _fake_bundle(path: Path, port: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "client_id": "01HZZZZZZZZZZZZZZZZZZZZZZZ", "client_name": path.parent.name,
                                "server_endpoint": f"127.0.0.1:{port}", "server_cert_sha256": "ab" * 32,
                                "token": "not-a-real-token"}))
    os.chmod(path, 0o600)
    return path


def test_client_bundle_lookup_chain(procs, tmp_path):
    home, xdg, cwd = tmp_path / "home", tmp_path / "xdg", tmp_path / "cwd"
    for d in (home, xdg, cwd):
        d.mkdir()
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(xdg)}
    if not os.environ.get("PORTUNUS_BIN"):  # `python -m portunus` from another cwd needs the source tree
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    xdg_path = xdg / "portunus" / "client.bundle.json"
    home_path = home / ".config" / "portunus" / "client.bundle.json"
    explicit = tmp_path / "explicit" / "client.bundle.json"

    def run_bare(extra_env):
        return subprocess.run(portunus_cmd("client"), capture_output=True, text=True, cwd=cwd, timeout=30,
                              env=_env({**env, **extra_env}, drop=("PORTUNUS_CLIENT_BUNDLE",)))

    # nothing anywhere: exit 1, every path named
    res = run_bare({"PORTUNUS_CLIENT_BUNDLE": str(explicit)})
    assert_cli_error(res, 1, "bundle_not_found", str(explicit), str(xdg_path), str(home_path), "client.bundle.json")
    res = run_bare({})
    assert_cli_error(res, 1, "bundle_not_found", str(xdg_path), str(home_path), "./client.bundle.json")

    ports = {}

    def uses(path: Path, extra_env=None):
        p = procs(portunus_cmd("client") + ["--reconnect-initial-delay-ms", "100"], cwd=cwd,
                  env=_env({**env, **(extra_env or {})}, drop=("PORTUNUS_CLIENT_BUNDLE",)))
        try:
            start = p.wait_event("process.start", timeout=20)
            connecting = p.wait_event("control.connecting", timeout=20)
        finally:
            p.kill()
        assert os.path.realpath(os.path.join(cwd, start["bundle"])) == os.path.realpath(path), start
        assert connecting["server"] == f"127.0.0.1:{ports[path]}", connecting

    for path in (explicit, xdg_path, home_path, cwd / "client.bundle.json"):
        ports[path] = free_port()
        _fake_bundle(path, ports[path])
    uses(explicit, {"PORTUNUS_CLIENT_BUNDLE": str(explicit)})
    uses(xdg_path)
    xdg_path.unlink()
    uses(home_path)
    home_path.unlink()
    uses(cwd / "client.bundle.json")


# ------------------------------------------------------------------ 4 + 5. storage and the store lock

def test_backup_restore_reset_and_offline_commands_refuse_while_serving(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    server = Server(procs, data)
    for name in ("alpha", "beta"):
        uri_of(server.cli("enroll-client", name))

    # backup into a directory: a timestamped, valid SQLite copy (the rows are still in the WAL)
    bdir = tmp_path / "backups"
    bdir.mkdir()
    res = server.cli("backup", "--out", str(bdir))
    assert res.returncode == 0, res.stderr
    made = list(bdir.iterdir())
    assert len(made) == 1 and re.fullmatch(r"portunus-backup-\d{8}T\d{6}Z\.db", made[0].name), made
    backup = made[0]
    assert res.stdout.strip() == str(backup)
    assert backup.read_bytes()[:16] == b"SQLite format 3\x00"
    assert clients_in_db(backup) == ["alpha", "beta"]

    # a file path is never overwritten
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"keep me")
    assert_cli_error(server.cli("backup", "--out", str(existing)), 9, "conflict.backup_exists", str(existing))
    assert existing.read_bytes() == b"keep me"
    missing = tmp_path / "no-such-dir" / "b.db"
    assert_cli_error(server.cli("backup", "--out", str(missing)), 1, "io_error", str(missing))
    assert not missing.parent.exists()

    uri_of(server.cli("enroll-client", "late"))  # after the backup

    # offline commands refuse while serve holds the store
    assert_cli_error(server.cli("restore", "--in", str(backup)), 75, "store_in_use")
    assert_cli_error(server.cli("restore", "--in", str(backup), "--force"), 75, "store_in_use")
    assert_cli_error(server.cli("reset", "--confirm"), 75, "store_in_use")
    assert_cli_error(server.cli("bootstrap-superadmin", "--name", "root"), 75, "store_in_use")
    not_db = tmp_path / "notes.txt"
    not_db.write_text("this is not a database\n" * 10)
    assert_cli_error(server.cli("restore", "--in", str(not_db), "--force"), 2, "validation.not_a_database",
                     str(not_db))

    # reset without --confirm is a dry run, even while serving
    res = server.cli("reset")
    assert res.returncode == 0, res.stderr
    assert "dry run" in res.stdout and str(data / "state.db") in res.stdout
    assert (data / "state.db").exists()
    assert json.loads(server.cli("list-clients", "--format", "json").stdout)

    assert stop(server.proc) == 0
    assert clients_in_db(data / "state.db") == ["alpha", "beta", "late"]

    # a non-empty data dir needs --force
    assert_cli_error(server_cli(data, "restore", "--in", str(backup)), 9, "conflict.data_dir_not_empty", "--force")
    # a backup from a newer schema: exit 78, and the live db is untouched
    future = tmp_path / "future.db"
    future.write_bytes(backup.read_bytes())
    conn = sqlite3.connect(future)
    conn.execute("INSERT INTO schema_migrations(version, name, applied_at) VALUES (999, 'future', "
                 "'2099-01-01T00:00:00Z')")
    conn.commit()
    conn.close()
    before = sorted(p.name for p in data.iterdir())
    assert_cli_error(server_cli(data, "restore", "--in", str(future), "--force"), 78, "schema_version_too_new")
    assert clients_in_db(data / "state.db") == ["alpha", "beta", "late"]
    assert sorted(p.name for p in data.iterdir()) == before
    assert_cli_error(server_cli(data, "restore", "--in", str(not_db), "--force"), 2, "validation.not_a_database")
    fake = tmp_path / "fake.db"  # the right 16-byte header, then junk
    fake.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    assert_cli_error(server_cli(data, "restore", "--in", str(fake), "--force"), 2, "validation.not_a_database",
                     str(fake))
    assert sorted(p.name for p in data.iterdir()) == before

    res = server_cli(data, "restore", "--in", str(backup), "--force")
    assert res.returncode == 0, res.stderr
    assert clients_in_db(data / "state.db.pre-restore") == ["alpha", "beta", "late"]  # the replaced db is kept
    server = Server(procs, data)
    names = sorted(c["client_name"] for c in json.loads(server.cli("list-clients", "--format", "json").stdout))
    assert names == ["alpha", "beta"]
    assert stop(server.proc) == 0

    # reset --confirm on a stopped server: only state.db and its sidecars go
    keep = {"server.crt", "server.key", "server.toml"}
    assert keep <= {p.name for p in data.iterdir()}
    res = server_cli(data, "reset")
    assert res.returncode == 0 and str(data / "state.db") in res.stdout
    assert (data / "state.db").exists()
    res = server_cli(data, "reset", "--confirm")
    assert res.returncode == 0, res.stderr
    left = {p.name for p in data.iterdir()}
    assert keep <= left
    assert not left & {"state.db", "state.db-wal", "state.db-shm"}, left


def test_bootstrap_superadmin_token_then_operator_auth(procs, tmp_path):
    data = tmp_path / "server"
    data.mkdir()
    # no operator_token: the bootstrap bearer is the only machine credential
    (data / "server.toml").write_text('control_listen = "127.0.0.1:0"\noperator_http_listen = "127.0.0.1:0"\n'
                                      'metrics_listen = "127.0.0.1:0"\n')
    # offline enrollment cannot know a port picked at serve time: refused, and no client is left behind
    assert_cli_error(server_cli(data, "enroll-client", "edge-01"), 3, "failed_precondition", "control_listen")
    res = server_cli(data, "bootstrap-superadmin", "--name", "Root Operator")
    assert res.returncode == 0, res.stderr
    token = res.stdout.strip()
    assert TOKEN_RE.fullmatch(token), res.stdout
    assert_cli_error(server_cli(data, "bootstrap-superadmin", "--name", "again"), 9, "conflict.already_bootstrapped")

    server = Server(procs, data, env={"PORTUNUS_OPERATOR_TOKEN": token})
    res = server.cli("list-clients")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[:2] == ["CLIENT_ID", "NAME"]
    assert server.cli("list-clients", "--format", "json", check=True).stdout.strip() == "[]"
    assert_cli_error(server.cli("bootstrap-superadmin", "--name", "x"), 75, "store_in_use")
    assert_cli_error(server.cli("list-clients", env={"PORTUNUS_OPERATOR_TOKEN": "wrong-" + token}), 7,
                     "unauthenticated")
    # the test suite's usual token means nothing here
    assert_cli_error(server.cli("list-clients", env={"PORTUNUS_OPERATOR_TOKEN": OPERATOR_TOKEN}), 7,
                     "unauthenticated")


def test_gen_token_and_unreachable_server(tmp_path):
    tokens = set()
    for _ in range(2):
        res = server_cli(tmp_path / "unused", "gen-token")
        assert res.returncode == 0, res.stderr
        assert TOKEN_RE.fullmatch(res.stdout.strip()), res.stdout
        tokens.add(res.stdout.strip())
    assert len(tokens) == 2
    url = f"http://127.0.0.1:{free_port()}"
    res = server_cli(tmp_path / "unused", "--server", url, "list-clients",
                     env={"PORTUNUS_OPERATOR_TOKEN": OPERATOR_TOKEN})
    assert_cli_error(res, 1, "server_unreachable", url)


# ------------------------------------------------------------------ 7 + 8. output formats and the SSE stream

def test_rule_listing_stats_formats_and_sse(server, procs, tmp_path):
    enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    listen, target = free_port_block(4), free_port_block(4)
    single, single_target = free_port(), free_port()
    echo = TcpEchoServer(range(target, target + 4), prefix_port=True)
    try:
        res = server.cli("push-rule", "edge-01", f"{listen}-{listen + 3}", f"127.0.0.1:{target}-{target + 3}")
        assert res.returncode == 0, res.stderr
        range_id = res.stdout.strip()
        res = server.cli("push-rule", "edge-01", str(single), f"127.0.0.1:{single_target}")
        assert res.returncode == 0, res.stderr
        single_id = res.stdout.strip()
        payload = os.urandom(10_000)
        got = roundtrip(listen + 2, payload)
        assert got == f"{target + 2}:".encode() + payload

        # list-rules text: one row per rule, CAPS says range
        lines = server.cli("list-rules", check=True).stdout.splitlines()
        header = lines[0].split()
        assert header == ["RULE_ID", "CLIENT", "PROTO", "LISTEN", "TARGET", "STATE", "CAPS", "OWNER"]
        rows = {ln.split()[0]: dict(zip(header, ln.split())) for ln in lines[1:]}
        assert set(rows) == {range_id, single_id}
        assert rows[range_id]["CAPS"] == "range" and rows[range_id]["LISTEN"] == f"{listen}-{listen + 3}"
        assert rows[single_id]["CAPS"] == "-" and rows[single_id]["LISTEN"] == str(single)
        assert rows[range_id]["STATE"] == "active"

        # JSON shapes of SPEC §6
        rules = json.loads(server.cli("list-rules", "--format", "json", check=True).stdout)
        assert isinstance(rules, list) and len(rules) == 2
        for r in rules:
            assert RULE_KEYS <= set(r), RULE_KEYS - set(r)
            assert all(TARGET_KEYS <= set(t) for t in r["targets"])
        clients = json.loads(server.cli("list-clients", "--format", "json", check=True).stdout)
        assert isinstance(clients, list) and CLIENT_KEYS <= set(clients[0]), CLIENT_KEYS - set(clients[0])

        def counted():
            s = json.loads(server.cli("rule-stats", range_id, "--per-port", "--format", "json").stdout)
            return s if s["bytes_in"] == len(payload) else None
        stats = wait_until(counted, timeout=15, interval=0.3, what="stats report")
        assert isinstance(stats, dict) and STATS_KEYS <= set(stats), STATS_KEYS - set(stats)
        assert [p["listen_port"] for p in stats["per_port"]] == list(range(listen, listen + 4))
        assert all(PER_PORT_KEYS <= set(p) for p in stats["per_port"])
        plain = json.loads(server.cli("rule-stats", single_id, "--format", "json", check=True).stdout)
        assert STATS_KEYS <= set(plain) and "per_port" not in plain and "per_target" not in plain
        assert isinstance(json.loads(server.cli("rule-stats", single_id, "--per-target", "--format", "json",
                                                check=True).stdout)["per_target"], list)

        # rule-stats --per-port text: one row per port of the range
        lines = server.cli("rule-stats", range_id, "--per-port", check=True).stdout.splitlines()
        at = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["PORT"])
        port_rows = [ln.split() for ln in lines[at + 1:] if ln.strip()]
        assert [int(r[0]) for r in port_rows] == list(range(listen, listen + 4))
        by_port = {int(r[0]): r for r in port_rows}
        assert int(by_port[listen + 2][1]) == len(payload) and int(by_port[listen][1]) == 0

        # SSE: a snapshot at once, then one per report tick
        api = urlsplit(server.api)
        conn = http.client.HTTPConnection(api.hostname, api.port, timeout=10)
        try:
            conn.request("GET", f"/v1/rules/{range_id}/stats/stream")
            resp = conn.getresponse()
            assert resp.status == 401
        finally:
            conn.close()
        conn = http.client.HTTPConnection(api.hostname, api.port, timeout=10)
        try:
            conn.request("GET", f"/v1/rules/{range_id}/stats/stream",
                         headers={"Authorization": f"Bearer {OPERATOR_TOKEN}", "Accept": "text/event-stream"})
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.getheader("Content-Type", "").split(";")[0] == "text/event-stream"

            def next_event():
                event, data = None, []
                while True:
                    line = resp.readline()
                    assert line, "stream closed"
                    line = line.decode().rstrip("\r\n")
                    if line.startswith(":"):
                        continue
                    if not line:
                        if event or data:
                            return event, json.loads("\n".join(data))
                        continue
                    field, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if field == "event":
                        event = value
                    elif field == "data":
                        data.append(value)
            t0 = time.monotonic()
            event, snap = next_event()
            assert time.monotonic() - t0 < 2
            assert event == "stats" and snap["rule_id"] == range_id and STATS_KEYS <= set(snap)
            assert snap["bytes_in"] == len(payload)
            event, snap = next_event()
            assert time.monotonic() - t0 < 5
            assert event == "stats" and snap["rule_id"] == range_id
        finally:
            conn.close()
        assert server.cli("list-clients", check=True).returncode == 0  # the server is fine after the close
    finally:
        echo.close()


# ------------------------------------------------------------------ 9. server.toml strictness

@pytest.mark.parametrize("line, key", [("listen_everything = true", "listen_everything"),
                                       ("udp_flow_idle_secs = 5", "udp_flow_idle_secs")])
def test_server_toml_unknown_key_or_out_of_range_fails_startup(tmp_path, line, key):
    data = tmp_path / "server"
    write_server_toml(data)
    with open(data / "server.toml", "a") as f:
        f.write(line + "\n")
    res = server_cli(data, "serve")
    assert_cli_error(res, 2, "config_invalid", key)
    assert not (data / "state.db").exists()


def test_audit_api_pages_and_prune(procs, tmp_path):
    import urllib.request
    from cp import OPERATOR_TOKEN, Server, write_server_toml
    data = tmp_path / "server"
    write_server_toml(data)
    s = Server(procs, data)
    for _ in range(5):
        s.cli("list-clients")
    s.cli("list-clients", env={"PORTUNUS_OPERATOR_TOKEN": "wrong-token-0123456789"})  # one deny row

    def get(query):
        req = urllib.request.Request(s.api + "/v1/audit" + query,
                                     headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    rows = get("?limit=3")["entries"]
    assert len(rows) == 3 and rows[0]["id"] > rows[1]["id"] > rows[2]["id"]
    denies = get("?outcome=deny")["entries"]
    assert denies and all(r["outcome"] == "deny" for r in denies)
    assert denies[0]["reason"] == "unauthenticated" and "wrong-token" not in json.dumps(denies)
    first = get("?since=2000-01-01T00:00:00Z&limit=2")
    assert first["count"] == 2 and first["next_cursor"] == first["entries"][-1]["id"]
    second = get(f"?since=2000-01-01T00:00:00Z&limit=2&cursor={first['next_cursor']}")
    assert all(r["id"] < first["next_cursor"] for r in second["entries"])
    assert get("?since=2999-01-01T00:00:00Z")["count"] == 0

    res = s.cli("audit", "prune", "--before", "2999-01-01T00:00:00Z")
    assert res.returncode == 75 and "store_in_use" in res.stderr  # offline command, server running
    s.proc.signal(signal.SIGTERM)
    assert s.proc.wait(20) == 0
    res = s.cli("audit", "prune", "--before", "2999-01-01T00:00:00Z", "--dry-run")
    assert res.returncode == 0 and "would delete" in res.stdout
    n = int(res.stdout.split()[2])
    assert n >= 7
    res = s.cli("audit", "prune", "--before", "not-a-time")
    assert res.returncode == 2 and "validation.invalid_timestamp" in res.stderr
    res = s.cli("audit", "prune", "--before", "2999-01-01T00:00:00Z")
    assert res.returncode == 0 and f"deleted {n} audit row" in res.stdout
