"""Steps the Web UI browser tests share: moving around the console as a person would, logging in.

``con`` is the module's ``console.Console`` with ``browser`` (a ``webui_browser.Browser``),
``shots`` (where screenshots go) and ``visited`` (every URL the browser was at, for the
no-secret-in-URLs check) attached.
"""

from __future__ import annotations

import socket

import pytest

ADMIN = ("admin", "correct horse battery 1")
STATE: dict = {}  # what one test leaves for the next: the admin's API session, the running agent


def needs_identity(con):
    if not con.identity_routes_present():
        pytest.fail("the identity routes (POST /v1/auth/login …) are not wired in this build")


def go(con, path: str):
    con.browser.get(con.base + path)
    con.browser.find("main")
    con.visited.append(con.browser.driver.current_url)


def shot(con, name: str):
    con.browser.screenshot(con.shots / f"webui-{name}.png")


def rendered(con, path: str, timeout: float = 20.0):
    """Wait until the router drew ``path`` with its data (app.js marks it); a failed render fails at once."""
    b = con.browser

    def done():
        state = b.js("const has = (n) => performance.getEntriesByName(n).some(e => e.detail === arguments[0]);"
                     "return has('portunus:rendered') ? 'ok' : has('portunus:render-failed') ? 'failed' : null;", path)
        assert state != "failed", f"page {path} failed to render: {b.page_text()[-800:]}"
        return state
    b.wait(done, timeout, f"page {path} rendered")
    con.visited.append(b.driver.current_url)


def nav(con, label: str):
    """Click a main-menu link (client-side routing, as a person would)."""
    b = con.browser
    b.js("performance.clearMarks('portunus:rendered')")
    b.click_text(label, "#nav a")


def login_ui(con, user_id: str, password: str):
    b = con.browser
    b.wait(lambda: b.path() == "/login", what="the login page")
    b.set_field("user_id", user_id)
    b.set_field("password", password)
    b.click("main form button[type=submit]")


def logout_ui(con):
    b = con.browser
    b.click("#logout")
    b.wait(lambda: b.path() == "/login", what="logged out")


def admin_api(con):
    from console import ApiSession
    if "admin_api" not in STATE:
        s = ApiSession(con.base)
        s.login(*ADMIN)
        STATE["admin_api"] = s
    return STATE["admin_api"]


def ensure_admin(con):
    """Later tests need the superadmin even when the onboarding test failed early."""
    from console import ApiSession
    needs_identity(con)
    con.secrets.add(ADMIN[1])
    status = ApiSession(con.base).call("GET", "auth/status")[1]
    if status.get("bootstrap_required"):
        ApiSession(con.base).ok("POST", "auth/onboarding", {"setup_token": con.setup_token or con.read_setup_token(),
                                                         "user_id": ADMIN[0], "display_name": "Ada Admin",
                                                         "password": ADMIN[1]})


def ensure_logged_in(con, who=ADMIN):
    b = con.browser
    go(con, "/")
    b.wait(lambda: b.path() in ("/", "/login", "/onboarding", "/password"), what="the first page")
    if b.path() == "/login":
        login_ui(con, *who)
        b.wait(lambda: b.path() == "/", what="the dashboard after login")
    elif b.js("return document.querySelector('.who .user') && document.querySelector('.who .user').textContent") \
            not in (who[0], "Ada Admin"):
        logout_ui(con)
        login_ui(con, *who)
        b.wait(lambda: b.path() == "/", what="the dashboard after login")
    rendered(con, "/")


def echo_roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got
