"""The routes of one SNI port (SPEC §2.8): exact > single-label wildcard > fallback."""

from __future__ import annotations

import pytest

from portunus.relay.sni_router import SniRouter


@pytest.fixture
def router() -> SniRouter:
    r = SniRouter()
    for pattern, route in [("example.com", "apex"), ("a.example.com", "exact-a"), ("*.example.com", "wild"),
                           ("*.deep.example.org", "deep-wild"), ("mixed.example.net", "mixed")]:
        assert r.add(pattern, route)
    return r


@pytest.mark.parametrize("name,fallback,expected", [
    ("a.example.com", "fb", ("exact-a", "exact")),
    ("A.EXAMPLE.COM", "fb", ("exact-a", "exact")),
    ("a.example.com.", "fb", ("exact-a", "exact")),
    ("example.com", "fb", ("apex", "exact")),
    ("b.example.com", "fb", ("wild", "wildcard")),
    ("B.Example.Com", None, ("wild", "wildcard")),
    ("x.deep.example.org", None, ("deep-wild", "wildcard")),
    ("a.b.example.com", "fb", ("fb", "fallback")),   # a wildcard covers one label only
    ("a.b.example.com", None, (None, "none")),
    ("deep.example.org", "fb", ("fb", "fallback")),  # nor its own apex
    ("Mixed.Example.NET", None, ("mixed", "exact")),
    ("other.test", "fb", ("fb", "fallback")),
    ("other.test", None, (None, "none")),
    ("com", "fb", ("fb", "fallback")),
    (None, "fb", ("fb", "fallback")),
    (None, None, (None, "none")),
    ("", "fb", ("fb", "fallback")),
])
def test_route_precedence(router, name, fallback, expected):
    if fallback is not None:
        assert router.add(None, fallback)
    assert router.route(name) == expected


def test_exact_beats_wildcard_whatever_the_order():
    for order in ([("*.example.com", 1), ("a.example.com", 2)], [("a.example.com", 2), ("*.example.com", 1)]):
        r = SniRouter()
        for p, route in order:
            r.add(p, route)
        assert r.route("a.example.com") == (2, "exact")
        assert r.route("z.example.com") == (1, "wildcard")


def test_the_longest_wildcard_is_the_one_that_matches():
    r = SniRouter()
    r.add("*.example.com", "short")
    r.add("*.b.example.com", "long")
    assert r.route("a.b.example.com") == ("long", "wildcard")
    assert r.route("b.example.com") == ("short", "wildcard")


def test_a_held_pattern_or_fallback_is_refused_and_removal_only_by_its_holder():
    r = SniRouter()
    assert r.add("a.example.com", "one") and r.add(None, "fb")
    assert not r.add("A.example.com", "two") and not r.add(None, "fb2")
    assert r.add("a.example.com", "one")  # re-adding by the holder is a no-op
    r.remove("a.example.com", "two")
    assert r.holder("a.example.com") == "one"
    r.remove("a.example.com", "one")
    assert r.route("a.example.com") == ("fb", "fallback")
    assert (r.sni_routes, bool(r)) == (0, True)
    r.remove(None, "fb")
    assert not r


def test_a_real_hello_parsed_then_routed():
    from test_sni import real_hello
    from portunus.relay.sni import parse_client_hello
    r = SniRouter()
    r.add("*.example.com", "wild")
    r.add(None, "fb")
    assert r.route(parse_client_hello(real_hello("API.Example.com")).server_name) == ("wild", "wildcard")
    assert r.route(parse_client_hello(real_hello(None)).server_name) == ("fb", "fallback")
