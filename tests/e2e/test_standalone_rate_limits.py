"""`[rule.rate_limit]` in the standalone TOML: the same validator as the API, enforced, and the
stats socket / TUI show the throttling."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest

from conftest import free_port, portunus_cmd, rule_stats, wait_until
from peers import TcpEchoServer
from portunus.standalone.dashboard import Dashboard, render

KiB = 1024


def config(listen: int, target: int, sock: str, caps: str) -> str:
    return f"""
[global]
log_level = "info"
shutdown_drain_secs = 1
[stats]
socket_path = "{sock}"
[[rule]]
name = "capped"
listen_port = {listen}
target = "127.0.0.1:{target}"
[rule.rate_limit]
{caps}
"""


def check(cfg) -> subprocess.CompletedProcess:
    return subprocess.run(portunus_cmd("standalone") + ["--config", str(cfg), "--check"],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("caps,code,needle", [
    ("bandwidth_in_bps = 0", "validation.rate_limit_cap_zero", "bandwidth_in_bps"),
    ("bandwidth_in_burst = 100", "validation.rate_limit_burst_without_rate", "bandwidth_in_burst"),
    ("bandwidth_out_bps = 1000\nbandwidth_out_burst = 9", "validation.rate_limit_burst_range", "[10, 60000]"),
    ("", "validation.rate_limit_no_caps_provided", "no caps"),
])
def test_a_bad_rate_limit_table_is_refused_with_the_api_code(tmp_path, caps, code, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(config(free_port(), free_port(), str(tmp_path / "s.sock"), caps))
    r = check(cfg)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    assert code in r.stderr and needle in r.stderr and "'capped'" in r.stderr


def test_caps_are_enforced_and_the_stats_socket_and_tui_show_throttling(standalone, tmp_path):
    listen, target = free_port(), free_port()
    echo = TcpEchoServer([target])
    sock = str(tmp_path / "stats.sock")
    p = standalone(config(listen, target, sock, "bandwidth_out_bps = 131072\nconcurrent_connections = 1"))
    try:
        c = socket.create_connection(("127.0.0.1", listen), timeout=10)
        payload = b"t" * (512 * KiB)
        got = {"n": 0}

        def read():
            while got["n"] < len(payload):
                b = c.recv(65536)
                if not b:
                    return
                got["n"] += len(b)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        c.sendall(payload)
        # 128 KiB burst, then 128 KiB/s: the way back is held for ~3 s
        snap = wait_until(lambda: (lambda r: r if r["rate_limit"]["throttling"] else None)(
            rule_stats(sock, "capped")), what="throttling shown on the stats socket")
        assert snap["caps"] == {"bandwidth_out_bps": 131072, "concurrent_connections": 1}
        dash = Dashboard(sock, 1000)
        dash.update({"label": "x", "rules": [snap]}, time.monotonic())
        dash.detail = True
        screen = "\n".join(text for text, _ in render(dash, 200, 40))
        assert "throttle" in screen and "caps ↓- ↑128.0 KiB/s ≤1" in screen and "throttling out now" in screen
        # the concurrency cap: a second connection is reset at once
        # (on loopback the reset can already meet connect() itself)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            second = socket.create_connection(("127.0.0.1", listen), timeout=5)
            try:
                second.sendall(b"x")
                assert second.recv(1) == b""
            finally:
                second.close()
        reader.join(15)
        assert got["n"] == len(payload)
        stats = rule_stats(sock, "capped")["rate_limit"]
        assert stats["throttle_seconds"]["out"] >= 1.5 and stats["rejects"]["conn_concurrent"] == 1
        c.close()
        assert not p.events("proxy.splice_selected")
    finally:
        echo.close()
