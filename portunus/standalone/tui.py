"""The edge of `portunus-standalone stats`: the stats socket and curses around the sans-IO dashboard."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from ..errors import PortunusError
from .dashboard import ALERT, DIM, HEADER, SELECTED, TITLE, Dashboard, render, to_ascii

FETCH_TIMEOUT = 2.0


def fetch_snapshot(path: str, timeout: float = FETCH_TIMEOUT) -> dict:
    """One JSON snapshot from a running instance's stats socket; ``io_error`` naming the path otherwise."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    except OSError as exc:
        raise PortunusError("io_error", f"cannot read stats socket {path}: {exc.strerror or exc} "
                                        "(is portunus-standalone running with [stats] socket_path?)") from None
    finally:
        s.close()
    try:
        snap = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        snap = None
    if not isinstance(snap, dict) or not isinstance(snap.get("rules"), list):
        raise PortunusError("io_error", f"stats socket {path} answered with something that is not a stats snapshot")
    return snap


def run_dashboard(path: str, refresh_ms: int) -> int:
    if not sys.stdout.isatty() or not sys.stdin.isatty():
        raise PortunusError("usage", "the live stats view needs a terminal (stdout or stdin is not a TTY); "
                                     "use `stats --once` for one JSON snapshot")
    import curses
    # ncurses prefers exported LINES/COLUMNS over the pty's real size; they are often stale
    os.environ.pop("LINES", None)
    os.environ.pop("COLUMNS", None)
    try:
        return curses.wrapper(_loop, Dashboard(socket_path=path, refresh_ms=refresh_ms))
    except KeyboardInterrupt:
        return 0
    except curses.error as exc:  # e.g. a TERM without a terminfo entry
        raise PortunusError("usage", f"cannot start the live stats view on this terminal ({exc}; "
                                     f"TERM={os.environ.get('TERM', '')!r}); use `stats --once`") from None


def _key_name(curses, ch: int) -> str | None:
    named = {curses.KEY_UP: "up", curses.KEY_DOWN: "down", curses.KEY_HOME: "home", curses.KEY_END: "end",
             curses.KEY_PPAGE: "pgup", curses.KEY_NPAGE: "pgdn", curses.KEY_ENTER: "enter", 10: "enter",
             13: "enter", 27: "esc"}
    if ch in named:
        return named[ch]
    return chr(ch) if 32 <= ch < 127 else None


def _loop(stdscr, dash: Dashboard) -> int:
    import curses
    try:
        curses.curs_set(0)
    except curses.error:
        pass  # a terminal without cursor control still works
    if hasattr(curses, "set_escdelay"):
        curses.set_escdelay(25)  # Esc closes the detail at once, not after ncurses' 1 s default
    styles = _styles(curses)
    unicode_ok = (getattr(sys.stdout, "encoding", "") or "").lower().replace("-", "") == "utf8"
    refresh = dash.refresh_ms / 1000
    next_fetch = 0.0
    while True:
        now = time.monotonic()
        if now >= next_fetch:
            try:
                dash.update(fetch_snapshot(dash.socket_path, min(FETCH_TIMEOUT, max(refresh, 0.5))), now)
            except PortunusError as exc:
                dash.lost(exc.message, now)
            next_fetch = now + refresh
        _draw(stdscr, dash, styles, unicode_ok)
        stdscr.timeout(max(int((next_fetch - time.monotonic()) * 1000), 10))
        ch = stdscr.getch()
        if ch == -1 or ch == curses.KEY_RESIZE:
            continue
        key = _key_name(curses, ch)
        if key is not None and not dash.press(key):
            return 0


def _styles(curses) -> dict:
    styles = {HEADER: curses.A_BOLD, SELECTED: curses.A_REVERSE, DIM: curses.A_DIM, TITLE: curses.A_BOLD,
              ALERT: curses.A_BOLD}
    try:
        if curses.has_colors():
            curses.start_color()
            curses.use_default_colors()
            curses.init_pair(1, curses.COLOR_YELLOW, -1)
            styles[ALERT] = curses.color_pair(1) | curses.A_BOLD
    except curses.error:
        pass
    return styles


def _draw(stdscr, dash: Dashboard, styles: dict, unicode_ok: bool) -> None:
    import curses
    height, width = stdscr.getmaxyx()
    stdscr.erase()
    for y, (text, style) in enumerate(render(dash, width, height)):
        if not unicode_ok:
            text = to_ascii(text)
        try:
            # the last cell of the screen cannot be written without an error; leave it
            stdscr.addstr(y, 0, text[:width - 1 if y == height - 1 else width], styles.get(style, curses.A_NORMAL))
        except curses.error:
            pass
    stdscr.refresh()
