"""`portunus-server quota …` and `traffic …` against a real server: human units, text and JSON,
the §7.2 exit codes of the quota and history errors (issue 14 point 7)."""

from __future__ import annotations

import json
import time

import pytest

from cp import Server, write_server_toml
from quota_env import VIEW_KEYS, QuotaPeer, add_grant, add_user

MiB = 1 << 20


@pytest.fixture
def world(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    server = Server(procs, data)
    alice = add_user(server, "alice")
    add_user(server, "bob")
    peer = QuotaPeer(server, tmp_path, "edge-tokyo").connect()
    add_grant(server, "alice", "edge-tokyo")
    yield server, alice, peer
    peer.close()


def refused(res, exit_code: int, code: str) -> None:
    assert res.returncode == exit_code, (res.returncode, res.stdout, res.stderr)
    assert res.stderr.startswith(f"error: {code}:"), res.stderr


def test_quota_set_get_list_clear_delete(world):
    server, _, peer = world
    res = server.cli("quota", "set", "alice", "edge-tokyo", "--monthly", "4MiB", "--anchor", "2026-01-31T10:00:00Z")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("created quota of alice on edge-tokyo")
    assert "4.0 MiB (4194304 bytes)" in res.stdout and "2026-01-31T10:00:00Z" in res.stdout
    assert peer.wait_update()["state"]["monthly_bytes"] == 4 * MiB

    res = server.cli("quota", "set", "alice", "edge-tokyo", "--monthly", "2TiB", "--format", "json")
    assert res.returncode == 0, res.stderr
    view = json.loads(res.stdout)
    assert set(view) == VIEW_KEYS and view["monthly_bytes"] == 2 * 1024 ** 4 and view["billing_anchor"] == 1769853600

    got = json.loads(server.cli("quota", "get", "alice", "edge-tokyo", "--format", "json", check=True).stdout)
    assert got == view
    text = server.cli("quota", "get", "alice", peer.client_id, check=True).stdout
    assert "exhausted:      no" in text and f"edge-tokyo ({peer.client_id})" in text

    for args in (("quota", "list", "alice"), ("quota", "list", "--client", "edge-tokyo")):
        out = server.cli(*args, check=True).stdout.splitlines()
        assert out[0].split() == ["USER", "CLIENT", "MONTHLY", "USED", "REMAINING", "STATE", "PERIOD_ENDS"]
        assert out[1].split()[:2] == ["alice", "edge-tokyo"] and "2.0 TiB" in out[1]
    assert json.loads(server.cli("quota", "list", "bob", "--format", "json", check=True).stdout) == []
    refused(server.cli("quota", "list"), 2, "usage")

    res = server.cli("quota", "set", "alice", "edge-tokyo", "--monthly", "0")
    assert res.returncode == 0 and "exhausted:      yes, since" in res.stdout
    res = server.cli("quota", "clear", "alice", "edge-tokyo")
    assert res.returncode == 0 and res.stdout.startswith("cleared the period's usage of alice on edge-tokyo")
    assert "exhausted:      yes" in res.stdout  # a quota of 0 stays exhausted after a clear (0 >= 0)

    res = server.cli("quota", "delete", "alice", "edge-tokyo")
    assert res.returncode == 0 and "forwards unmetered" in res.stdout
    assert peer.wait_update(lambda u: u["action"] == "remove")["user_id"] == "alice"
    refused(server.cli("quota", "delete", "alice", "edge-tokyo"), 8, "quota_not_found")


def test_quota_cli_errors_and_exit_codes(world):
    server, alice, _ = world
    refused(server.cli("quota", "set", "alice", "edge-tokyo", "--monthly", "4XB"), 2, "validation.invalid_unit_value")
    refused(server.cli("quota", "set", "alice", "edge-tokyo", "--monthly", "1", "--anchor", "last tuesday"), 2,
            "invalid_billing_anchor")
    refused(server.cli("quota", "set", "nobody", "edge-tokyo", "--monthly", "1"), 3, "quota_target_not_found")
    refused(server.cli("quota", "set", "bob", "edge-tokyo", "--monthly", "1"), 3, "quota_target_not_found")
    refused(server.cli("quota", "get", "bob", "edge-tokyo"), 8, "quota_not_found")
    assert server.cli("quota", "set", "alice", "edge-tokyo", "--monthly", "1M").returncode == 0
    refused(server.cli("quota", "set", "alice", "edge-tokyo", "--monthly", "1M", "--anchor", "0"), 2,
            "invalid_billing_anchor")
    refused(server.cli("quota", "set", "alice", "edge-tokyo", "--monthly", "1M", env={"PORTUNUS_OPERATOR_TOKEN": alice}),
            6, "role_required")
    res = server.cli("quota", "get", "alice", "edge-tokyo", "--format", "json", env={"PORTUNUS_OPERATOR_TOKEN": alice})
    assert res.returncode == 0 and json.loads(res.stdout)["monthly_bytes"] == 1_000_000
    refused(server.cli("quota", "get", "bob", "edge-tokyo", env={"PORTUNUS_OPERATOR_TOKEN": alice}), 6, "not_owner")
    refused(server.cli("quota", "get", "alice", "edge-tokyo", env={"PORTUNUS_OPERATOR_TOKEN": "wrong"}), 7,
            "unauthenticated")


def test_traffic_cli(world):
    server, alice, _ = world
    res = server.cli("traffic", "alice", "--format", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"bucket": "1m", "samples": [], "total_bytes_in": 0, "total_bytes_out": 0}
    res = server.cli("traffic", "--client", "edge-tokyo", "--from", "7d", "--bucket", "1h")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].split() == ["TIME", "(1h)", "IN", "OUT"]
    assert res.stdout.splitlines()[-1] == "total: in 0 B (0 bytes), out 0 B (0 bytes)"
    now = int(time.time())
    assert server.cli("traffic", "--from", str(now - 3600), "--to", "now", "--format", "json").returncode == 0
    assert server.cli("traffic", "alice", "--client", "edge-tokyo", env={"PORTUNUS_OPERATOR_TOKEN": alice}).returncode == 0
    refused(server.cli("traffic", "--from", "8d", "--bucket", "1m"), 3, "quota_bucket_out_of_retention")
    refused(server.cli("traffic", "--from", "soon"), 2, "invalid_time_range")
    refused(server.cli("traffic", "--from", "now", "--to", "1h"), 2, "invalid_time_range")
    refused(server.cli("traffic", "--client", "no-such-client"), 8, "not_found")
    refused(server.cli("traffic", env={"PORTUNUS_OPERATOR_TOKEN": alice}), 6, "role_required")
    res = server.cli("traffic", "--bucket", "5m")
    assert res.returncode == 2 and "invalid choice" in res.stderr
