"""The Web UI in a real headless Chromium against a real server, a real enrolled client and real bytes.

One server and one browser for the module (the suite must stay around two minutes); the tests
run in file order and build on each other the way an operator would: onboarding, login, enroll,
push, watch, remove, then users/grants/tenants, settings, CSRF, storage, a phone-sized screen.
Screenshots of every page go to $PORTUNUS_WEBUI_SHOTS (docs/img/ for the docs) or a temp dir.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import IN_CI, free_port_block, require_tool  # noqa: E402
from peers import TcpEchoServer  # noqa: E402
from webui_steps import (ADMIN, STATE, admin_api, echo_roundtrip, ensure_admin, ensure_logged_in, go,  # noqa: E402
                         login_ui, logout_ui, nav, needs_identity, rendered, shot)

ALICE = ("alice", "alice-initial-pass-1")
BOB = ("bob", "bob-initial-password-1")


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    require_tool("chromium")
    require_tool("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("selenium is not installed (requirements-dev.txt)")
        pytest.skip("selenium is not installed")
    from console import Console
    from webui_browser import Browser

    con = Console(tmp_path_factory.mktemp("webui") / "data")
    shots = Path(os.environ.get("PORTUNUS_WEBUI_SHOTS") or tmp_path_factory.mktemp("shots"))
    browser = Browser(1280, 900, download_dir=tmp_path_factory.mktemp("downloads"))
    con.browser, con.shots, con.visited = browser, shots, []
    try:
        yield con
    finally:
        browser.quit()
        con.close()


# ---------------------------------------------------------------- static files, before anyone logs in

def test_ui_files_carry_the_security_headers_and_are_never_cached_stale(console):
    host, port = console.base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/")
    index = conn.getresponse().read().decode()
    conn.close()
    assets = index.split('src="', 1)[1].split("/js/app.js", 1)[0]
    assert assets.startswith("/assets/")
    for path, ctype in (("/", "text/html"), (f"{assets}/js/app.js", "text/javascript"), (f"{assets}/style.css", "text/css"),
                        (f"{assets}/i18n/zh-CN.json", "application/json"), ("/rules/01ABCDEF", "text/html")):
        for method in ("GET", "HEAD"):
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request(method, path)
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            assert resp.status == 200, (method, path)
            assert resp.getheader("Content-Type").startswith(ctype)
            csp = resp.getheader("Content-Security-Policy")
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
            assert resp.getheader("X-Content-Type-Options") == "nosniff"
            assert resp.getheader("Referrer-Policy") == "no-referrer"
            # the page itself is never stale; its versioned files may be kept for good
            versioned = path.startswith("/assets/")
            assert resp.getheader("Cache-Control") == ("public, max-age=31536000, immutable" if versioned else "no-cache")
            assert (body == b"") == (method == "HEAD")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/v1/auth/status")
    resp = conn.getresponse()
    assert "json" in resp.getheader("Content-Type") and resp.getheader("Cache-Control") == "no-store"
    assert "bootstrap_required" in json.loads(resp.read())
    conn.close()


def test_first_visit_shows_onboarding_without_csp_violations(console):
    b = console.browser
    go(console, "/")
    b.wait(lambda: b.path() == "/onboarding", what="the onboarding page")
    b.find('[data-field="setup_token"] input')
    shot(console, "onboarding")
    assert b.csp_violations() == []
    assert b.script_errors() == []
    for el in b.finds("main input, main select"):  # every input has a label tied to it
        assert b.js("return arguments[0].labels.length", el) >= 1


# ---------------------------------------------------------------- the operator's path

def test_onboard_login_enroll_run_push_watch_remove(console, tmp_path):
    needs_identity(console)
    b = console.browser
    token = console.read_setup_token()
    console.secrets.add(ADMIN[1])
    # onboarding: a wrong token is refused inline, the right one creates the superadmin and logs in
    go(console, "/onboarding")
    b.set_field("setup_token", "not-the-token")
    b.set_field("user_id", ADMIN[0])
    b.set_field("display_name", "Ada Admin")
    b.set_field("password", ADMIN[1])
    b.set_field("password_repeat", ADMIN[1])
    b.click("main form button[type=submit]")
    b.wait(lambda: "setup_token" in b.field_error("setup_token"), what="the bad setup token shown on its field")
    b.set_field("setup_token", token)
    b.click("main form button[type=submit]")
    b.wait(lambda: b.path() == "/", what="the dashboard after onboarding")
    rendered(console, "/")
    assert "Ada Admin" in b.find(".who").text
    # log out and back in through the login page
    logout_ui(console)
    login_ui(console, ADMIN[0], "wrong password here")
    b.wait(lambda: "invalid_login" in b.find("main .form-error").text, what="invalid_login shown")
    shot(console, "login")
    login_ui(console, *ADMIN)
    b.wait(lambda: b.path() == "/", what="the dashboard after login")
    rendered(console, "/")

    # enroll a client: the one-time command, its copy button and the countdown
    nav(console, "Clients")
    rendered(console, "/clients")
    b.set_field("name", "edge-ui")
    b.click("#enroll-form button[type=submit]")
    command = b.find("#enroll-command").text
    assert command.startswith("portunus-client enroll 'portunus://") and "code=" in command
    assert "Expires in" in b.find("#enroll-countdown").text
    shot(console, "clients-enroll")
    agent = console.run_client(command, tmp_path, "edge-ui")
    b.wait(lambda: "connected" in b.find('tr[data-client-name="edge-ui"]').text, 15, "edge-ui connected in the list")
    shot(console, "clients")

    # push a rule in the form, to a real echo server
    listen, target = free_port_block(1), free_port_block(1)
    echo = TcpEchoServer([target])
    try:
        nav(console, "Rules")
        rendered(console, "/rules")
        b.click("#push-panel summary")
        from selenium.webdriver.support.ui import Select
        Select(b.field("client")).select_by_visible_text("edge-ui")
        b.set_field("listen", str(listen))
        b.set_field("target_host_0", "127.0.0.1")
        b.set_field("target_port_0", str(target))
        shot(console, "rules-push-form")
        b.click("#rule-form button[type=submit]")
        b.wait_text("#flash", f"Rule on port {listen} is active", 15)
        row = b.wait(lambda: [r for r in b.finds("#rules-list tbody tr") if f"{listen}" in r.text], what="the new row")[0]
        assert "active" in row.text and f"127.0.0.1:{target}" in row.text
        shot(console, "rules")

        # the rule page: streaming, and the counters rise with real bytes through the rule
        b.js("performance.clearMarks('portunus:rendered')")
        b.press(row.find_element("css selector", "a"))
        b.wait(lambda: b.path().startswith("/rules/"), what="the rule page")
        console.visited.append(b.driver.current_url)
        b.wait(lambda: b.find("#stream-mode").get_attribute("data-mode") == "streaming", 15, "Streaming")
        assert echo_roundtrip(listen, b"x" * 200_000) == b"x" * 200_000
        b.wait(lambda: b.find("#stat-bytes-in").text.startswith(("195", "196", "200")) or
               "KiB" in b.find("#stat-bytes-in").text, 15, "bytes in to rise")
        assert b.find("#stream-mode").get_attribute("data-mode") == "streaming"
        first = b.find("#stat-bytes-out").text
        assert echo_roundtrip(listen, b"y" * 300_000) == b"y" * 300_000
        b.wait(lambda: b.find("#stat-bytes-out").text != first, 15, "bytes out to rise again")
        assert "healthy" in b.find("#per-target").text
        shot(console, "rule-detail")

        # remove, with confirmation; the list no longer has it
        b.click_text("Remove", "main .title-row button")
        b.click_text("Remove", "dialog.modal button")
        b.wait(lambda: b.path() == "/rules", what="back on the rules list")
        b.wait(lambda: all(f":{listen}" not in r.text and f"{listen}" != r.text.split()[0]
                           for r in b.finds("#rules-list tbody tr")), what="the row gone")
        b.wait_text("#flash", f"Rule on port {listen} removed")
        with pytest.raises(OSError):
            echo_roundtrip(listen, b"gone")
        go(console, "/")
        rendered(console, "/")
        shot(console, "dashboard")
        assert b.csp_violations() == [] and b.script_errors() == []
    finally:
        echo.close()
    STATE["agent"] = agent


def test_form_errors_from_the_server_land_on_their_field(console, tmp_path):
    ensure_admin(console)
    b = console.browser
    ensure_logged_in(console)
    if "agent" not in STATE:
        res = admin_api(console).ok("POST", "client-enrollments", {"name": "edge-ui"})
        STATE["agent"] = console.run_client(res["command"], tmp_path, "edge-ui")
    go(console, "/rules?new")
    rendered(console, "/rules")
    from selenium.webdriver.support.ui import Select
    Select(b.field("client")).select_by_visible_text("edge-ui")
    b.set_field("listen", "70000")
    b.set_field("target_host_0", "127.0.0.1")
    b.set_field("target_port_0", "9")
    b.click("#rule-form button[type=submit]")
    b.wait(lambda: "70000" in b.field_error("listen"), what="the listen error inline")
    assert b.field("listen").get_attribute("aria-invalid") == "true"
    shot(console, "rules-form-error")
    # PROXY protocol on a UDP rule: the error names the PROXY field
    b.set_field("listen", str(free_port_block(1)))
    Select(b.field("protocol")).select_by_value("udp")
    Select(b.field("target_proxy_0")).select_by_value("v2")
    b.click("#rule-form button[type=submit]")
    b.wait(lambda: "proxy_protocol" in b.field_error("target_proxy_0"), what="the PROXY error inline")
    assert b.field_error("listen") == ""
    # client-side: an empty host is caught before the request
    Select(b.field("target_proxy_0")).select_by_value("")
    b.set_field("target_host_0", "")
    b.click("#rule-form button[type=submit]")
    b.wait(lambda: b.field_error("target_host_0") != "", what="the empty host flagged")

    # settings: a bad advertised endpoint is refused with the 422 message under the field
    nav(console, "Settings")
    rendered(console, "/settings")
    b.set_field("override", "https://portunus.example.com:7443/x")
    b.click("#endpoint-panel button[type=submit]")
    b.wait(lambda: "endpoint_invalid" in b.field_error("override", "#endpoint-panel"), what="endpoint_invalid inline")
    b.set_field("override", "not-in-the-cert.example.com:7443")
    b.click("#endpoint-panel button[type=submit]")
    b.wait(lambda: "endpoint_not_in_cert_san" in b.field_error("override", "#endpoint-panel"), what="SAN error inline")
    b.set_field("override", "127.0.0.1:7443")
    b.click("#endpoint-panel button[type=submit]")
    b.wait(lambda: b.find("#endpoint-effective").text == "127.0.0.1:7443", what="the override saved")
    b.click("#endpoint-clear")
    b.wait(lambda: b.find("#endpoint-effective").text != "127.0.0.1:7443", what="the override cleared")


def test_users_grants_reset_and_tenant_isolation(console):
    from console import ApiSession
    ensure_admin(console)
    b = console.browser
    ensure_logged_in(console)
    console.secrets.update({ALICE[1], BOB[1]})
    nav(console, "Users")
    rendered(console, "/users")
    for user_id, password in (ALICE, BOB):
        b.set_field("user_id", user_id, "#user-form")
        b.set_field("display_name", user_id.title(), "#user-form")
        b.set_field("password", password, "#user-form")
        b.click("#user-form button[type=submit]")
        b.wait(lambda: any(user_id == r.text.split()[0] for r in b.finds("#users-list tbody tr")), what=f"{user_id} listed")
    b.set_field("user_id", "x", "#user-form")
    b.set_field("password", "short", "#user-form")
    b.click("#user-form button[type=submit]")
    b.wait(lambda: "password" in b.field_error("password", "#user-form"), what="password_too_short inline")

    clients = admin_api(console).ok("GET", "clients")["clients"]
    edge = next(c for c in clients if c["client_name"] == "edge-ui" and not c["revoked"])
    base_a, base_b = free_port_block(10), free_port_block(10)
    from selenium.webdriver.support.ui import Select
    for user_id, base in (("alice", base_a), ("bob", base_b)):
        row = next(r for r in b.finds("#users-list tbody tr") if r.text.split()[0] == user_id)
        b.click_text("Grants", "button", scope=row)
        panel = b.find(f"#grants-{user_id}")
        Select(b.find(f"#grants-{user_id} [data-field=client] select")).select_by_visible_text("edge-ui")
        b.set_field("listen_port_start", str(base), f"#grants-{user_id}")
        b.set_field("listen_port_end", str(base + 9), f"#grants-{user_id}")
        b.click(f"#grants-{user_id} form button[type=submit]")
        b.wait(lambda: f"{base}–{base + 9}" in b.find(f"#grants-{user_id} table").text, what=f"{user_id}'s grant")
        assert panel.is_displayed()
    shot(console, "users")

    # disable bob from the list (PATCH users/bob), then enable him again
    def bob_row():
        return next(r for r in b.finds("#users-list tbody tr") if r.text.split()[0] == "bob")
    b.click_text("Disable", "button", scope=bob_row())
    b.wait(lambda: "disabled" in bob_row().text and "Enable" in bob_row().text, what="bob shown disabled")
    assert admin_api(console).ok("GET", "users/bob")["disabled"] is True
    b.click_text("Enable", "button", scope=bob_row())
    b.wait(lambda: "Disable" in bob_row().text, what="bob shown enabled")
    assert admin_api(console).ok("GET", "users/bob")["disabled"] is False

    # bob pushes over the API with his own session
    bob = ApiSession(console.base)
    bob.login(*BOB)
    bob_rule = bob.ok("POST", "rules", {"client": edge["client_id"], "listen_port": base_b + 1,
                                        "target": "127.0.0.1:9"})
    # the superadmin resets alice's password: shown once; alice must change it at her next login
    row = next(r for r in b.finds("#users-list tbody tr") if r.text.split()[0] == "alice")
    b.click_text("Reset password", "button", scope=row)
    b.click_text("Reset password", "dialog.modal button")
    temp = b.find("#password-reveal code").text
    assert len(temp) >= 12
    console.secrets.add(temp)
    logout_ui(console)
    login_ui(console, "alice", temp)
    b.wait(lambda: b.path() == "/password", what="the forced password change")
    assert b.find("#password-forced").is_displayed()
    shot(console, "password-forced")
    b.set_field("current_password", temp)
    b.set_field("new_password", ALICE[1])
    b.set_field("password_repeat", ALICE[1])
    b.click("main form button[type=submit]")
    b.wait(lambda: b.path() == "/", what="the dashboard after the change")
    rendered(console, "/")

    # alice's console: her menu has no admin pages; she pushes in the form and sees only her rule
    links = [a.text for a in b.finds("#nav a")]
    assert "Users" not in links and "Audit" not in links and "Metrics" not in links and "Rules" in links
    nav(console, "Rules")
    rendered(console, "/rules")
    b.click("#push-panel summary")
    Select(b.field("client")).select_by_visible_text("edge-ui")
    b.set_field("listen", str(base_b + 2))  # bob's ports: refused on the listen field
    b.set_field("target_host_0", "127.0.0.1")
    b.set_field("target_port_0", "9")
    b.click("#rule-form button[type=submit]")
    b.wait(lambda: "port_outside_grant" in b.field_error("listen"), what="port_outside_grant inline")
    b.set_field("listen", str(base_a + 1))
    b.click("#rule-form button[type=submit]")
    b.wait_text("#flash", f"Rule on port {base_a + 1} is active", 15)
    b.wait(lambda: len(b.finds("#rules-list tbody tr")) == 1, what="one rule listed")
    text = b.find("#rules-list").text
    assert str(base_a + 1) in text and str(base_b + 1) not in text and "alice" in text
    shot(console, "rules-tenant")
    for path in ("/users", "/audit", "/metrics"):
        go(console, path)
        b.wait_text("main h1", "Not allowed")
    assert b.js_async("fetch('/v1/users').then(r => r.json().then(j => arguments[0]([r.status, j.error.code])))") == \
        [403, "role_required"]
    status = b.js_async(f"fetch('/v1/rules/{bob_rule['rule_id']}').then(r => arguments[0](r.status))")
    assert status in (403, 404)
    go(console, "/clients")
    rendered(console, "/clients")
    assert b.finds("#enroll-form") == [] and "Revoke" not in b.find("#clients-list").text

    # back to the superadmin: deleting bob previews the rule it removes
    logout_ui(console)
    login_ui(console, *ADMIN)
    b.wait(lambda: b.path() == "/", what="admin again")
    nav(console, "Users")
    rendered(console, "/users")
    row = next(r for r in b.finds("#users-list tbody tr") if r.text.split()[0] == "bob")
    b.click_text("Delete", "button", scope=row)
    assert str(base_b + 1) in b.find("#delete-preview").text
    b.click_text("Delete", "dialog.modal button")
    b.wait_text("#flash", "bob deleted; 1 rule(s) removed")


def test_an_expired_session_lands_on_login_with_a_notice(console):
    ensure_admin(console)
    b = console.browser
    ensure_logged_in(console)
    b.driver.delete_cookie("portunus_session")
    if b.path() != "/login":  # the dashboard's own refresh may already have met the 401
        b.js("history.pushState(null, '', '/rules'); dispatchEvent(new PopStateEvent('popstate'))")
    b.wait(lambda: b.path() == "/login", what="back on the login page")
    assert "expired" in b.find("#session-expired").text
    login_ui(console, *ADMIN)
    b.wait(lambda: b.path() == "/", what="logged in again")


def test_theme_and_language_survive_a_reload(console):
    ensure_admin(console)
    b = console.browser
    ensure_logged_in(console)
    nav(console, "Settings")
    rendered(console, "/settings")
    from selenium.webdriver.support.ui import Select
    Select(b.find("#theme-select")).select_by_value("dark")
    Select(b.find("#language-select")).select_by_value("zh-CN")
    b.wait_text("main h1", "设置")
    shot(console, "settings-dark-zh")
    b.driver.refresh()
    b.wait_text("main h1", "设置")
    assert b.js("return document.documentElement.dataset.theme") == "dark"
    assert b.js("return document.documentElement.lang") == "zh-CN"
    assert "仪表盘" in b.find("#nav").text
    bg = b.js("return getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(15, 20, 27)"
    go(console, "/rules")
    rendered(console, "/rules")
    shot(console, "rules-dark-zh")
    go(console, "/settings")
    Select(b.find("#language-select")).select_by_value("en")
    b.wait_text("main h1", "Settings")
    Select(b.find("#theme-select")).select_by_value("light")
    assert b.js("return document.documentElement.dataset.theme") == "light"


def test_a_cookie_write_without_the_csrf_header_fails(console):
    ensure_admin(console)
    b = console.browser
    ensure_logged_in(console)
    script = """
      const [headers, done] = [arguments[0], arguments[1]];
      fetch('/v1/client-enrollments', {method: 'POST', credentials: 'same-origin', headers,
        body: JSON.stringify({name: 'csrf-probe'})})
        .then(r => r.json().then(j => done([r.status, (j.error || {}).code || null])));
    """
    assert b.js_async(script, {"Content-Type": "application/json"}) == [403, "csrf_header_required"]
    assert b.js_async(script, {"X-Portunus-CSRF": "1", "Content-Type": "text/plain"})[0] == 403
    assert b.js_async(script, {"X-Portunus-CSRF": "1", "Content-Type": "application/json"}) == [201, None]


def test_audit_and_metrics_pages(console):
    ensure_admin(console)
    b = console.browser
    ensure_logged_in(console)
    nav(console, "Audit")
    rendered(console, "/audit")
    assert "POST" in b.find("#audit-list").text
    from selenium.webdriver.support.ui import Select
    Select(b.find("main select")).select_by_value("deny")
    b.wait(lambda: b.finds("#audit-list tbody tr") and all("deny" in r.text for r in b.finds("#audit-list tbody tr")),
           what="only denials")
    shot(console, "audit")
    if b.find("#audit-earlier", visible=False).is_displayed():
        before = len(b.finds("#audit-list tbody tr"))
        b.click("#audit-earlier")
        b.wait(lambda: len(b.finds("#audit-list tbody tr")) > before, what="earlier rows")
    b.click("#audit-download")
    path = b.wait(lambda: next(iter(b.download_dir.glob("*.ndjson")), None), what="the NDJSON download")
    b.wait(lambda: path.stat().st_size > 0, what="the download written")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows and all(r["outcome"] == "deny" for r in rows)
    nav(console, "Metrics")
    rendered(console, "/metrics")
    assert "# TYPE portunus_" in b.find("#metrics-text").text
    shot(console, "metrics")


def test_client_rename_reenroll_revoke_show_revoked_delete(console):
    import re
    ensure_admin(console)
    b = console.browser
    ensure_logged_in(console)
    admin_api(console).ok("POST", "client-enrollments", {"name": "edge-spare"})
    go(console, "/clients")
    rendered(console, "/clients")
    row = lambda name: b.find(f'tr[data-client-name="{name}"]')  # noqa: E731
    b.click_text("Rename", "button", scope=row("edge-spare"))
    b.set_field("name", "edge-spare-2", "dialog.modal")
    b.click("dialog.modal button[type=submit]")
    b.wait(lambda: b.finds('tr[data-client-name="edge-spare-2"]'), what="the renamed row")
    b.click_text("Re-enroll", "button", scope=row("edge-spare-2"))
    command = b.find("#enroll-command").text
    assert "edge-spare-2" in b.find("#enroll-reveal h2").text and "code=" in command
    console.secrets.add(re.search(r"code=([^&']+)", command).group(1))
    b.click_text("Revoke", "button", scope=row("edge-spare-2"))
    b.click_text("Revoke", "dialog.modal button")
    b.wait(lambda: not b.finds('tr[data-client-name="edge-spare-2"]'), what="a revoked client hidden")
    b.click("#show-revoked")
    b.wait(lambda: "revoked" in row("edge-spare-2").text, what="the revoked client shown")
    b.click_text("Delete", "button", scope=row("edge-spare-2"))
    b.click_text("Delete", "dialog.modal button")
    b.wait(lambda: not b.finds('tr[data-client-name="edge-spare-2"]'), what="the deleted client gone")
    assert b.finds('tr[data-client-name="edge-ui"]')


def test_storage_and_urls_hold_no_secret_after_a_full_session(console):
    ensure_admin(console)
    b = console.browser
    ensure_logged_in(console)
    local = b.js("return Object.fromEntries(Object.entries(localStorage))")
    assert set(local) <= {"portunus.theme", "portunus.lang"}
    assert b.js("return sessionStorage.length") == 0
    assert "portunus_session" not in b.js("return document.cookie")  # HttpOnly
    cookie = b.driver.get_cookie("portunus_session")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    urls = console.visited + b.js("return performance.getEntriesByType('resource').map(e => e.name)") + \
        b.js("return performance.getEntriesByType('navigation').map(e => e.name)")
    assert len(console.secrets) >= 2
    for secret in console.secrets:
        for url in urls:
            assert secret not in url, f"a secret in {url}"
        for value in local.values():
            assert secret not in value


def test_a_populated_console_shows_every_badge_state_and_alert(console):
    """Ranges, UDP, failover with PROXY and health checks, a failed rule: the list, the rule page, the dashboard."""
    ensure_admin(console)
    b = console.browser
    ensure_logged_in(console)
    api = admin_api(console)
    edge = next(c for c in api.ok("GET", "clients")["clients"] if c["client_name"] == "edge-ui" and not c["revoked"])
    rng, udp, multi, taken = free_port_block(100), free_port_block(1), free_port_block(1), free_port_block(1)
    live, dead = free_port_block(1), free_port_block(1)
    echo = TcpEchoServer([live])
    blocker = socket.socket()
    blocker.bind(("0.0.0.0", taken))
    blocker.listen()
    try:
        api.ok("POST", "rules", {"client": edge["client_id"], "listen": f"{rng}-{rng + 99}",
                                 "target": f"10.0.0.5:{40000}-{40099}"})
        api.ok("POST", "rules", {"client": edge["client_id"], "listen_port": udp, "target": "127.0.0.1:53",
                                 "protocol": "udp"})
        rule = api.ok("POST", "rules", {"client": edge["client_id"], "listen_port": multi, "health_check_interval_secs": 1,
                                        "targets": [{"host": "127.0.0.1", "port": dead, "priority": 1},
                                                    {"host": "127.0.0.1", "port": live, "priority": 2,
                                                     "proxy_protocol": "v2"}]})
        status, failed = api.call("POST", "rules", {"client": edge["client_id"], "listen_port": taken,
                                                    "target": "127.0.0.1:9"})
        assert status == 409 and failed["error"]["code"] == "activation_failed"
        go(console, "/rules")
        rendered(console, "/rules")
        text = b.find("#rules-list").text
        for want in (f"{rng}–{rng + 99}", "range", "UDP", "multi-target", "PROXY", "failed", "port_in_use"):
            assert want in text, want
        shot(console, "rules-populated")
        go(console, f"/rules/{rule['rule_id']}")
        b.wait(lambda: "failed" in b.find("#per-target").text and "healthy" in b.find("#per-target").text, 20,
               "one failed and one healthy target")
        shot(console, "rule-detail-failover")
        go(console, "/")
        rendered(console, "/")
        b.wait(lambda: "unhealthy" in b.find("#alerts").text and "port_in_use" in b.find("#alerts").text, 15,
               "the failed rule and the unhealthy target alerted")
        shot(console, "dashboard-alerts")
        b.js("document.documentElement.dataset.theme = 'dark'")
        shot(console, "dashboard-dark")
        b.js("document.documentElement.dataset.theme = 'light'")
        assert b.csp_violations() == [] and b.script_errors() == []
    finally:
        blocker.close()
        echo.close()


def test_the_keyboard_reaches_the_menu_and_focus_is_visible(console):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    ensure_admin(console)
    b = console.browser
    ensure_logged_in(console)
    go(console, "/settings")
    rendered(console, "/settings")
    b.js("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)")
    keys = ActionChains(b.driver)
    focused = []
    for _ in range(4):
        keys.send_keys(Keys.TAB).perform()
        focused.append(b.js("const e = document.activeElement; return [e.tagName, e.textContent.trim(), "
                            "getComputedStyle(e).outlineStyle, getComputedStyle(e).outlineWidth]"))
    assert focused[0][1] == "Skip to content" and focused[1][1] == "Portunus" and focused[2][1] == "Dashboard"
    for tag, text, style, width in focused:
        assert style == "solid" and width != "0px", (tag, text, style, width)
    keys.send_keys(Keys.ENTER).perform()  # the focused menu entry (Clients) opens with Enter
    b.wait(lambda: b.path() == "/clients", what="Enter on the Clients link")
    b.click_text("Rename", "#clients-list button")
    b.find("dialog.modal input")
    ActionChains(b.driver).send_keys(Keys.ESCAPE).perform()
    b.wait(lambda: not b.finds("dialog.modal"), what="Escape closes the dialog")


def test_phone_sized_screen_has_no_sideways_scroll(console):
    ensure_admin(console)
    b = console.browser
    ensure_logged_in(console)
    b.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                             {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        for path in ("/", "/clients", "/rules", "/rules?new", "/users", "/audit", "/settings", "/metrics"):
            go(console, path)
            rendered(console, path.split("?")[0])
            time.sleep(0.2)
            assert b.js("return document.documentElement.scrollWidth") <= 390, path
            if path in ("/", "/rules", "/clients"):
                shot(console, "mobile-" + (path.strip("/") or "dashboard"))
        toggle = b.find("#menu-toggle")
        b.press(toggle)
        assert toggle.get_attribute("aria-expanded") == "true" and b.find("#nav a").is_displayed()
        shot(console, "mobile-menu")
    finally:
        b.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
