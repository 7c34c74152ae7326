"""Independent clients (socat) through the relay, so we are not only testing ourselves."""

from __future__ import annotations

import hashlib
import os
import subprocess

from conftest import free_port, require_tool
from peers import TcpEchoServer, UdpEchoServer


def _config(tcp_listen, tcp_target, udp_listen, udp_target) -> str:
    return f"""
[global]
shutdown_drain_secs = 1
[[rule]]
name = "tcp"
listen_port = {tcp_listen}
target = "127.0.0.1:{tcp_target}"
[[rule]]
name = "udp"
protocol = "udp"
listen_port = {udp_listen}
target = "127.0.0.1:{udp_target}"
"""


def test_socat_tcp_and_udp_clients(standalone, tmp_path):
    socat = require_tool("socat")
    tl, tt, ul, ut = free_port(), free_port(), free_port(), free_port()
    tcp_echo = TcpEchoServer([tt])
    udp_echo = UdpEchoServer([ut], prefix_port=False)
    try:
        standalone(_config(tl, tt, ul, ut))
        payload = os.urandom(2 << 20)
        out = subprocess.run([socat, "-t", "5", "-T", "10", "-", f"TCP:127.0.0.1:{tl}"],
                             input=payload, capture_output=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert hashlib.sha256(out.stdout).hexdigest() == hashlib.sha256(payload).hexdigest()

        out = subprocess.run([socat, "-t", "2", "-T", "3", "-", f"UDP:127.0.0.1:{ul}"],
                             input=b"hello over udp", capture_output=True, timeout=30)
        assert out.stdout == b"hello over udp", out.stderr
    finally:
        tcp_echo.close()
        udp_echo.close()
