"""The live `stats` dashboard in a real terminal (tmux), fed by a running standalone (SPEC §7.4, issue 7 point 8).

tmux gives the TUI a real pty of 160x40; `capture-pane -p` is what an operator would see.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import threading
import time

import pytest

from conftest import ROOT, free_port, portunus_cmd, require_tool, wait_until
from peers import TcpEchoServer

UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


class Tmux:
    """A private tmux server (its own socket) holding one session; killed at the end."""

    def __init__(self, tmp_path, command: list[str]):
        self.binary = require_tool("tmux")
        self.socket = str(tmp_path / "tmux.sock")
        self.rc_file = tmp_path / "tui.rc"
        shell = f"{shlex.join(command)}; echo $? > {shlex.quote(str(self.rc_file))}; sleep 60"
        self._tmux("new-session", "-d", "-x", "160", "-y", "40", "-s", "tui", "-c", str(ROOT), shell)

    def _tmux(self, *args) -> str:
        r = subprocess.run([self.binary, "-S", self.socket, "-f", "/dev/null", *args], capture_output=True, text=True,
                           timeout=10, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"tmux {args[0]}: {r.stderr}"
        return r.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "tui")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "tui", *keys)

    def wait_screen(self, pred, what: str, timeout: float = 15.0) -> str:
        box = {}

        def check():
            box["screen"] = self.screen()
            return pred(box["screen"])
        try:
            wait_until(check, timeout=timeout, interval=0.1, what=what)
        except AssertionError:
            raise AssertionError(f"timed out waiting for {what}; screen:\n{box.get('screen')}") from None
        return box["screen"]

    def exit_code(self) -> int | None:
        text = self.rc_file.read_text().strip() if self.rc_file.exists() else ""
        return int(text) if text else None

    def close(self) -> None:
        subprocess.run([self.binary, "-S", self.socket, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def tmux(tmp_path):
    started = []

    def start(command):
        t = Tmux(tmp_path, command)
        started.append(t)
        return t
    yield start
    for t in started:
        t.close()


def rule_row(screen: str, name: str) -> dict | None:
    """The dashboard row of rule `name` parsed into its columns, or None when it is not on screen."""
    for line in screen.splitlines():
        m = re.match(rf"^[> ]{re.escape(name)} +(\w+) +(\S+) +(\S+) +(\w+) +(\d+) +([\d.]+ \w+) +([\d.]+ \w+) +"
                     r"(\S+(?: \S+/s)?) +(\S+(?: \S+/s)?) *$", line)
        if m:
            proto, listen, target, state, live, b_in, b_out, r_in, r_out = m.groups()
            return {"protocol": proto, "listen": listen, "target": target, "state": state, "live": int(live),
                    "bytes_in": to_bytes(b_in), "bytes_out": to_bytes(b_out), "rate_in": rate(r_in),
                    "rate_out": rate(r_out)}
    return None


def to_bytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * UNITS[unit]


def rate(text: str) -> float | None:
    return None if text == "-" else to_bytes(text.removesuffix("/s"))


class Pusher:
    """Sends `total` bytes through the rule at about `per_sec`, reading the echo back."""

    def __init__(self, port: int, total: int, per_sec: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sent = self.received = 0
        self.total, self.per_sec = total, per_sec
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._recv, daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        chunk = b"x" * 32768
        start = time.monotonic()
        while self.sent < self.total:
            self.sock.sendall(chunk)
            self.sent += len(chunk)
            ahead = self.sent / self.per_sec - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)  # pacing the transfer, not waiting for a result

    def _recv(self) -> None:
        while self.received < self.total:
            b = self.sock.recv(65536)
            if not b:
                break
            self.received += len(b)

    def close(self) -> None:
        for t in self.threads:
            t.join(30)
        self.sock.close()


def config(sock: str, listen: int, target: int) -> str:
    return f"""
[global]
label = "tui-e2e"
[stats]
socket_path = "{sock}"
refresh_ms = 250
[[rule]]
name = "bulk"
listen_port = {listen}
target = "127.0.0.1:{target}"
[[rule]]
name = "idle"
protocol = "udp"
listen_port = {listen}
target = "127.0.0.1:{free_port()}"
"""


def test_dashboard_shows_live_traffic_detail_and_survives_a_restart(standalone, tmux, tmp_path):
    listen, target = free_port(), free_port()
    sock = str(tmp_path / "stats.sock")
    echo = TcpEchoServer([target])
    text = config(sock, listen, target)
    sa = standalone(text)
    pushers = []
    try:
        tui = tmux(portunus_cmd("standalone") + ["stats", "--config", str(sa.config_path)])
        screen = tui.wait_screen(lambda s: rule_row(s, "bulk") and "connected" in s, "the rule rows")
        row = rule_row(screen, "bulk")
        assert row["protocol"] == "tcp" and row["listen"] == f"*:{listen}" and row["target"] == f"127.0.0.1:{target}"
        assert row["state"] == "active" and row["bytes_in"] == 0
        assert rule_row(screen, "idle")["protocol"] == "udp"
        assert "TOTAL" in screen and "2 rules" in screen

        # ~8 MB over ~5 s: counters rise between two screens and the live rates are not zero
        pushers.append(Pusher(listen, 8 << 20, 1536 << 10))
        first = rule_row(tui.wait_screen(lambda s: (rule_row(s, "bulk") or {}).get("bytes_in", 0) > 0,
                                         "bytes counted"), "bulk")

        def rising_with_rates(screen: str) -> bool:
            row = rule_row(screen, "bulk") or {}
            return row.get("bytes_in", 0) > first["bytes_in"] and (row.get("rate_in") or 0) > 0 \
                and (row.get("rate_out") or 0) > 0
        row = rule_row(tui.wait_screen(rising_with_rates, "rising counters and live rates"), "bulk")
        assert row["live"] == 1
        assert row["bytes_out"] > 0

        tui.keys("Enter")
        detail = tui.wait_screen(lambda s: "rule 'bulk'" in s and "PORT" in s, "the per-port detail")
        port_line = [line for line in detail.splitlines() if line.split()[:1] == [str(listen)]]
        assert port_line, detail
        assert any(line.startswith(f"127.0.0.1:{target} ") and "healthy" in line for line in detail.splitlines())
        pushers.pop().close()

        # the standalone process goes away and comes back: the view says so, then shows data again
        sa.kill()
        tui.wait_screen(lambda s: "reconnecting" in s, "reconnecting")
        assert tui.exit_code() is None, "the dashboard must survive the restart"
        sa = standalone(text)
        tui.wait_screen(lambda s: "reconnecting" not in s and (rule_row(s, "bulk") or {}).get("bytes_in") == 0,
                        "fresh counters after the restart")
        pushers.append(Pusher(listen, 1 << 20, 1 << 20))
        tui.wait_screen(lambda s: (rule_row(s, "bulk") or {}).get("bytes_in", 0) > 0, "data again")
        pushers.pop().close()

        tui.keys("q")
        wait_until(lambda: tui.exit_code() is not None, timeout=10, what="the dashboard to quit")
        assert tui.exit_code() == 0
    finally:
        for p in pushers:
            p.sock.close()
        echo.close()


def test_live_view_without_a_terminal_says_so_and_suggests_once(tmp_path):
    r = subprocess.run(portunus_cmd("standalone") + ["stats", "--socket", str(tmp_path / "none.sock")],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith("error: usage: the live stats view needs a terminal") and "--once" in r.stderr


def test_a_terminal_curses_cannot_drive_is_a_usage_error_not_a_traceback(tmux, tmp_path):
    tui = tmux(["env", "TERM=no-such-terminal"] + portunus_cmd("standalone")
               + ["stats", "--socket", str(tmp_path / "none.sock")])
    wait_until(lambda: tui.exit_code() is not None, timeout=20, what="the command to exit")
    assert tui.exit_code() == 2
    screen = tui.screen()
    assert "error: usage: cannot start the live stats view" in screen and "Traceback" not in screen
