"""The server-side quota wiring below the processes (issue 14): what serve attaches where, the
metric families as Prometheus text, the routes' ownership check, the CLI's time parsing."""

from __future__ import annotations

import calendar

import pytest

from portunus.cli.quota import parse_time
from portunus.errors import PortunusError
from portunus.http import routes, routes_quota
from portunus.server.access import Principal
from portunus.server.metrics import render
from portunus.server.quotas import QuotaService
from portunus.server.traffic import TrafficServices
from portunus.store import clients
from portunus.store import grants as store_grants
from portunus.store import users as store_users

T0 = calendar.timegm((2026, 1, 31, 10, 0, 0))


@pytest.fixture
def edge(store):
    store_users.insert_user(store, "alice", "Alice", "user", None, "2026-01-01T00:00:00Z")
    client_id = clients.create_client(store, "edge-tokyo")["client_id"]
    store_grants.insert_grant(store, "G1", "alice", client_id, 1024, 65535, ["tcp"], None, "2026-01-01T00:00:00Z")
    return client_id


class FakeHub:
    def __init__(self):
        self.posted = []
        self.quotas = self.report_writer = None

    def post_update(self, client_id, update):
        self.posted.append((client_id, update))


class FakeCore:
    pass


def test_traffic_services_attach_to_hub_and_core_and_push_through_the_hub(store, edge):
    hub, core = FakeHub(), FakeCore()
    services = TrafficServices(store, hub, core, clock=lambda: T0)
    assert hub.quotas is services.quotas is core.quotas
    assert hub.report_writer is services.writer and core.traffic is services.accounting
    services.quotas.put("alice", "edge-tokyo", {"monthly_bytes": 0})
    [(client_id, update)] = hub.posted
    assert client_id == edge and update["type"] == "traffic_quota_update" and update["state"]["exhausted"] is True


def test_metric_families_render_with_help_and_type(store, edge):
    quotas = QuotaService(store, clock=lambda: T0)
    quotas.put("alice", edge, {"monthly_bytes": 0})
    text = render(quotas.metric_families())
    for name, kind in (("portunus_traffic_quota_bytes_used", "gauge"), ("portunus_traffic_quota_bytes_limit", "gauge"),
                       ("portunus_traffic_quota_exhausted", "gauge"),
                       ("portunus_traffic_quota_period_resets_total", "counter"),
                       ("portunus_traffic_quota_exhausted_total", "counter")):
        assert f"# TYPE {name} {kind}" in text and f"# HELP {name} " in text
    assert 'portunus_traffic_quota_exhausted{user="alice",client="edge-tokyo"} 1' in text.splitlines()
    assert 'portunus_traffic_quota_exhausted_total{user="alice",client="edge-tokyo"} 1' in text.splitlines()


def test_list_for_an_unknown_user_is_not_found(store, edge):
    quotas = QuotaService(store, clock=lambda: T0)
    assert quotas.list_for_user("alice") == []
    with pytest.raises(PortunusError) as err:
        quotas.list_for_user("nobody")
    assert err.value.code == "not_found"


def test_a_user_reads_only_their_own_user_routes():
    alice, bob = Principal("alice", "user"), Principal("bob", "user")
    routes_quota._own(alice, "alice")
    routes_quota._own(Principal("_legacy", "superadmin"), "alice")
    with pytest.raises(PortunusError) as err:
        routes_quota._own(bob, "alice")
    assert err.value.code == "not_owner" and err.value.http_status == 403


def test_every_quota_route_is_in_the_table():
    table = {(r.method, r.pattern): r.access for r in routes.ROUTES}
    for method, pattern, _, access, _ in routes_quota.QUOTA_ROUTES:
        assert table[(method, pattern)] == access
    for method, path in (("PUT", "/v1/users/alice/quotas/edge-tokyo"), ("GET", "/v1/users/alice/quotas"),
                         ("GET", "/v1/users/alice/quotas/edge-tokyo/status"), ("GET", "/v1/traffic/global"),
                         ("GET", "/v1/clients/edge-tokyo/traffic"), ("GET", "/v1/users/alice/traffic")):
        route, params, _ = routes.match(method, path)
        assert route is not None and route.handler.__module__ == routes_quota.__name__, (method, path)
    route, params, _ = routes.match("GET", "/v1/users/alice")
    assert route.handler.__module__ == routes.__name__  # the user route still wins for a bare user


@pytest.mark.parametrize("text,expected", [
    ("1769853600", T0), ("2026-01-31T10:00:00Z", T0), ("2026-01-31T11:00:00+01:00", T0), ("2026-01-31T10:00:00", T0),
    ("now", T0 + 5), ("90s", T0 + 5 - 90), ("15m", T0 + 5 - 900), ("24h", T0 + 5 - 86400), ("7d", T0 + 5 - 7 * 86400)])
def test_cli_times(text, expected):
    assert parse_time(text, "--from", code="invalid_time_range", now=T0 + 5) == expected


@pytest.mark.parametrize("text", ["soon", "-5", "1.5h", "2026-13-01", ""])
def test_cli_bad_times_name_the_flag(text):
    with pytest.raises(PortunusError) as err:
        parse_time(text, "--anchor", code="invalid_billing_anchor", now=T0)
    assert err.value.code == "invalid_billing_anchor" and "--anchor" in err.value.message
