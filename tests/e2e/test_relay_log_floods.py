"""Warnings a peer or the kernel can repeat are rate-limited (issue 8, point 8).

While file descriptors are exhausted the listener backs off every 100 ms; each
back-off used to write a ``proxy.accept_error`` line (2 000 lines in minutes).
Now the first is written at once and the rest are counted into one line with
``suppressed=N`` (written at the latest when the process stops).
"""

from __future__ import annotations

import signal
import socket
import time

from conftest import free_port, wait_until
from peers import TcpEchoServer

EXHAUSTED_FOR = 2.0  # seconds: ~20 back-off periods of 100 ms


def config(listen: int, target: int) -> str:
    return f"""
[global]
log_level = "info"
shutdown_drain_secs = 2
[[rule]]
name = "flooded"
listen_port = {listen}
target = "127.0.0.1:{target}"
"""


def works(listen: int) -> bool:
    try:
        c = socket.create_connection(("127.0.0.1", listen), timeout=2)
        c.settimeout(2)
        c.sendall(b"again")
        ok = c.recv(5) == b"again"
        c.close()
        return ok
    except OSError:
        return False


def exhaust_after(pid: int, sessions: int) -> None:
    """Lower the running relay's fd limit so exactly ``sessions`` more connections fit.

    A forwarded connection costs two descriptors; with an odd number free the last
    accept would succeed and its upstream socket fail instead, so count what is open.
    """
    import os
    import resource
    open_fds = [int(n) for n in os.listdir(f"/proc/{pid}/fd")]
    limit = max(len(open_fds) + 2 * sessions, max(open_fds) + 1)
    limit += (limit - len(open_fds)) % 2
    _soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))


def test_fd_exhaustion_logs_one_accept_error_then_a_suppressed_count(standalone):
    listen, target = free_port(), free_port()
    echo = TcpEchoServer([target])
    p = standalone(config(listen, target))
    exhaust_after(p.p.pid, 10)
    conns = []
    try:
        for _ in range(30):  # 10 fit, the rest wait in the backlog while accept() fails
            conns.append(socket.create_connection(("127.0.0.1", listen), timeout=5))
        p.wait_event("proxy.accept_error", timeout=10)
        time.sleep(EXHAUSTED_FOR)  # the relay keeps hitting EMFILE every back-off period meanwhile
        during = p.events("proxy.accept_error")
        assert len(during) == 1, f"{len(during)} accept_error lines in {EXHAUSTED_FOR} s of exhaustion"
        first = during[0]
        assert first["errno_name"] in ("EMFILE", "ENFILE")
        assert first["rule"] == "flooded" and first["port"] == listen
        assert "suppressed" not in first

        for c in conns:
            c.close()
        conns.clear()
        wait_until(lambda: works(listen), timeout=15, what="relay to serve again after fd exhaustion")

        p.signal(signal.SIGTERM)
        assert p.wait(15) == 0
        lines = p.events("proxy.accept_error")
        assert len(lines) == 2, lines
        summary = lines[1]
        assert summary["rule"] == "flooded" and summary["port"] == listen
        # at least a handful of the ~20 back-offs were counted, not written
        assert summary["suppressed"] >= 5, summary
    finally:
        for c in conns:
            c.close()
        echo.close()
