"""Doctor role checks that need no server: bundle lookup and file, rule needs, data dir, database, cert."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import sqlite3
import tempfile

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from portunus.control.tls import CertInfo
from portunus.doctor import client as dc
from portunus.doctor import host
from portunus.doctor import report as r
from portunus.doctor import online as do
from portunus.doctor import server as ds
from portunus.model import Rule
from portunus.store import db as store_db

TOKEN = "s3cret-token-value-never-printed"


def write_bundle(path, mode=0o600, **over):
    data = {"version": 1, "client_id": "01HZX", "client_name": "edge-01", "server_endpoint": "127.0.0.1:7443",
            "server_cert_sha256": "ab" * 32, "token": TOKEN, **over}
    path.write_text(json.dumps(data))
    os.chmod(path, mode)
    return path


# ------------------------------------------------------------------ bundle

def test_bundle_lookup_lists_every_path_tried_with_what_was_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"PORTUNUS_CLIENT_BUNDLE": str(tmp_path / "nope.json"), "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
           "HOME": str(tmp_path / "home")}
    path, check = dc.check_bundle_lookup(None, env)
    assert path is None and check.status == r.FAIL
    assert check.details["tried"] == {
        str(tmp_path / "nope.json"): "missing",
        str(tmp_path / "xdg" / "portunus" / "client.bundle.json"): "missing",
        str(tmp_path / "home" / ".config" / "portunus" / "client.bundle.json"): "missing",
        "./client.bundle.json": "missing"}
    assert "--bundle" in check.fix
    (tmp_path / "home" / ".config" / "portunus").mkdir(parents=True)
    write_bundle(tmp_path / "home" / ".config" / "portunus" / "client.bundle.json")
    path, check = dc.check_bundle_lookup(None, env)
    assert check.status == r.OK and path.endswith("home/.config/portunus/client.bundle.json")
    assert list(check.details["tried"].values())[:3] == ["missing", "missing", "found"]


def test_explicit_bundle_that_is_a_directory(tmp_path):
    path, check = dc.check_bundle_lookup(str(tmp_path), {})
    assert path is None and check.details["tried"] == {str(tmp_path): "not a file"}


def test_bundle_file_mode_and_parse_never_show_the_token(tmp_path):
    bundle, checks = dc.check_bundle_file(str(write_bundle(tmp_path / "b.json", 0o644)))
    assert bundle["token"] == TOKEN
    by_id = {c.id: c for c in checks}
    assert by_id["bundle.parse"].status == r.OK
    assert by_id["bundle.mode"].status == r.WARN and by_id["bundle.mode"].fix == f"chmod 600 {tmp_path / 'b.json'}"
    assert TOKEN not in r.render_json(checks) and TOKEN not in r.render_text(checks)
    (tmp_path / "bad.json").write_text('{"token": "' + TOKEN + '", ')
    bundle, checks = dc.check_bundle_file(str(tmp_path / "bad.json"))
    assert bundle is None and checks[0].status == r.FAIL and "bundle_invalid" in checks[0].summary
    assert TOKEN not in r.render_json(checks)


# ------------------------------------------------------------------ what rules need

def rule(rule_id, listen, protocol="tcp", **extra):
    target = {"host": "10.0.0.5", "port": 9000}
    if listen[-1] != listen[0]:
        target["port_end"] = 9000 + listen[-1] - listen[0]
    return Rule.from_dict({"rule_id": rule_id, "protocol": protocol, "listen_port": listen[0],
                           "listen_port_end": listen[-1], "targets": [target], **extra}, max_range_ports=65535)


def test_fd_needs_count_listen_ports_and_udp_flow_caps():
    needs = dc.rule_fd_needs([rule("A", (30000, 30999)), rule("B", (5353,), "udp"),
                              rule("C", (5354,), "udp", udp_max_flows=10)], udp_default=2048)
    assert list(needs.values()) == [1000, 1 + 2048, 1 + 10]
    assert "rule A (tcp 30000-30999)" in needs


def test_held_ports_ignore_time_wait_and_the_other_protocol():
    sockets = [host.SocketEntry("tcp", "10.0.0.1", 40001, "10.0.0.9", 443, "ESTABLISHED", 1),
               host.SocketEntry("tcp", "0.0.0.0", 40002, "0.0.0.0", 0, "TIME_WAIT", 2),
               host.SocketEntry("udp", "0.0.0.0", 40003, "0.0.0.0", 0, "UNCONN", 3)]
    held = dc.held_ports([rule("A", (40001, 40003))], sockets)
    assert held == {40001: "tcp ESTABLISHED"}
    assert dc.held_ports([rule("U", (40003,), "udp")], sockets) == {40003: "udp UNCONN"}


# ------------------------------------------------------------------ data dir and database

def test_data_dir_permissions(tmp_path):
    d = tmp_path / "data"
    assert ds.check_permissions(str(d)).status == r.WARN  # serve creates it
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    loose = ds.check_permissions(str(d))
    assert loose.status == r.WARN and loose.fix == f"chmod 700 {d}"
    os.chmod(d, 0o700)
    assert ds.check_permissions(str(d)).status == r.OK
    f = tmp_path / "file"
    f.write_text("")
    assert ds.check_permissions(str(f)).status == r.FAIL
    assert ds.check_free_space(str(d)).details["free_bytes"] > 0


def test_tmpfs_data_dir_fails_unless_explicitly_allowed():
    if not os.path.isdir("/dev/shm") or store_db.unsupported_filesystem(store_db.filesystem_magic("/dev/shm")) \
            != "tmpfs":
        pytest.skip("/dev/shm is not tmpfs here")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        refused = ds.check_filesystem(os.path.join(d, "data"), {})
        assert refused.status == r.FAIL and "startup.unsupported_filesystem" in refused.summary
        assert refused.details["filesystem"] == "tmpfs"
        assert ds.check_filesystem(d, {"PORTUNUS_ALLOW_ANY_FS": "1"}).status == r.WARN


def test_local_data_dir_filesystem_is_fine(tmp_path):
    magic = store_db.filesystem_magic(str(tmp_path))
    if store_db.unsupported_filesystem(magic):
        pytest.skip("the temp dir itself is on tmpfs here")
    assert ds.check_filesystem(str(tmp_path / "data"), {}).status == r.OK


def make_db(path, version):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)")
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'x', 'now')", (version,))
    conn.execute("CREATE TABLE filler (id INTEGER PRIMARY KEY, body TEXT)")
    conn.executemany("INSERT INTO filler (body) VALUES (?)", [("x" * 500,)] * 400)
    conn.execute("CREATE INDEX filler_body ON filler (body)")
    conn.commit()
    conn.close()


def test_schema_version_against_this_binary(tmp_path):
    known = store_db.load_migrations()[-1].version
    for version, status, words in ((known, r.OK, "as this binary"), (known + 1, r.FAIL, "schema_version_too_new")):
        path = tmp_path / f"v{version}.db"
        make_db(path, version)
        conn = ds.open_readonly(str(path))
        try:
            c = ds.check_schema(conn)
        finally:
            conn.close()
        assert c.status == status and words in c.summary


def test_quick_check_passes_then_finds_a_damaged_index(tmp_path):
    path = tmp_path / "state.db"
    make_db(path, 1)
    conn = ds.open_readonly(str(path))
    assert ds.check_integrity(conn, str(path)).status == r.OK
    conn.close()
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # scribble over the last pages (the index): quick_check must notice
        f.seek(size - 3 * 4096)
        f.write(os.urandom(2 * 4096))
    conn = ds.open_readonly(str(path))
    try:
        damaged = ds.check_integrity(conn, str(path))
    finally:
        conn.close()
    assert damaged.status == r.FAIL and "restore" in damaged.fix


def test_lock_held_by_a_process_that_is_not_serve(tmp_path):
    pid, check = ds.check_lock(str(tmp_path))
    assert pid is None and check.status == r.WARN  # no lock file: serve never ran here
    fd = os.open(tmp_path / store_db.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        pid, check = ds.check_lock(str(tmp_path))
        assert pid is None and "not running" in check.summary
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        pid, check = ds.check_lock(str(tmp_path))
        assert check.status == r.WARN and check.details["pid"] == os.getpid() and "exit 75" in check.summary
    finally:
        os.close(fd)


# ------------------------------------------------------------------ certificate

def make_cert(tmp_path, sans, not_before, not_after):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert


NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)


@pytest.mark.parametrize("after_days, status", [(400, r.OK), (10, r.WARN), (-1, r.FAIL)])
def test_certificate_expiry(tmp_path, after_days, status):
    cert = make_cert(tmp_path, ["a.example"], NOW - datetime.timedelta(days=30),
                     NOW + datetime.timedelta(days=after_days))
    assert ds.check_expiry(cert, NOW).status == status


def test_certificate_not_yet_valid_points_at_the_clock(tmp_path):
    cert = make_cert(tmp_path, ["a.example"], NOW + datetime.timedelta(days=1), NOW + datetime.timedelta(days=9))
    c = ds.check_expiry(cert, NOW)
    assert c.status == r.FAIL and "clock" in c.summary


def info(*dns_names):
    return CertInfo("c", "k", "ab" * 32, list(dns_names), ["127.0.0.1"])


def test_endpoint_against_the_certificate_san():
    cert = info("proxy.example.com", "*.edge.example")
    covered = ds.check_endpoint({"effective": "proxy.example.com:7443", "source": "seed"}, cert, 7443)
    assert covered.status == r.OK
    loopback = ds.check_endpoint({"effective": "127.0.0.1:7443", "source": "loopback"}, cert, 7443)
    assert loopback.status == r.WARN and "127.0.0.1:7443" in loopback.summary
    refused = ds.check_endpoint({"effective": None, "source": "seed",
                                 "diagnostic": "endpoint_not_in_cert_san: 'x.example' ..."}, cert, 7443)
    assert refused.status == r.FAIL and "SAN" in refused.fix


def test_offline_effective_endpoint_tiers():
    cert = info("proxy.example.com")
    assert ds.effective_endpoint(None, None, cert, {})["source"] == "loopback"
    seeded = ds.effective_endpoint(None, None, cert, {"PORTUNUS_ADVERTISED_ENDPOINT": "proxy.example.com:443"})
    assert seeded == {"effective": "proxy.example.com:443", "source": "seed", "diagnostic": None}
    bad = ds.effective_endpoint(None, None, cert, {"PORTUNUS_ADVERTISED_ENDPOINT": "other.example:443"})
    assert bad["effective"] is None and bad["diagnostic"].startswith("endpoint_not_in_cert_san")


# ------------------------------------------------------------------ small helpers

def test_dns_failure_series_from_metrics_text():
    text = ('# TYPE portunus_rule_dns_failures_total counter\n'
            'portunus_rule_dns_failures_total{client="edge-01",owner="",rule="R1"} 3\n'
            'portunus_rule_dns_failures_total{client="edge-01",owner="",rule="R2"} 0\n'
            'portunus_rule_bytes_in_total{client="edge-01",owner="",rule="R3"} 9\n')
    assert do.parse_dns_failures(text) == {"R1": 3}


@pytest.mark.parametrize("seconds, text", [(5, "5s"), (125, "2m"), (3 * 3600 + 120, "3h02m"),
                                           (2 * 86400 + 7200, "2d2h")])
def test_human_duration(seconds, text):
    assert do.human_duration(seconds) == text
