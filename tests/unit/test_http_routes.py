"""The routing table: matching, 404 versus 405, no stubs, the OpenAPI document built from it."""

from __future__ import annotations

import pytest

from portunus.http import routes, routes_caps
from portunus.http.openapi import document

RULE = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


@pytest.mark.parametrize("method,path,handler,params", [
    ("GET", "/v1/clients", routes.list_clients, {}),
    ("GET", "/v1/clients/edge-01", routes.get_client, {"id": "edge-01"}),
    ("PATCH", "/v1/clients/edge-01/name", routes.rename_client, {"id": "edge-01"}),
    ("GET", f"/v1/rules/{RULE}/stats", routes.rule_stats, {"id": RULE}),
    ("GET", f"/v1/rules/{RULE}/stats/stream", routes.rule_stats_stream, {"id": RULE}),
    ("DELETE", f"/v1/rules/{RULE}", routes.delete_rule, {"id": RULE}),
])
def test_match(method, path, handler, params):
    route, got, _ = routes.match(method, path)
    assert route.handler is handler and got == params


def test_unknown_paths_have_no_methods_and_known_ones_list_theirs():
    assert routes.match("GET", "/v1/nothing") == (None, {}, [])
    route, _, allowed = routes.match("PATCH", f"/v1/rules/{RULE}")
    assert route is None and allowed == ["GET", "DELETE", "PUT"]
    route, _, allowed = routes.match("get", "/v1/clients")
    assert route is None and allowed == ["GET"]
    assert routes.match("GET", "/v1/clients/a/b/c")[2] == []


def test_no_stub_routes():
    assert all(callable(r.handler) for r in routes.ROUTES)
    assert not hasattr(routes, "put_rule")
    # PUT rules/{id} is the rate-limit hot update (SPEC §2.9), handled with the owner caps
    route, params, _ = routes.match("PUT", f"/v1/rules/{RULE}")
    assert route.handler is routes_caps.put_rule_caps and route.access == "owner" and params == {"id": RULE}


def test_each_method_and_pattern_once():
    keys = [(r.method, r.pattern) for r in routes.ROUTES]
    assert len(keys) == len(set(keys))


def test_openapi_comes_from_the_table():
    spec = document(routes.ROUTES)
    ops = [(path, method) for path, item in spec["paths"].items() for method in item]
    assert len(ops) == len(routes.ROUTES)
    assert spec["paths"]["/v1/rules/{id}"]["put"]["x-portunus-access"] == "owner"
    stream = spec["paths"]["/v1/rules/{id}/stats/stream"]["get"]
    assert stream["parameters"][0]["name"] == "id" and stream["security"] == [{"bearer": []}, {"session": []}]
    assert stream["x-portunus-access"] == "owner"
    assert "security" not in spec["paths"]["/v1/openapi.json"]["get"]
