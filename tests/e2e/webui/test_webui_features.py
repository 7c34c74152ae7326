"""The console's SNI, rate-limit and quota parts in a real headless Chromium, real server, real client.

One server, one enrolled client and one browser for the module (like test_webui.py); the tests
run in file order: SNI field and badges, the QoS form and the hot update from the rule page,
owner caps on the client page, a quota that is exhausted at once then cleared and raised, the
traffic charts. Screenshots go to $PORTUNUS_WEBUI_SHOTS (docs/img/) or a temp dir.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import IN_CI, free_port_block, require_tool  # noqa: E402
from peers import TcpEchoServer  # noqa: E402
from webui_steps import echo_roundtrip, ensure_admin, ensure_logged_in, go, rendered, shot  # noqa: E402

CLIENT = "edge-qos"
ALICE = ("alice", "alice-quota-password-1")
LOCAL: dict = {}  # what one test leaves for the next in this module


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
    from console import ApiSession, Console
    from webui_browser import Browser

    con = Console(tmp_path_factory.mktemp("webui-features") / "data")
    shots = Path(os.environ.get("PORTUNUS_WEBUI_SHOTS") or tmp_path_factory.mktemp("shots"))
    browser = Browser(1280, 900)
    con.browser, con.shots, con.visited = browser, shots, []
    echo = None
    try:
        ensure_admin(con)
        api = ApiSession(con.base)
        api.login("admin", "correct horse battery 1")
        res = api.ok("POST", "client-enrollments", {"name": CLIENT})
        LOCAL["agent"] = con.run_client(res["command"], tmp_path_factory.mktemp("agent"), CLIENT)
        LOCAL["client_id"] = res["client"]["client_id"]
        LOCAL["api"] = api
        echo_port = free_port_block(1)
        echo = TcpEchoServer([echo_port])
        LOCAL["echo_port"] = echo_port
        yield con
    finally:
        browser.quit()
        if echo:
            echo.close()
        con.close()


def _select(b, name: str, value: str, scope: str = ""):
    from selenium.webdriver.support.ui import Select
    Select(b.field(name, scope)).select_by_value(value)


def _unit(b, name: str, value: str, scope: str = ""):
    """The unit select next to an amount input (KB/s …, KB/MB/GB/TB)."""
    from selenium.webdriver.support.ui import Select
    Select(b.find(f'{scope} [data-field="{name}"] select'.strip())).select_by_value(value)


def _push_form(con, port: int):
    b = con.browser
    go(con, "/rules?new")
    rendered(con, "/rules")
    _select(b, "client", LOCAL["client_id"])
    b.set_field("listen", str(port))
    b.set_field("target_host_0", "127.0.0.1")
    b.set_field("target_port_0", str(LOCAL["echo_port"]))


def _row(b, port: int):
    rows = [r for r in b.finds("#rules-list tbody tr") if r.text.split()[0] == str(port)]
    return rows[0] if rows else None


def test_sni_field_inline_errors_badges_and_the_ports_routes(console):
    b = console.browser
    ensure_logged_in(console)
    port = free_port_block(1)
    _push_form(console, port)
    b.set_field("sni_pattern", "*.com")
    b.click("#rule-form button[type=submit]")
    b.wait(lambda: "sni_pattern_malformed" in b.field_error("sni_pattern"), what="the malformed pattern under its field")
    assert b.field("sni_pattern").get_attribute("aria-invalid") == "true"
    # SNI on UDP: the form says so, and the server's refusal lands on the same field
    _select(b, "protocol", "udp")
    b.set_field("sni_pattern", "a.example.com")
    assert b.find("#sni-disabled-note").is_displayed()
    b.click("#rule-form button[type=submit]")
    b.wait(lambda: "sni_on_unsupported_rule" in b.field_error("sni_pattern"), what="SNI on UDP refused inline")
    _select(b, "protocol", "tcp")
    b.click("#rule-form button[type=submit]")
    b.wait(lambda: _row(b, port) is not None, timeout=20, what="the SNI rule listed")
    # a second rule with the same pattern on the port: the conflict code under the SNI field
    b.click("#rule-form button[type=submit]")
    b.wait(lambda: "conflict.sni_route_duplicate" in b.field_error("sni_pattern"), what="the duplicate route inline")
    # a plain rule on the SNI port becomes its fallback
    LOCAL["api"].ok("POST", "rules", {"client": LOCAL["client_id"], "listen_port": port,
                                      "target": f"127.0.0.1:{LOCAL['echo_port']}"})
    b.click_text("Refresh", "main .title-row button")

    def badges():
        texts = [r.text for r in b.finds("#rules-list tbody tr") if r.text.split()[0] == str(port)]
        return len(texts) == 2 and any("SNI a.example.com" in t for t in texts) and any("SNI fallback" in t for t in texts)
    b.wait(badges, timeout=15, what="the SNI and SNI fallback badges")
    shot(console, "rules-sni-qos")
    LOCAL["sni_port"] = port
    # the rule page groups the port's routes and shows the SNI counters from the stats
    sni_rule = next(r for r in LOCAL["api"].ok("GET", "rules")["rules"] if r.get("sni_pattern") == "a.example.com")
    go(console, f"/rules/{sni_rule['rule_id']}")
    rendered(console, f"/rules/{sni_rule['rule_id']}")
    b.wait(lambda: "fallback" in b.find("#sni-routes").text and "a.example.com" in b.find("#sni-routes").text,
           what="the port's routes grouped")
    b.wait(lambda: "Misses" in b.find("#sni-counters", visible=False).text, timeout=15, what="the SNI counters")
    shot(console, "rule-detail-sni")
    assert b.script_errors() == []


def test_qos_form_caps_column_hot_update_and_counters(console):
    b = console.browser
    ensure_logged_in(console)
    port = free_port_block(1)
    _push_form(console, port)
    b.click("#qos-section > summary")
    b.set_field("qos_bandwidth_in_bps", "1")
    _unit(b, "qos_bandwidth_in_bps", "1000000")
    b.set_field("qos_new_connections_per_sec", "100")
    b.set_field("qos_concurrent_connections", "1000")
    b.click("#qos-section details.advanced > summary")
    b.wait(lambda: "1 – 6000" in b.find('[data-burst-for="new_connections_burst"]').text, what="the burst range shown")
    # a burst outside the range: the server's code under the burst field
    b.set_field("qos_new_connections_burst", "7000")
    b.click("#rule-form button[type=submit]")
    b.wait(lambda: "rate_limit_burst_range" in b.field_error("qos_new_connections_burst"), what="the burst error inline")
    b.set_field("qos_new_connections_burst", "")
    b.click("#rule-form button[type=submit]")
    b.wait(lambda: _row(b, port) is not None and "↓1.0M 100/s ≤1000" in _row(b, port).text, timeout=20,
           what="the caps column")
    rule = next(r for r in LOCAL["api"].ok("GET", "rules")["rules"] if r["listen_port"] == port)
    assert rule["rate_limit"] == {"bandwidth_in_bps": 1000000, "new_connections_per_sec": 100, "concurrent_connections": 1000}
    assert echo_roundtrip(port, b"through the caps") == b"through the caps"
    # the hot update from the rule page
    go(console, f"/rules/{rule['rule_id']}")
    rendered(console, f"/rules/{rule['rule_id']}")
    b.click("#qos-edit > summary")
    b.set_field("edit_bandwidth_out_bps", "512")
    _unit(b, "edit_bandwidth_out_bps", "1000")
    b.click("#qos-edit-form button[type=submit]")
    b.wait(lambda: "↑512K" in b.find("#qos-current").text, what="the new caps on the rule page")
    b.wait(lambda: "Rejected" in b.find("#qos-counters-box", visible=False).text, timeout=15, what="the limiter counters")
    shot(console, "rule-detail-qos-sni")
    assert LOCAL["api"].ok("GET", f"rules/{rule['rule_id']}")["rate_limit"]["bandwidth_out_bps"] == 512000
    go(console, "/rules")
    rendered(console, "/rules")
    b.wait(lambda: _row(b, port) is not None and "↓1.0M ↑512K 100/s ≤1000" in _row(b, port).text, what="the list's new caps")
    LOCAL["qos_port"] = port
    assert b.script_errors() == []


def test_owner_cap_set_and_clear_on_the_client_page(console):
    b = console.browser
    ensure_logged_in(console)
    go(console, "/clients")
    rendered(console, "/clients")
    row = b.wait(lambda: next((r for r in b.finds("#clients-list tbody tr") if r.get_attribute("data-client-name") == CLIENT),
                              None), what="the client listed")
    b.click_text("Owner caps & quotas", "a", scope=row)
    rendered(console, f"/clients/{LOCAL['client_id']}")
    owner = b.wait(lambda: b.find('#owner-caps tr[data-owner="admin"]'), what="the admin owner row")
    assert "no limit" in owner.text
    b.click_text("Set cap", "button", scope=owner)
    b.set_field("owner_concurrent_connections", "50", "dialog.modal")
    b.set_field("owner_new_connections_per_sec", "0", "dialog.modal")
    b.click("dialog.modal button[type=submit]")
    b.wait(lambda: "rate_limit_cap_zero" in b.field_error("owner_new_connections_per_sec", "dialog.modal"),
           what="a zero cap refused in the dialog")
    b.set_field("owner_new_connections_per_sec", "", "dialog.modal")
    b.click("dialog.modal button[type=submit]")
    b.wait(lambda: "≤50" in b.find('#owner-caps tr[data-owner="admin"]').text, what="the owner cap shown")
    cap = LOCAL["api"].ok("GET", f"clients/{LOCAL['client_id']}/owners/admin/rate-limit")
    assert cap["rate_limit"] == {"concurrent_connections": 50}
    shot(console, "client-owner-caps")
    b.click_text("Clear cap", "button", scope=b.find('#owner-caps tr[data-owner="admin"]'))
    b.click_text("Clear cap", "dialog.modal button")
    b.wait(lambda: "no limit" in b.find('#owner-caps tr[data-owner="admin"]').text, what="the owner cap cleared")
    assert LOCAL["api"].ok("GET", f"clients/{LOCAL['client_id']}/owners/admin/rate-limit")["rate_limit"] is None


def test_quota_set_exhausted_banner_clear_and_increase(console):
    b = console.browser
    api = LOCAL["api"]
    console.secrets.add(ALICE[1])
    api.ok("POST", "users", {"user_id": ALICE[0], "display_name": "Alice", "role": "user", "password": ALICE[1]})
    base = free_port_block(5)
    api.ok("POST", "grants", {"user_id": ALICE[0], "client": LOCAL["client_id"], "listen_port_start": base,
                              "listen_port_end": base + 4, "protocols": ["tcp"]})
    ensure_logged_in(console)
    go(console, "/users")
    rendered(console, "/users")
    row = b.wait(lambda: next((r for r in b.finds("#users-list tbody tr") if r.text.split()[0] == ALICE[0]), None),
                 what="alice listed")
    b.click_text("Quotas", "button", scope=row)
    rendered(console, f"/users/{ALICE[0]}/quotas")
    _select(b, "quota_target", LOCAL["client_id"])
    b.set_field("monthly_bytes", "-1")
    b.click(".quota-form button[type=submit]")
    b.wait(lambda: "invalid_quota_size" in b.field_error("monthly_bytes"), what="a bad size under its field")
    b.set_field("monthly_bytes", "0")  # 0 means exhausted at once
    b.click(".quota-form button[type=submit]")
    b.wait(lambda: b.find(".quota-banner").is_displayed(), what="the EXHAUSTED banner")
    quota_row = b.find('.quota-list tr[data-quota-user="alice"]')
    assert "EXHAUSTED" in quota_row.text and "(100%)" in quota_row.text
    assert "exhausted" in b.find('.quota-list tr[data-quota-user="alice"] .progress').get_attribute("class")
    shot(console, "quotas-exhausted")
    # a clear does not resume a 0 quota (0 >= 0); raising it does
    b.click_text("Clear usage", "button", scope=b.find(".quota-banner"))
    b.wait(lambda: "Usage cleared" in b.find("#flash").text, what="the clear confirmed")
    assert b.find(".quota-banner").is_displayed()
    b.click_text("Increase limit", "button", scope=b.find(".quota-banner"))
    b.set_field("increase_monthly", "2", "dialog.modal")
    _unit(b, "increase_monthly", "1073741824", "dialog.modal")
    b.click("dialog.modal button[type=submit]")
    b.wait(lambda: not b.finds(".quota-banner"), what="the banner gone")
    row = b.find('.quota-list tr[data-quota-user="alice"]')
    assert "0 B (0%)" in row.text and "of 2.00 GiB" in row.text and "EXHAUSTED" not in row.text
    view = api.ok("GET", f"users/alice/quotas/{LOCAL['client_id']}/status")
    assert view["monthly_bytes"] == 2 * 1024 ** 3 and view["exhausted"] is False
    # alice's idle chart says why it is empty
    b.wait(lambda: b.find("#user-traffic").get_attribute("data-state") in ("empty", "samples"), what="alice's chart")
    if b.find("#user-traffic").get_attribute("data-state") == "empty":
        assert "only for minutes or hours in which bytes were forwarded" in b.find("#user-traffic").text
    shot(console, "quotas")
    # the superadmin's Quotas & traffic page lists every quota, client by client
    go(console, "/quotas")
    rendered(console, "/quotas")
    b.wait(lambda: b.find('.quota-list tr[data-quota-user="alice"]'), what="alice's quota on the overview")
    assert f"Quotas on {CLIENT}" in b.find("main").text and b.find("#all-traffic")


def test_a_tenant_sees_her_own_quota(console):
    from webui_steps import login_ui, logout_ui
    b = console.browser
    ensure_logged_in(console)
    logout_ui(console)
    login_ui(console, *ALICE)
    b.wait(lambda: b.path() == "/", what="alice's dashboard")
    assert not b.finds("#global-traffic")  # global traffic is superadmin only
    b.click_text("Quotas & traffic", "#nav a")
    b.wait(lambda: "My quotas" in b.find("main h1").text, what="her own quotas page")
    rendered(console, "/quotas")
    row = b.wait(lambda: b.find('.quota-list tr[data-quota-user="alice"]'), what="alice's quota row")
    assert "(0%)" in row.text and not b.finds(".quota-form") and "Increase limit" not in row.text
    logout_ui(console)


def test_traffic_charts_render_with_samples_or_say_why_not(console):
    b = console.browser
    ensure_logged_in(console)
    chart = b.find("#global-traffic-chart")
    b.wait(lambda: chart.get_attribute("data-state") in ("empty", "samples"), what="the dashboard's global chart")
    if chart.get_attribute("data-state") == "empty":
        assert "No traffic in this window." in chart.text and "retention" in chart.text
    for _ in range(3):
        echo_roundtrip(LOCAL["qos_port"], b"x" * 4096)
    # the bytes reach the 1-minute samples after a stats report and the writer's flush
    _select(b, "global-traffic-chart_range", "1h")
    _select(b, "global-traffic-chart_bucket", "1m")

    def samples():
        if chart.get_attribute("data-state") != "samples":
            b.click_text("Refresh", "button", scope=chart)
            return False
        return True
    b.wait(samples, timeout=30, what="samples in the global chart")
    assert chart.find_element("css selector", "svg polyline") is not None
    assert "In " in b.find("#global-traffic-chart-totals").text
    shot(console, "dashboard-traffic")
    # a 1-minute window older than its retention: the server's code instead of a chart
    _select(b, "global-traffic-chart_range", "custom")
    b.js("const el = document.querySelector('[data-field=global-traffic-chart_from] input');"
         "el.value = '2020-01-01T00:00'; el.dispatchEvent(new Event('change'))")
    b.wait(lambda: "quota_bucket_out_of_retention" in chart.text or "invalid_time_range" in chart.text,
           what="the retention error shown")
    # the client page's traffic tab draws the same chart
    go(console, f"/clients/{LOCAL['client_id']}?tab=traffic")
    rendered(console, f"/clients/{LOCAL['client_id']}")
    b.wait(lambda: b.find("#client-traffic").get_attribute("data-state") in ("empty", "samples"), what="the client chart")
    assert b.script_errors() == [] and b.csp_violations() == []


def test_the_new_pages_fit_a_phone_and_take_the_keyboard(console):
    b = console.browser
    ensure_logged_in(console)
    b.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                             {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        for path, drawn in ((f"/clients/{LOCAL['client_id']}", f"/clients/{LOCAL['client_id']}"),
                            (f"/users/{ALICE[0]}/quotas", f"/users/{ALICE[0]}/quotas"), ("/quotas", "/quotas"),
                            ("/rules?new", "/rules")):
            go(console, path)
            rendered(console, drawn)
            if path == "/rules?new":
                b.click("#qos-section > summary")
                b.click("#qos-section details.advanced > summary")
            b.wait(lambda: b.js("return document.documentElement.scrollWidth") <= 390, timeout=3,
                   what=f"{path} without sideways scroll")
        for el in b.finds("main input, main select"):  # every new input is labelled too
            assert b.js("return arguments[0].labels.length || arguments[0].getAttribute('aria-label')", el), \
                el.get_attribute("outerHTML")[:200]
    finally:
        b.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    # the client page's tabs answer the keyboard
    go(console, f"/clients/{LOCAL['client_id']}")
    rendered(console, f"/clients/{LOCAL['client_id']}")
    tab = b.find("#tab-quotas")
    b.js("arguments[0].focus()", tab)
    from selenium.webdriver.common.keys import Keys
    tab.send_keys(Keys.ENTER)
    b.wait(lambda: b.find("#panel-quotas").is_displayed() and not b.find("#panel-owner-caps", visible=False).is_displayed(),
           what="the quotas tab opened with Enter")
    assert tab.get_attribute("aria-selected") == "true"
