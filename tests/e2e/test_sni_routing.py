"""TLS SNI routing end to end (SPEC §2.8): many TLS sites behind one port, never decrypted.

The sites are real TLS servers with their own self-signed certificates made here; the
clients are Python ``ssl`` with SNI that verify each site's own certificate, so an
answer proves the connection reached the right site untouched. Standalone and a real
server-pushed client agent; real processes and sockets on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import ssl
import time

import pytest

from conftest import free_port, rule_stats, wait_until
from cp import Server, enroll_client, wait_connected, write_server_toml
from tlssites import TlsSite, ask, closed_without_answer, tls_ask, tls_connect

NAMES = {"exact": ["a.example.com"], "wild": ["*.example.com"], "apex": ["example.com"],
         "fallback": ["a.b.example.com", "other.test"]}


@pytest.fixture
def sites(tmp_path):
    made = {name: TlsSite(tmp_path, name, sans, free_port()) for name, sans in NAMES.items()}
    yield made
    for s in made.values():
        s.close()


def sni_toml(listen: int, sites, stats_path, fallback: bool = True, extra: str = "") -> str:
    text = f'[stats]\nsocket_path = "{stats_path}"\n'
    for name, pattern in (("exact", "a.example.com"), ("wild", "*.example.com"), ("apex", "example.com")):
        text += (f'[[rule]]\nname = "{name}"\nlisten_port = {listen}\nsni_pattern = "{pattern}"\n'
                 f'target = "127.0.0.1:{sites[name].port}"\n')
    if fallback:
        text += f'[[rule]]\nname = "fallback"\nlisten_port = {listen}\ntarget = "127.0.0.1:{sites["fallback"].port}"\n'
    return text + extra


def assert_routes_by_name(listen: int, sites) -> None:
    assert tls_ask(listen, "a.example.com", sites["exact"].cert) == b"exact:ping"
    assert tls_ask(listen, "zz.example.com", sites["wild"].cert) == b"wild:ping"
    assert tls_ask(listen, "example.com", sites["apex"].cert) == b"apex:ping"
    assert tls_ask(listen, "a.b.example.com", sites["fallback"].cert) == b"fallback:ping"


def refused_by_peer(listen: int, payload: bytes | None) -> bool:
    c = socket.create_connection(("127.0.0.1", listen), timeout=10)
    try:
        if payload:
            c.sendall(payload)
        return closed_without_answer(c)
    finally:
        c.close()


# ------------------------------------------------------------------ standalone

def test_standalone_routes_three_sites_by_name_with_fallback_no_sni_and_garbage(standalone, sites, tmp_path):
    listen, stats_path = free_port(), tmp_path / "stats.sock"
    p = standalone(sni_toml(listen, sites, stats_path))
    assert_routes_by_name(listen, sites)
    assert tls_ask(listen, None, sites["fallback"].cert) == b"fallback:ping"  # no SNI -> fallback
    assert refused_by_peer(listen, b"GET / HTTP/1.0\r\n\r\n")  # garbage: closed, never the fallback
    wait_until(lambda: rule_stats(str(stats_path), "fallback")["sni_routes"]["fallback"] == 2, what="fallback count")
    exact = rule_stats(str(stats_path), "exact")
    assert exact["sni_pattern"] == "a.example.com" and exact["sni_routes"]["exact"] == 1
    assert rule_stats(str(stats_path), "wild")["sni_routes"]["wildcard"] == 1
    listener = exact["sni_listener"]
    assert listener["parse_failures"] == 1 and listener["routes_active"] == 3 and listener["mode"] == "sni"
    assert listener["peek_duration_seconds"]["count"] == 6
    assert p.wait_event("tls.parse_failed")["reason"] == "not_tls"
    assert p.wait_event("tls.no_sni")["action"] == "fallback"


def test_standalone_without_fallback_closes_no_match_and_no_sni(standalone, sites, tmp_path):
    listen, stats_path = free_port(), tmp_path / "stats.sock"
    p = standalone(sni_toml(listen, sites, stats_path, fallback=False))
    for name in ("a.b.example.com", None):  # a wildcard covers one label: no match
        with pytest.raises((ssl.SSLError, OSError)):
            tls_ask(listen, name, sites["fallback"].cert)
    assert tls_ask(listen, "a.example.com", sites["exact"].cert) == b"exact:ping"
    wait_until(lambda: rule_stats(str(stats_path), "exact")["sni_listener"]["misses"] == 2, what="misses")
    assert p.wait_event("tls.sni_no_match")["action"] == "closed"


def test_a_hello_one_byte_at_a_time_routes_and_a_silent_client_is_closed_at_3s(standalone, sites, tmp_path):
    listen, stats_path = free_port(), tmp_path / "stats.sock"
    p = standalone(sni_toml(listen, sites, stats_path))
    ctx = ssl.create_default_context(cafile=sites["apex"].cert)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="example.com")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    c = socket.create_connection(("127.0.0.1", listen), timeout=10)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(len(hello)):
        c.sendall(hello[i:i + 1])
        time.sleep(0.001)
    # finish the handshake over the routed connection: the apex site's certificate verifies
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            out = outgoing.read()
            if out:
                c.sendall(out)
            data = c.recv(65536)
            assert data, "closed during the handshake"
            incoming.write(data)
    c.sendall(outgoing.read())
    tls.write(b"slow\n")
    c.sendall(outgoing.read())
    got = b""
    while not got.endswith(b"\n"):
        try:
            got += tls.read(100)
        except ssl.SSLWantReadError:
            incoming.write(c.recv(65536))
    assert got == b"apex:slow\n"
    c.close()

    silent = socket.create_connection(("127.0.0.1", listen), timeout=10)
    t0 = time.monotonic()
    assert closed_without_answer(silent)
    assert 2.5 <= time.monotonic() - t0 <= 8
    silent.close()
    assert p.wait_event("tls.client_hello_timeout")["timeout_secs"] == 3.0
    assert rule_stats(str(stats_path), "apex")["sni_listener"]["hello_timeouts"] == 1


def test_1100_silent_peeks_the_excess_is_reset(standalone, sites, tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip("needs 4096 descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    listen, stats_path = free_port(), tmp_path / "stats.sock"
    standalone(sni_toml(listen, sites, stats_path))
    conns, reset = [], 0
    try:
        for _ in range(1100):
            try:
                conns.append(socket.create_connection(("127.0.0.1", listen), timeout=10))
            except ConnectionResetError:
                reset += 1  # the reset beat connect() back
        wait_until(lambda: rule_stats(str(stats_path), "exact")["sni_listener"]["reads_reset"] >= 76,
                   what="the excess reset")
        listener = rule_stats(str(stats_path), "exact")["sni_listener"]
        assert listener["hellos_in_flight"] <= 1024
        for c in conns:
            c.setblocking(False)
            try:
                if c.recv(1) == b"":
                    reset += 1
            except ConnectionResetError:
                reset += 1
            except BlockingIOError:
                pass
        assert reset >= 76
    finally:
        for c in conns:
            c.close()
    # once the silent ones are gone, the port serves again
    wait_until(lambda: rule_stats(str(stats_path), "exact")["sni_listener"]["hellos_in_flight"] == 0,
               what="reads drained")
    assert tls_ask(listen, "a.example.com", sites["exact"].cert) == b"exact:ping"


def test_sighup_adds_and_removes_siblings_live_connections_survive(standalone, sites, tmp_path):
    listen, stats_path = free_port(), tmp_path / "stats.sock"
    p = standalone(sni_toml(listen, sites, stats_path))
    live = tls_connect(listen, "a.example.com", sites["exact"].cert)
    assert ask(live, b"1") == b"exact:1"
    cfg = p.config_path
    text = cfg.read_text()
    # drop the wildcard rule, add a rule for other.test
    without_wild = text.replace(f'[[rule]]\nname = "wild"\nlisten_port = {listen}\nsni_pattern = "*.example.com"\n'
                                f'target = "127.0.0.1:{sites["wild"].port}"\n', "")
    assert without_wild != text
    cfg.write_text(without_wild + f'[[rule]]\nname = "other"\nlisten_port = {listen}\nsni_pattern = "other.test"\n'
                                  f'target = "127.0.0.1:{sites["fallback"].port}"\n')
    p.signal(signal.SIGHUP)
    reloaded = p.wait_event("config.reloaded")
    assert reloaded["added"] == ["other"] and reloaded["removed"] == ["wild"] and reloaded["failed"] == []
    assert ask(live, b"2") == b"exact:2"
    assert tls_ask(listen, "other.test", sites["fallback"].cert) == b"fallback:ping"
    assert rule_stats(str(stats_path), "other")["sni_routes"]["exact"] == 1
    live.close()


def test_check_reports_the_port_mode_conflicts(standalone, sites, tmp_path):
    import subprocess
    from conftest import portunus_cmd
    listen = free_port()
    base = sni_toml(listen, sites, tmp_path / "s.sock")
    cases = {
        "conflict.sni_route_duplicate": base + f'[[rule]]\nname = "dup"\nlisten_port = {listen}\n'
                                               f'sni_pattern = "A.example.com"\ntarget = "127.0.0.1:1"\n',
        "conflict.sni_fallback_duplicate": base + f'[[rule]]\nname = "fb2"\nlisten_port = {listen}\n'
                                                  f'target = "127.0.0.1:1"\n',
        "conflict.legacy_to_sni_unsupported": f'[[rule]]\nname = "plain"\nlisten_port = {listen}\n'
                                              f'target = "127.0.0.1:1"\n' + base.split("\n", 2)[2],
        "validation.sni_pattern_malformed": f'[[rule]]\nname = "x"\nlisten_port = {listen}\nsni_pattern = "*.com"\n'
                                            f'target = "127.0.0.1:1"\n',
        "validation.sni_on_unsupported_rule": f'[[rule]]\nname = "x"\nprotocol = "udp"\nlisten_port = {listen}\n'
                                              f'sni_pattern = "a.example.com"\ntarget = "127.0.0.1:1"\n',
    }
    for code, text in cases.items():
        cfg = tmp_path / "check.toml"
        cfg.write_text(text)
        res = subprocess.run(portunus_cmd("standalone") + ["--config", str(cfg), "--check"],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 2, (code, res.stdout, res.stderr)
        if code.startswith("conflict."):
            assert code in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


# ------------------------------------------------------------------ server + client agent

@pytest.fixture
def server(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    return Server(procs, data)


def push(server: Server, *args) -> str:
    res = server.cli("push-rule", *args)
    assert res.returncode == 0, f"push-rule {' '.join(args)} exited {res.returncode}:\n{res.stderr}"
    return res.stdout.strip()


def test_three_sites_behind_one_port_through_a_pushed_client_agent(server, procs, tmp_path, sites):
    enroll_client(server, procs, tmp_path, "edge-sni")
    wait_connected(server, "edge-sni")
    listen = free_port()
    ids = {name: push(server, "edge-sni", str(listen), f"127.0.0.1:{sites[name].port}", "--sni", pattern)
           for name, pattern in (("exact", "a.example.com"), ("wild", "*.example.com"), ("apex", "example.com"))}
    ids["fallback"] = push(server, "edge-sni", str(listen), f"127.0.0.1:{sites['fallback'].port}")
    assert_routes_by_name(listen, sites)

    live = tls_connect(listen, "a.example.com", sites["exact"].cert)
    assert ask(live, b"1") == b"exact:1"

    # the three conflict codes: exit 9, nothing stored
    before = json.loads(server.cli("list-rules", "--format", "json", check=True).stdout)
    for args, code in (((str(listen), "127.0.0.1:1", "--sni", "a.example.com"), "conflict.sni_route_duplicate"),
                       ((str(listen), "127.0.0.1:1"), "conflict.sni_fallback_duplicate")):
        res = server.cli("push-rule", "edge-sni", *args)
        assert res.returncode == 9 and code in res.stderr, (res.returncode, res.stderr)
    plain = free_port()
    push(server, "edge-sni", str(plain), f"127.0.0.1:{sites['fallback'].port}")
    res = server.cli("push-rule", "edge-sni", str(plain), "127.0.0.1:1", "--sni", "x.example.com")
    assert res.returncode == 9 and "conflict.legacy_to_sni_unsupported" in res.stderr, res.stderr
    after = json.loads(server.cli("list-rules", "--format", "json", check=True).stdout)
    assert len(after) == len(before) + 1  # only the plain rule on the other port

    # siblings come and go; the live connection stays
    server.cli("remove-rule", ids["wild"], check=True)
    assert tls_ask(listen, "a.b.example.com", sites["fallback"].cert) == b"fallback:ping"
    push(server, "edge-sni", str(listen), f"127.0.0.1:{sites['wild'].port}", "--sni", "*.example.com")
    assert tls_ask(listen, "q.example.com", sites["wild"].cert) == b"wild:ping"
    assert ask(live, b"2") == b"exact:2"
    live.close()


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_half_sent_hellos_cost_no_busy_loop(standalone, sites, tmp_path):
    listen, stats_path = free_port(), tmp_path / "stats.sock"
    p = standalone(sni_toml(listen, sites, stats_path))
    ctx = ssl.create_default_context(cafile=sites["exact"].cert)
    outgoing = ssl.MemoryBIO()
    with pytest.raises(ssl.SSLWantReadError):
        ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="a.example.com").do_handshake()
    half = outgoing.read()[:100]
    conns = [socket.create_connection(("127.0.0.1", listen), timeout=10) for _ in range(50)]
    try:
        for c in conns:
            c.sendall(half)
        wait_until(lambda: rule_stats(str(stats_path), "exact")["sni_listener"]["hellos_in_flight"] == 50,
                   what="50 reads in flight")
        before = cpu_seconds(p.p.pid)
        time.sleep(1.5)
        assert cpu_seconds(p.p.pid) - before < 0.3  # waiting for the rest of 50 hellos is not a spin
    finally:
        for c in conns:
            c.close()


@pytest.mark.parametrize("version_flag", ["-tls1_2", "-tls1_3"])
def test_openssl_s_client_reaches_its_site_by_name(standalone, sites, tmp_path, version_flag):
    import shutil
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    listen, stats_path = free_port(), tmp_path / "stats.sock"
    standalone(sni_toml(listen, sites, stats_path))
    for name, site in (("a.example.com", "exact"), ("b.example.com", "wild")):
        proc = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{listen}", "-servername", name,
                                 "-verify_hostname", name, "-CAfile", sites[site].cert, "-verify_return_error",
                                 version_flag, "-quiet"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            proc.stdin.write(b"ping\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == f"{site}:ping\n".encode()  # verified: else s_client exits first
        finally:
            proc.kill()
            proc.wait()


def test_a_reload_with_a_port_mode_conflict_keeps_the_running_rules(standalone, sites, tmp_path):
    listen, stats_path = free_port(), tmp_path / "stats.sock"
    p = standalone(sni_toml(listen, sites, stats_path))
    p.config_path.write_text(sni_toml(listen, sites, stats_path) + f'[[rule]]\nname = "dup"\nlisten_port = {listen}\n'
                             f'sni_pattern = "example.com"\ntarget = "127.0.0.1:1"\n')
    p.signal(signal.SIGHUP)
    failed = p.wait_event("config.reload_failed")
    assert failed["code"] == "config_invalid" and "conflict.sni_route_duplicate" in failed["reason"]
    assert tls_ask(listen, "example.com", sites["apex"].cert) == b"apex:ping"


def test_a_scanner_cannot_flood_the_log(standalone, sites, tmp_path):
    listen, stats_path = free_port(), tmp_path / "stats.sock"
    p = standalone(sni_toml(listen, sites, stats_path, fallback=False))
    for i in range(60):
        assert refused_by_peer(listen, b"\x00garbage" if i % 2 else b"\x16\x03\x01\x00\x01\x02")
    wait_until(lambda: rule_stats(str(stats_path), "exact")["sni_listener"]["parse_failures"] == 60,
               what="60 parse failures counted")
    assert len(p.events("tls.parse_failed")) == 1  # the first at once, the rest counted for a later line
