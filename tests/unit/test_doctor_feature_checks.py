"""Doctor checks of the features that landed after the first doctor: onboarding, quotas, SNI counters,
the public origin, the Web UI files, the API's fd ceiling, rules needing capabilities the client lacks."""

from __future__ import annotations

import json
import sys

import pytest

from portunus.doctor import client as dc
from portunus.doctor import online as do
from portunus.doctor import report as r
from portunus.doctor import server as ds
from portunus.doctor import web
from portunus.errors import PortunusError
from portunus.model import Rule
from portunus.store import Store
from portunus.store import users as store_users


class FakeApi:
    """The operator API as ``ApiClient.call`` answers it: path -> body (an exception is raised)."""

    def __init__(self, answers: dict):
        self.answers = answers
        self.calls: list[str] = []

    def call(self, method, path, body=None, timeout=30.0):
        self.calls.append(path)
        assert timeout <= do.API_TIMEOUT  # every network step has a timeout
        answer = self.answers[path]
        if isinstance(answer, Exception):
            raise answer
        return 200, answer


def ctx_with(metrics: str = "", rules=(), clients=(), **more) -> do.Online:
    api = FakeApi({"/v1/metrics": {"raw": metrics}, "/v1/rules": {"rules": list(rules)},
                   "/v1/clients": {"clients": list(clients)}, **more})
    return do.Online(api, None, 0.0)


# ------------------------------------------------------------------ superadmin / onboarding

def test_bootstrap_required_names_the_setup_token_line_and_the_offline_command():
    check = do.check_superadmin({"bootstrap_required": True, "version": "1.0"}, None)
    assert check.status == r.FAIL and "bootstrap_required" in check.summary
    assert "Portunus onboarding setup token:" in check.fix and "portunus-server onboarding-token" in check.fix
    closed = do.check_superadmin({"bootstrap_required": True},
                                 {"active_superadmins": 0, "onboarding_completed": True})
    assert closed.status == r.FAIL and "reset-password" in closed.fix and "closed for good" in closed.summary
    present = do.check_superadmin({"bootstrap_required": False}, {"active_superadmins": 2,
                                                                   "onboarding_completed": True})
    assert present.status == r.OK and present.details["active_superadmins"] == 2


def _store_facts(tmp_path, setup):
    store = Store.open(str(tmp_path / "data"))
    try:
        setup(store)
    finally:
        store.close()
    conn = ds.open_readonly(str(tmp_path / "data" / "state.db"))
    try:
        return do.superadmin_facts(ds.ReadOnlyStore(conn))
    finally:
        conn.close()


def test_offline_superadmin_from_a_real_store(tmp_path):
    facts = _store_facts(tmp_path, lambda store: None)
    assert facts == {"active_superadmins": 0, "onboarding_completed": False}
    check = do.check_superadmin_offline(facts, False, True)
    assert check.status == r.WARN and "onboarding-token" in check.fix
    assert do.check_superadmin_offline(facts, True, True).status == r.OK  # operator_token makes one at start
    assert do.check_superadmin_offline(None, False, False).status == r.OK  # first start: onboarding opens

    def add_admin(store):
        store_users.insert_user(store, "root", "Root", "superadmin", None, "2026-01-01T00:00:00Z")
    facts = _store_facts(tmp_path, add_admin)
    assert facts["active_superadmins"] == 1
    assert do.check_superadmin_offline(facts, False, True).status == r.OK


def test_offline_superadmin_gone_after_onboarding_closed_needs_recovery(tmp_path):
    def closed_and_disabled(store):
        with store.write() as conn:
            conn.execute("INSERT INTO users (user_id, role, display_name, disabled, password_hash, "
                         "password_change_required, created_at) VALUES ('root', 'superadmin', 'Root', 1, NULL, 0, "
                         "'2026-01-01T00:00:00Z')")
            conn.execute("INSERT INTO onboarding_setup (id, token_hash, issued_by, created_at, expires_at, "
                         "completed_at, completed_by) VALUES (1, NULL, 'serve', 'x', 'y', '2026-01-01T00:00:00Z', "
                         "'root')")
    facts = _store_facts(tmp_path, closed_and_disabled)
    check = do.check_superadmin_offline(facts, False, True)
    assert check.status == r.FAIL and "reset-password USER --temporary" in check.fix


# ------------------------------------------------------------------ metrics text

def test_metric_samples_reads_labels_and_tells_absent_from_empty():
    text = ('# TYPE portunus_traffic_quota_exhausted gauge\n'
            'portunus_traffic_quota_exhausted{user="a\\"b",client="edge-1"} 1\n'
            'portunus_traffic_quota_exhausted_total{user="x",client="edge-1"} 4\n')
    assert do.metric_samples(text, "portunus_traffic_quota_exhausted") == [({"user": 'a"b', "client": "edge-1"},
                                                                           1.0)]
    assert do.metric_samples("# TYPE portunus_x gauge\n", "portunus_x") == []
    assert do.metric_samples(text, "portunus_not_there") is None


# ------------------------------------------------------------------ quotas

QUOTA_METRICS = ('# TYPE portunus_traffic_quota_exhausted gauge\n'
                 'portunus_traffic_quota_exhausted{user="alice",client="edge-tokyo"} {flag}\n'
                 'portunus_traffic_quota_exhausted{user="bob",client="edge-osaka"} 0\n'
                 'portunus_traffic_quota_bytes_used{user="alice",client="edge-tokyo"} 4194304\n'
                 'portunus_traffic_quota_bytes_limit{user="alice",client="edge-tokyo"} 4194304\n')


def test_exhausted_quota_warns_with_the_seed_fix_and_names_an_offline_client():
    clients = [{"client_name": "edge-tokyo", "connected": False}]
    check, _support = do.check_quotas(ctx_with(QUOTA_METRICS.replace("{flag}", "1"), clients=clients))
    assert check.status == r.WARN and check.id == "quotas.exhausted"
    note = check.details["exhausted"]["alice on edge-tokyo"]
    assert note.startswith("4194304 of 4194304 bytes") and "offline" in note
    assert "quota clear alice edge-tokyo" in check.fix and '"clear_period_usage": true' in check.fix
    assert "monthly_bytes" in check.fix
    check, _support = do.check_quotas(ctx_with(QUOTA_METRICS.replace("{flag}", "0")))
    assert check.status == r.OK and "none of 2" in check.summary


def test_quota_on_a_client_that_does_not_declare_traffic_quota_is_not_enforced():
    clients = [{"client_name": "edge-tokyo", "connected": True, "client_version": "0.0.9",
                "capabilities": ["udp", "port_range"]},
               {"client_name": "edge-osaka", "connected": True, "capabilities": ["traffic_quota"]}]
    _exhausted, support = do.check_quotas(ctx_with(QUOTA_METRICS.replace("{flag}", "0"), clients=clients))
    assert support.status == r.WARN and support.details["unenforced"] == {"alice on edge-tokyo": "client version 0.0.9"}
    assert "control.updates_not_supported" in support.summary
    clients[0]["capabilities"].append("traffic_quota")
    _exhausted, support = do.check_quotas(ctx_with(QUOTA_METRICS.replace("{flag}", "0"), clients=clients))
    assert support.status == r.OK


def test_quota_check_asks_the_quota_routes_when_the_metrics_lack_the_family():
    ctx = ctx_with("portunus_clients_connected{client=\"a\"} 1\n", **{"/v1/users": {"users": []}})
    check, _support = do.check_quotas(ctx)
    assert check.status == r.OK and check.details["source"] == "/v1/users/{u}/quotas"


# ------------------------------------------------------------------ SNI

SNI_RULE = {"rule_id": "R1", "client_name": "edge-01", "listen_port": 8443, "sni_pattern": "a.example.com",
            "state": "active"}


def test_sni_counters_from_metrics_both_ways():
    metrics = ('# TYPE portunus_tls_sni_listener_parse_failures_total counter\n'
               'portunus_tls_sni_listener_parse_failures_total{client="edge-01",port="8443"} {n}\n'
               'portunus_tls_sni_listener_miss_total{client="edge-01",port="8443"} 0\n')
    check, = do.check_sni_listeners(ctx_with(metrics.replace("{n}", "3"), rules=[SNI_RULE]))
    assert check.status == r.WARN and check.details["by_port"] == {"edge-01 port 8443": {"parse_failures": 3,
                                                                                         "misses": 0}}
    assert "tls.parse_failed" in check.fix and "fallback" in check.fix
    check, = do.check_sni_listeners(ctx_with(metrics.replace("{n}", "0"), rules=[SNI_RULE]))
    assert check.status == r.OK


def test_sni_counters_from_rule_stats_when_metrics_lack_them():
    stats = {"rule_id": "R1", "sni_listener": {"mode": "sni", "parse_failures": 0, "misses": 7}}
    ctx = ctx_with(rules=[SNI_RULE, {**SNI_RULE, "rule_id": "R2", "sni_pattern": "b.example.com"}],
                   **{"/v1/rules/R1/stats": stats})
    check, = do.check_sni_listeners(ctx)
    assert check.status == r.WARN and check.details["by_port"]["edge-01 port 8443"]["misses"] == 7
    assert ctx.api.calls.count("/v1/rules/R1/stats") == 1 and "/v1/rules/R2/stats" not in ctx.api.calls  # per port


def test_sni_check_skips_when_no_counters_are_exposed_and_passes_without_sni_rules():
    check, = do.check_sni_listeners(ctx_with(rules=[SNI_RULE], **{"/v1/rules/R1/stats": {"rule_id": "R1"}}))
    assert check.status == r.SKIP and "docs/sni.md" in check.summary
    check, = do.check_sni_listeners(ctx_with(rules=[{**SNI_RULE, "sni_pattern": None}]))
    assert check.status == r.OK and "no active SNI rule" in check.summary


def test_a_failing_route_is_reported_under_the_checks_id_and_quotas_fall_back_to_the_api(monkeypatch):
    monkeypatch.setattr(do, "public_get", lambda url, path, timeout=do.API_TIMEOUT: {"bootstrap_required": False})
    quota = {"user_id": "alice", "client_id": "01C", "client_name": "edge-tokyo", "exhausted": True,
             "current_period_bytes_used": 10, "monthly_bytes": 10}
    api = FakeApi({"/v1/clients": {"clients": []}, "/v1/rules": {"rules": []},
                   "/v1/metrics": PortunusError("server_busy", "the API is full"),
                   "/v1/users": {"users": [{"user_id": "alice"}, {"user_id": "bob"}]},
                   "/v1/users/alice/quotas": {"quotas": [quota]}, "/v1/users/bob/quotas": {"quotas": []}})
    monkeypatch.setattr("portunus.cli.api_client.ApiClient", lambda url, token: api)
    _ctx, checks = do.online_checks("http://127.0.0.1:1", None, {"PORTUNUS_OPERATOR_TOKEN": "t" * 40})
    by_id = {c.id: c for c in checks}
    assert by_id["server.superadmin"].status == r.OK and by_id["server.api"].status == r.OK
    dns = by_id["rules.dns_failures"]
    assert dns.status == r.FAIL and "server_busy" in dns.summary and "LimitNOFILE" in dns.fix
    quotas = by_id["quotas.exhausted"]
    assert quotas.status == r.WARN and quotas.details["source"] == "/v1/users/{u}/quotas"
    assert quotas.details["exhausted"] == {"alice on edge-tokyo": "10 of 10 bytes used this period"}
    assert "t" * 40 not in r.render_json(checks)


def test_onboarding_skips_the_token_checks(monkeypatch):
    monkeypatch.setattr(do, "public_get", lambda url, path, timeout=do.API_TIMEOUT: {"bootstrap_required": True})
    _ctx, checks = do.online_checks("http://127.0.0.1:1", None, {"PORTUNUS_OPERATOR_TOKEN": "t" * 40})
    assert [(c.id, c.status) for c in checks] == [("server.superadmin", r.FAIL), ("server.api", r.SKIP)]


def test_server_busy_gets_the_fd_fix():
    assert "LimitNOFILE" in do.API_FIXES["server_busy"]


# ------------------------------------------------------------------ the API's fd ceiling

@pytest.mark.parametrize("open_fds,status", [(100, r.OK), (750, r.WARN), (896, r.FAIL), (1000, r.FAIL)])
def test_api_headroom_against_the_reserve(open_fds, status):
    check = ds.check_api_headroom(1024, open_fds, 42)
    assert check.status == status and check.details["api_fd_ceiling"] == 1024 - 128
    if status == r.FAIL:
        assert "503 server_busy" in check.summary and "server's systemd unit" in check.fix


def test_serve_fd_needs_follow_the_listener_caps():
    needs = ds.serve_fd_needs(3)
    assert needs == {"client_sessions": 3, "operator_api_connections": 256, "metrics_connections": 64,
                     "api_fd_reserve": 128}


# ------------------------------------------------------------------ public origin

@pytest.mark.parametrize("origin,listen,status,words", [
    (None, ("127.0.0.1", 7080), r.OK, "Host the browser used"),
    (None, ("0.0.0.0", 7080), r.WARN, "not Secure"),
    ("https://127.0.0.1:7080", ("127.0.0.1", 7080), r.FAIL, "plain HTTP"),
    ("https://localhost:7080", ("0.0.0.0", 7080), r.FAIL, "plain HTTP"),
    ("https://portunus.example.com", ("127.0.0.1", 7080), r.OK, "Secure"),
    ("https://127.0.0.1:8443", ("127.0.0.1", 7080), r.OK, "Secure"),
    ("http://127.0.0.1:7080", ("0.0.0.0", 7080), r.WARN, "csrf_origin_mismatch"),
    ("http://127.0.0.1:9999", ("127.0.0.1", 7080), r.WARN, "csrf_origin_mismatch"),
    ("http://portunus.example.com:7080", ("10.0.0.5", 7080), r.WARN, "unencrypted"),
    ("http://127.0.0.1:7080", ("127.0.0.1", 7080), r.OK, "matches"),
])
def test_public_origin_against_the_listen_address(origin, listen, status, words):
    check = web.check_public_origin(origin, listen)
    assert check.status == status and words in check.summary, check.summary
    assert check.id == "http.public_origin"
    if status != r.OK:
        assert "operator_http_public_origin" in check.fix


# ------------------------------------------------------------------ Web UI files

def test_webui_files_of_this_build_are_present():
    check = web.check_webui_files()
    assert check.status == r.OK and check.details["assets_named"] > 5


def _fake_ui_package(tmp_path, monkeypatch, name, index: str | None, files=()):
    pkg = tmp_path / name
    (pkg / "webui").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    if index is not None:
        (pkg / "webui" / "index.html").write_text(index)
    for f in files:
        (pkg / "webui" / f).write_text("x")
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == name]:
        del sys.modules[mod]
    return name


def test_webui_files_missing_index_or_a_named_asset(tmp_path, monkeypatch):
    name = _fake_ui_package(tmp_path, monkeypatch, "doctor_ui_noindex", None)
    check = web.check_webui_files(name)
    assert check.status == r.FAIL and "404" in check.summary and "./build.sh" in check.fix
    name = _fake_ui_package(tmp_path, monkeypatch, "doctor_ui_partial",
                            '<link href="__ASSETS__/style.css"><script src="__ASSETS__/app.js"></script>',
                            files=["style.css"])
    check = web.check_webui_files(name)
    assert check.status == r.FAIL and check.details["missing"] == ["app.js"]
    assert web.check_webui_files("doctor_ui_not_a_package").status == r.FAIL


# ------------------------------------------------------------------ client: rules vs this build's capabilities

def _rule(**over) -> Rule:
    body = {"rule_id": "01SNI", "protocol": "tcp", "listen_port": 8443, "target": "127.0.0.1:9", **over}
    return Rule.from_dict(body, max_range_ports=65535)


def test_rules_needing_a_capability_this_build_does_not_declare():
    session = dc.Session(rules=[_rule(sni_pattern="a.example.com"), _rule(rule_id="01PLAIN", listen_port=8080)],
                         capabilities=["udp", "port_range", "multi_target", "proxy_protocol"])
    check = dc.check_rule_capabilities(session)
    assert check.status == r.FAIL and list(check.details["rules"]) == ["01SNI"]
    assert "needs sni" in check.details["rules"]["01SNI"] and "remove-rule 01SNI" in check.fix
    session.capabilities = dc.declared_capabilities({})
    assert "sni" in session.capabilities
    assert dc.check_rule_capabilities(session).status == r.OK


def test_a_replayed_rule_this_build_cannot_read_fails_and_no_rules_skips():
    session = dc.Session(rules=[], capabilities=dc.declared_capabilities({}),
                         unreadable={"01NEW": "validation.unknown_field: unknown field 'future'"})
    check = dc.check_rule_capabilities(session)
    assert check.status == r.FAIL and "cannot read" in check.details["rules"]["01NEW"]
    assert dc.check_rule_capabilities(dc.Session()).status == r.SKIP
    assert dc._rule({"rule_id": "X", "protocol": "tcp", "listen_port": 1, "target": "h:1", "future": 1}) \
        .startswith("validation.")


def test_declared_capabilities_follow_the_agents_override():
    assert dc.declared_capabilities({"PORTUNUS_CLIENT_CAPABILITIES": "udp,,sni"}) == ["udp", "sni"]
    assert json.dumps(dc.declared_capabilities({}))  # a plain list, as the hello sends it


def test_listen_port_zero_takes_the_running_servers_port():
    assert web.listen_address(("127.0.0.1", 0), "http://127.0.0.1:45981") == ("127.0.0.1", 45981)
    assert web.listen_address(("127.0.0.1", 7080), "http://127.0.0.1:45981") == ("127.0.0.1", 7080)
    assert web.listen_address(("127.0.0.1", 0), None) == ("127.0.0.1", 0)
