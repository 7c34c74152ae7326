"""Seeded control-channel fuzzer (issue 8 point 10): frames and messages, before and after auth.

A second enrolled client (a raw peer) throws mutated frames and messages at a real
server while a real agent holds a live rule. Afterwards: no traceback in the server
log, the API and both metrics endpoints answer, the legit client still gets a push,
its rule and stats are untouched, and the server's fd count is back near baseline.

PORTUNUS_FUZZ_CASES (default 300) sets the number of cases, PORTUNUS_FUZZ_SEED the seed.
"""

from __future__ import annotations

import json
import os
import random
import struct
import time

import pytest

from conftest import free_port, wait_until
from cp import Server, enroll_client, wait_connected, write_server_toml
from peers import TcpEchoServer
from portunus.control.frames import MAX_FRAME
from rawpeer import RawPeer, api, enrolled_token, fd_count, metrics, push_owned_rule
from test_standalone_tcp import roundtrip

CASES = int(os.environ.get("PORTUNUS_FUZZ_CASES", "300"))
SEED = int(os.environ.get("PORTUNUS_FUZZ_SEED", "20261201"))
BUDGET_SECS = 45.0  # the default run stops early rather than blow the suite's time budget

WEIRD = [None, True, False, 0, -1, 1 << 63, 1 << 64, -(1 << 63), 1.5, 1e308, -0.0, "", "x" * 5000, "\ud800",
         "\u202e\n\"'\\", [], [None], {}, {"type": "hello"}, [[[[[[[[]]]]]]]], "01ARZ3NDEKTSV4RRFFQ69G5FAV"]


OTHER_KINDS = ["hello", "enroll", "pong", "welcome", "ping", "error", "rule_update", "nonsense"]


def template(rnd: random.Random, ctx: dict, authed: bool) -> dict:
    # the other client's rule half of the time: the messages that must never reach it
    rule_id = rnd.choice([ctx["victim"], ctx["victim"], ctx["own"], "nope", rnd.choice(WEIRD)])
    if authed and rnd.random() < 0.7:
        kind = rnd.choice(["rule_status", "stats_report"])
    else:
        kind = rnd.choice(OTHER_KINDS + ["rule_status", "stats_report"])
    if kind == "hello":
        return {"type": "hello", "token": rnd.choice([ctx["token"], "x" * 43, ""]), "protocol_version":
                rnd.choice([1, 2, 0]), "client_version": "fuzz", "capabilities": ["udp"]}
    if kind == "enroll":
        return {"type": "enroll", "code": rnd.choice(["WRONG", "", "A" * 100]), "client_version": "fuzz"}
    if kind == "rule_status":
        return {"type": "rule_status", "rule_id": rule_id, "state": rnd.choice(["active", "failed", "removed"]),
                "reason": "fuzz", "request_id": rnd.choice([None, ctx["victim_request"], "forged"])}
    if kind == "stats_report":
        snap = {"rule_id": rule_id, "bytes_in": rnd.choice([1, "1", -1, 1 << 63, None]),
                "per_port": rnd.choice([None, [], "x", [{"listen_port": ctx["own_port"], "bytes_in": 3}],
                                        [{"listen_port": 1}], [{"listen_port": ctx["own_port"]}] * 3]),
                "per_target": rnd.choice([None, [], [{"index": 0}], [{"index": 9}], "x"])}
        many = [dict(snap, rule_id=f"inv-{i}") for i in range(rnd.choice([0, 1, 500]))]
        return {"type": "stats_report", "at": rnd.choice([time.time(), -1, "now"]), "rules": [snap, *many]}
    if kind == "pong":
        return {"type": "pong", "nonce": rnd.choice([1, "n", None, []])}
    return {"type": kind, "code": "x", "message": "y", "rule_id": rule_id}


def mutate(rnd: random.Random, msg: dict) -> dict:
    msg = dict(msg)
    for _ in range(rnd.choice([0, 0, 0, 1, 2])):
        op = rnd.random()
        keys = [k for k in msg if k != "type"]
        if op < 0.3 and keys:
            msg.pop(rnd.choice(keys))
        elif op < 0.7 and keys:
            msg[rnd.choice(keys)] = rnd.choice(WEIRD)
        elif op < 0.85:
            msg[f"extra_{rnd.randrange(9)}"] = rnd.choice(WEIRD)
        else:
            msg["type"] = rnd.choice(WEIRD + ["hello", "stats_report"])
    return msg


def frame(rnd: random.Random, msg: dict) -> bytes:
    """Mostly a proper frame; sometimes a broken one."""
    try:
        payload = json.dumps(msg).encode()
    except (TypeError, ValueError):
        payload = b"{}"
    op = rnd.random()
    if op < 0.75:
        return struct.pack(">I", len(payload)) + payload
    if op < 0.80:
        return struct.pack(">I", MAX_FRAME + 1)                        # over the cap, from the header
    if op < 0.85:
        return struct.pack(">I", len(payload) + 10) + payload           # truncated
    if op < 0.88:
        deep = b"[" * 5000 + b"]" * 5000
        return struct.pack(">I", len(deep)) + deep                      # nesting
    if op < 0.91:
        deep = b'{"type":"stats_report","at":1,"rules":[{"rule_id":"x","per_port":' + b"[" * 900 + b"]" * 900 + b"}]}"
        return struct.pack(">I", len(deep)) + deep
    if op < 0.94:
        junk = b"\xff\xfe" + rnd.randbytes(rnd.randrange(1, 64))
        return struct.pack(">I", len(junk)) + junk                      # not UTF-8
    if op < 0.97:
        return rnd.randbytes(rnd.randrange(1, 300))                     # noise
    return b'\x00\x00\x00\x04null'


def run_case(rnd: random.Random, port: int, ctx: dict) -> None:
    peer = RawPeer(port, timeout=5)
    authed = rnd.random() < 0.5
    try:
        if authed:
            peer.hello(ctx["token"])  # after auth, as the second enrolled client
        for _ in range(rnd.randrange(1, 5)):
            data = frame(rnd, mutate(rnd, template(rnd, ctx, authed)))
            if rnd.random() < 0.3 and len(data) > 2:
                cut = rnd.randrange(1, len(data))
                peer.send_raw(data[:cut])
                peer.send_raw(data[cut:])
            else:
                peer.send_raw(data)
            if peer.closed:
                break
        if rnd.random() < 0.3:
            peer.recv(0.05)  # sometimes read what came back before going
    finally:
        peer.close()


@pytest.fixture
def server(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    return Server(procs, data)


def setup_victim_and_fuzzer(server: Server, procs, tmp_path, listen: int, target: int) -> dict:
    """edge-01 (a real agent) with a live rule that has carried 4 bytes; edge-fuzz (raw) with a rule of its own."""
    enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    res = server.cli("push-rule", "edge-01", str(listen), f"127.0.0.1:{target}")
    assert res.returncode == 0, res.stderr
    victim = res.stdout.strip()
    push = server.proc.wait_event("rule.push", pred=lambda e: e.get("rule") == victim)
    assert roundtrip(listen, b"ping") == b"ping"
    wait_until(lambda: api(server, "GET", f"/v1/rules/{victim}/stats")[1]["bytes_in"] == 4, timeout=15,
               interval=0.3, what="the legit client's stats")
    _, token = enrolled_token(server, tmp_path, "edge-fuzz")
    owner = RawPeer(server.control_port)
    owner.hello(token)
    own_port = free_port()
    own = push_owned_rule(server, owner, "edge-fuzz", {"listen": str(own_port), "target": "127.0.0.1:9"})
    owner.close()
    return {"victim": victim, "victim_request": push["request_id"], "own": own["rule_id"], "own_port": own_port,
            "token": token}


def test_control_channel_fuzz(server, procs, tmp_path):
    listen, target = free_port(), free_port()
    echo = TcpEchoServer([target])
    try:
        ctx = setup_victim_and_fuzzer(server, procs, tmp_path, listen, target)
        victim = ctx["victim"]
        pid = server.proc.p.pid
        rnd = random.Random(SEED)
        # warm-up: the first stats reports start the traffic writer's own store connection, so the
        # baseline is taken after a few cases; a leak grows with every case, not once
        for _ in range(10):
            run_case(rnd, server.control_port, ctx)
        time.sleep(1.0)
        baseline = fd_count(pid)
        started = time.monotonic()
        done = 0
        for _ in range(CASES):
            run_case(rnd, server.control_port, ctx)
            done += 1
            if "PORTUNUS_FUZZ_CASES" not in os.environ and time.monotonic() - started > BUDGET_SECS:
                break
        assert done >= min(CASES, 100), f"only {done} cases in the time budget"
        # every fuzz connection is closed server-side (measured before the API calls below open theirs)
        wait_until(lambda: fd_count(pid) <= baseline + 2, timeout=20, interval=0.5,
                   what=f"server fds back near {baseline} (now {fd_count(pid)})")

        # the server is still whole
        assert server.proc.p.poll() is None
        assert not [line for line in server.proc.lines if "Traceback" in line]
        assert not server.proc.events("loop.callback_error")
        assert not server.proc.events("http.handler_error")
        status, text = metrics(server)
        assert status == 200 and 'portunus_clients_connected{client="edge-01"} 1' in text
        assert api(server, "GET", "/v1/metrics")[0] == 200
        for rule_id in (victim, ctx["own"]):
            status, stats = api(server, "GET", f"/v1/rules/{rule_id}/stats?per_port=true&per_target=true")
            assert status == 200, stats
        status, rules = api(server, "GET", "/v1/rules")
        assert status == 200
        [row] = [r for r in (rules["rules"] if isinstance(rules, dict) else rules) if r["rule_id"] == victim]
        assert row["state"] == "active"
        assert api(server, "GET", f"/v1/rules/{victim}/stats")[1]["bytes_in"] == 4

        # the legit client still gets a push and forwards
        listen2, target2 = free_port(), free_port()
        echo2 = TcpEchoServer([target2])
        try:
            res = server.cli("push-rule", "edge-01", str(listen2), f"127.0.0.1:{target2}")
            assert res.returncode == 0, res.stderr
            assert roundtrip(listen2, b"still here") == b"still here"
        finally:
            echo2.close()
        assert not [line for line in server.proc.lines if "Traceback" in line]
    finally:
        echo.close()
