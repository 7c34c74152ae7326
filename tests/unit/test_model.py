"""Rule validation: the one place that accepts or refuses a rule, shared by every role."""

from __future__ import annotations

import json

import pytest

from portunus.errors import PortunusError
from portunus.model import (
    MAX_TARGETS,
    RateLimit,
    Rule,
    Target,
    parse_port,
    parse_port_span,
    listen_hosts_overlap,
    listeners_overlap,
    parse_target,
    parse_target_spec,
    parse_target_text,
    same_listeners,
    shared_listen_port,
    split_host_port,
    validate_host,
    validate_sni_pattern,
)


_DROP = object()


def rule(**fields) -> Rule:
    d = {"rule_id": "r1", "listen_port": 8080, "target": "10.0.0.5:80"}
    d.update(fields)
    d = {k: v for k, v in d.items() if v is not _DROP}
    return Rule.from_dict(d)


def refused(code: str, d=_DROP, **kw) -> PortunusError:
    """Assert ``Rule.from_dict(d)`` (or of the default rule with ``kw`` changed) refuses with ``code``."""
    with pytest.raises(PortunusError) as ei:
        if d is not _DROP:
            Rule.from_dict(d, **kw)
        else:
            rule(**kw)
    assert ei.value.code == code, ei.value.message
    return ei.value


# ---------------------------------------------------------------- happy paths


def test_minimal_tcp_rule_defaults():
    r = rule()
    assert r.rule_id == "r1"
    assert r.protocol == "tcp"
    assert (r.listen_port, r.listen_port_end) == (8080, 8080)
    assert r.listen_host == "0.0.0.0"
    assert r.targets == (Target(host="10.0.0.5", port=80),)
    assert r.prefer_ipv6 is False
    assert r.sni_pattern is None and r.rate_limit is None and r.owner is None
    assert r.is_range is False and r.is_multi_target is False
    assert r.port_count == 1
    assert list(r.listen_ports) == [8080]
    assert r.listen_label == "8080"


def test_id_alias_and_string_port_and_udp():
    r = Rule.from_dict({"id": "abc", "protocol": "udp", "listen_port": " 5353 ", "target": "dns.example:53"})
    assert r.rule_id == "abc"
    assert r.protocol == "udp"
    assert r.listen_port == 5353
    assert r.targets[0].host == "dns.example"


def test_dns_target_is_lowercased_and_trailing_dot_dropped():
    r = rule(target="Backend.Example.COM.:443")
    assert r.targets[0].host == "backend.example.com"
    assert r.targets[0].port == 443


@pytest.mark.parametrize("text,host,port", [
    ("[::1]:8080", "::1", 8080),
    ("[2001:DB8::1]:443", "2001:db8::1", 443),
    ("[fe80::1%eth0]:22", "fe80::1%eth0", 22),
    ("127.0.0.1:1", "127.0.0.1", 1),
    ("host:65535", "host", 65535),
])
def test_target_forms(text, host, port):
    r = rule(target=text)
    assert (r.targets[0].host, r.targets[0].port) == (host, port)


def test_ipv6_target_label_keeps_brackets():
    r = rule(target="[2001:db8::7]:9000")
    assert r.targets[0].label() == "[2001:db8::7]:9000"


def test_ipv6_listen_host_is_accepted_and_normalised():
    assert rule(listen_host="::").listen_host == "::"
    assert rule(listen_host="[2001:DB8::1]").listen_host == "2001:db8::1"
    assert rule(listen_host="127.0.0.1").listen_host == "127.0.0.1"


def test_tcp_and_udp_rules_on_the_same_port_have_distinct_listeners():
    t = rule(protocol="tcp")
    u = rule(protocol="udp")
    assert not same_listeners(t, u)
    assert same_listeners(t, rule(rule_id="other", target="10.9.9.9:1"))
    assert not same_listeners(t, rule(listen_host="127.0.0.1"))


# ---------------------------------------------------------------- port ranges


def test_port_range_via_listen_string():
    r = rule(listen_port=_DROP, listen="30000-30050", target="h:40000-40050")
    assert (r.listen_port, r.listen_port_end) == (30000, 30050)
    assert r.is_range and r.port_count == 51
    assert r.listen_label == "30000-30050"
    t = r.targets[0]
    assert (t.port, t.port_end) == (40000, 40050)
    assert t.label() == "h:40000-40050"


def test_port_range_via_listen_port_and_end():
    r = rule(listen_port=30000, listen_port_end=30002, target="h:30000-30002")
    assert list(r.listen_ports) == [30000, 30001, 30002]


def test_port_range_via_listen_port_string():
    r = rule(listen_port="100-101", target="h:200-201")
    assert (r.listen_port, r.listen_port_end) == (100, 101)


def test_range_width_mismatch_names_both_widths():
    e = refused("validation.port_range_width_mismatch",
                listen_port=_DROP, listen="30000-30050", target="h:30000-30040")
    assert "30000-30050" in e.message
    assert "51" in e.message and "41" in e.message


def test_range_with_single_port_target_is_refused_with_a_hint():
    e = refused("validation.port_range_width_mismatch",
                listen_port=_DROP, listen="30000-30002", target="h:30000")
    assert "30000-30002" in e.message
    assert "h:30000-30002" in e.message  # the suggested fix


def test_single_port_with_range_target_is_a_width_mismatch():
    refused("validation.port_range_width_mismatch", target="h:80-81")


def test_range_ending_before_it_starts():
    e = refused("validation.invalid_port_range", listen_port=_DROP, listen="30050-30000")
    assert "30050-30000" in e.message
    e = refused("validation.invalid_port_range", listen_port=500, listen_port_end=400)
    assert "400" in e.message and "500" in e.message


def test_range_rule_max_ports_default_1024():
    r = rule(listen_port=_DROP, listen="1-1024", target="h:1-1024")
    assert r.port_count == 1024
    e = refused("validation.port_range_too_large", listen_port=_DROP, listen="1-1025", target="h:1-1025")
    assert "1-1025" in e.message
    assert "1025" in e.message and "1024" in e.message
    assert "range_rule_max_ports" in e.message


def test_range_rule_max_ports_is_configurable():
    d = {"rule_id": "r", "listen": "100-110", "target": "h:100-110"}
    assert Rule.from_dict(d, max_range_ports=11).port_count == 11
    e = refused("validation.port_range_too_large", d, max_range_ports=10)
    assert "10" in e.message and "11" in e.message


def test_range_rule_takes_exactly_one_target():
    refused("validation.invalid_target", listen_port=_DROP, listen="100-101", target=_DROP,
            targets=["a:100-101", "b:100-101"])
    refused("validation.invalid_target", listen_port=_DROP, listen="100-101", target=_DROP,
            targets=[{"host": "a", "port": 100}, {"host": "b", "port": 200}])


def test_range_rule_with_single_target_list_is_fine():
    r = rule(listen_port=_DROP, listen="100-101", target=_DROP, targets=["a:200-201"])
    assert r.targets[0].port_end == 201


def test_target_range_past_65535_is_refused():
    e = refused("validation.invalid_port", listen_port=_DROP, listen="100-101", target="h:65535-65536")
    assert "65536" in e.message


# ---------------------------------------------------------------- ports


@pytest.mark.parametrize("bad", [0, 65536, -1, "0", "65536", "http", "", " ", True, False, 80.0, None, [80],
                                 "８０", "²", "1e3", "0x50", "+80"])
def test_invalid_listen_port_names_the_value(bad):
    e = refused("validation.invalid_port" if bad is not None else "validation.invalid_listen",
                listen_port=bad)
    if bad is not None:
        assert (str(bad).strip() if isinstance(bad, str) and bad.strip().isdigit() else repr(bad)) in e.message


@pytest.mark.parametrize("good,want", [(1, 1), (65535, 65535), ("443", 443), (" 22 ", 22)])
def test_parse_port_accepts(good, want):
    assert parse_port(good) == want


@pytest.mark.parametrize("text,want", [("80", (80, 80)), (80, (80, 80)), ("1-2", (1, 2)), ("7-7", (7, 7))])
def test_parse_port_span(text, want):
    assert parse_port_span(text) == want


@pytest.mark.parametrize("bad", ["-5", "5-", "1-2-3", "a-b"])
def test_parse_port_span_refuses(bad):
    with pytest.raises(PortunusError) as ei:
        parse_port_span(bad)
    assert ei.value.code == "validation.invalid_port"


def test_listen_and_listen_port_together_are_refused():
    refused("validation.invalid_listen", listen="80")


def test_missing_listen_is_refused():
    refused("validation.invalid_listen", listen_port=_DROP)


# ---------------------------------------------------------------- targets


@pytest.mark.parametrize("bad", ["noport", "host:", ":80", "::1:80", "[::1]", "[::1]80", "[::1", "", "  ",
                                 "bad_host!:80", "-lead.example:80", "a..b:80", "x" * 64 + ".com:80"])
def test_invalid_target_text(bad):
    with pytest.raises(PortunusError) as ei:
        rule(target=bad)
    assert ei.value.code in ("validation.invalid_target", "validation.invalid_port")
    if bad.strip():
        # the message names what the user wrote, or the part of it that is wrong
        host, _, port = bad.strip().rpartition(":")
        assert any(part in ei.value.message for part in (repr(bad.strip()), repr(host), repr(port)))


def test_split_host_port():
    assert split_host_port("a.example:80") == ("a.example", "80")
    assert split_host_port("[::1]:80") == ("::1", "80")
    assert split_host_port("h:1-9") == ("h", "1-9")


def test_validate_host():
    assert validate_host("10.1.2.3") == "10.1.2.3"
    assert validate_host("[::ffff:10.1.2.3]") == "::ffff:a01:203"
    assert validate_host("MiXeD.example") == "mixed.example"
    with pytest.raises(PortunusError) as ei:
        validate_host("a" * 254)
    assert ei.value.code == "validation.invalid_target"
    with pytest.raises(PortunusError):
        validate_host(None)


def test_parse_target_text_range():
    t = parse_target_text("h:10-12")
    assert (t.host, t.port, t.port_end) == ("h", 10, 12)
    assert parse_target_text("h:10-10").port_end is None


# ---------------------------------------------------------------- host:port@priority


def test_target_spec_with_and_without_priority():
    assert parse_target_spec("10.0.0.1:80@5") == Target(host="10.0.0.1", port=80, priority=5)
    assert parse_target_spec("10.0.0.1:80", index=2).priority == 3  # list position + 1
    t = parse_target_spec("[2001:DB8::1]:443@0")
    assert (t.host, t.port, t.priority) == ("2001:db8::1", 443, 0)
    t = parse_target_spec("h:10-12@2")
    assert (t.port, t.port_end, t.priority) == (10, 12, 2)


@pytest.mark.parametrize("text, code", [
    ("h:80@x", "validation.out_of_range"),
    ("h:80@65536", "validation.out_of_range"),
    ("h:80@\u00b2", "validation.out_of_range"),  # not an ASCII digit
    ("h:0@1", "validation.invalid_port"),
    ("h@1", "validation.invalid_target"),
    (None, "validation.invalid_target"),
])
def test_bad_target_specs_name_the_given_text(text, code):
    with pytest.raises(PortunusError) as ei:
        parse_target_spec(text, 0, f"--target {text!r}")
    assert ei.value.code == code
    assert f"--target {text!r}" in ei.value.message


def test_rule_targets_as_strings_and_objects_parse_alike():
    assert parse_target("10.0.0.1:80@2", 0) == parse_target({"host": "10.0.0.1", "port": 80, "priority": 2}, 0)
    assert rule(target=_DROP, targets=["a.test:1@9", {"host": "b.test", "port": 2}]).targets == (
        Target(host="a.test", port=1, priority=9), Target(host="b.test", port=2, priority=2))


# ---------------------------------------------------------------- listener overlap


@pytest.mark.parametrize("a, b, clash", [
    ("0.0.0.0", "127.0.0.1", True),
    ("::", "127.0.0.1", True),
    ("127.0.0.1", "::", True),
    ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.1", "127.0.0.2", False),
    ("::1", "127.0.0.1", False),
])
def test_listen_hosts_overlap_when_equal_or_either_is_a_wildcard(a, b, clash):
    assert listen_hosts_overlap(a, b) is clash
    assert listen_hosts_overlap(b, a) is clash


def range_rule(rule_id, listen, protocol="tcp", host="0.0.0.0") -> Rule:
    start, _, end = listen.partition("-")
    width = int(end or start) - int(start)
    return rule(rule_id=rule_id, listen_port=_DROP, listen=listen, protocol=protocol, listen_host=host,
                target=f"10.0.0.5:{20000}-{20000 + width}" if width else "10.0.0.5:20000")


@pytest.mark.parametrize("first, second, port", [
    ("30000-30050", "30050-30060", 30050),   # overlaps the top
    ("30000-30050", "29990-30000", 30000),   # overlaps the bottom
    ("30000-30050", "30010-30020", 30010),   # inside
    ("30010", "30000-30050", 30010),         # a single port inside a range
    ("30000-30050", "30051-30060", None),    # adjacent
    ("8080", "8081", None),
])
def test_shared_listen_port_is_the_lowest_port_both_would_bind(first, second, port):
    a, b = range_rule("a", first), range_rule("b", second)
    assert shared_listen_port(a, b) == port
    assert shared_listen_port(b, a) == port
    assert listeners_overlap(a, b) is (port is not None)


def test_listeners_of_other_protocols_or_distinct_hosts_never_overlap():
    assert not listeners_overlap(range_rule("a", "8080"), range_rule("b", "8080", protocol="udp"))
    assert not listeners_overlap(range_rule("a", "8080", host="127.0.0.1"),
                                 range_rule("b", "8080", host="127.0.0.2"))
    assert listeners_overlap(range_rule("a", "8080", host="127.0.0.1"), range_rule("b", "8080", host="::"))


def test_target_and_targets_together_are_refused():
    refused("validation.invalid_target", targets=["a:1"])


def test_no_target_is_refused():
    refused("validation.invalid_target", target=_DROP)


@pytest.mark.parametrize("bad", [[], "a:1", {"host": "a", "port": 1}])
def test_targets_must_be_a_non_empty_list(bad):
    refused("validation.invalid_target", target=_DROP, targets=bad)


def test_targets_list_with_priorities_and_proxy_protocol():
    r = rule(target=_DROP, targets=[
        {"host": "10.0.0.1", "port": 80, "priority": 20, "proxy_protocol": "v1"},
        {"host": "[2001:db8::2]", "port": 81, "priority": 10, "proxy_protocol": "v2"},
        {"host": "backup.example", "port": 82},
    ])
    assert r.is_multi_target
    hosts = [t.host for t in r.targets]
    assert hosts == ["10.0.0.1", "2001:db8::2", "backup.example"]
    assert [t.priority for t in r.targets] == [20, 10, 3]  # missing priority: list position (1-based)
    assert [t.proxy_protocol for t in r.targets] == ["v1", "v2", None]
    assert [i for i, _ in r.ordered_targets()] == [2, 1, 0]


def test_priority_ties_keep_list_order():
    r = rule(target=_DROP, targets=[
        {"host": "a", "port": 1, "priority": 5},
        {"host": "b", "port": 2, "priority": 1},
        {"host": "c", "port": 3, "priority": 5},
        {"host": "d", "port": 4, "priority": 1},
    ])
    assert [t.host for _, t in r.ordered_targets()] == ["b", "d", "a", "c"]


def test_string_targets_with_at_priority():
    r = rule(target=_DROP, targets=["a:1@7", "b:2", "[::1]:3@0"])
    assert [(t.host, t.port, t.priority) for t in r.targets] == [("a", 1, 7), ("b", 2, 2), ("::1", 3, 0)]
    assert [t.host for _, t in r.ordered_targets()] == ["::1", "b", "a"]


@pytest.mark.parametrize("prio", [-1, 65536, "high", True, 1.5, "--5", "²"])
def test_invalid_priority_is_out_of_range_and_named(prio):
    e = refused("validation.out_of_range", target=_DROP,
                targets=[{"host": "a", "port": 1, "priority": prio}])
    assert repr(prio) in e.message
    assert "targets[0] priority" in e.message


def test_invalid_priority_in_at_form_is_refused_cleanly():
    for text in ("a:1@--5", "a:1@x", "a:1@99999", "a:1@²"):
        e = refused("validation.out_of_range", target=_DROP, targets=[text])
        assert text.split("@")[1] in e.message


def test_max_eight_targets():
    eight = [f"10.0.0.{i}:80" for i in range(1, MAX_TARGETS + 1)]
    assert len(rule(target=_DROP, targets=eight).targets) == 8
    e = refused("validation.too_many_targets", target=_DROP, targets=eight + ["10.0.0.9:80"])
    assert "9" in e.message and "8" in e.message


def test_target_object_field_errors():
    e = refused("validation.unknown_field", target=_DROP, targets=[{"host": "a", "port": 1, "weight": 3}])
    assert "weight" in e.message
    refused("validation.invalid_target", target=_DROP, targets=[{"host": "a"}])
    refused("validation.invalid_target", target=_DROP, targets=[{"port": 1}])
    e = refused("validation.invalid_target", target=_DROP, targets=[42])
    assert "42" in e.message
    e = refused("validation.invalid_port", target=_DROP, targets=[{"host": "a", "port": 0}])
    assert "targets[0] port" in e.message and "0" in e.message


def test_error_names_the_index_of_the_bad_target():
    e = refused("validation.invalid_target", target=_DROP,
                targets=["good:1", {"host": "bad host", "port": 2}])
    assert "targets[1]" in e.message
    assert "'bad host'" in e.message


def test_target_as_object():
    r = rule(target={"host": "a", "port": 9, "proxy_protocol": "v2"})
    assert r.targets == (Target(host="a", port=9, priority=1, proxy_protocol="v2"),)


# ---------------------------------------------------------------- PROXY protocol


@pytest.mark.parametrize("bad", ["v3", "V1", "1", 1, True, ""])
def test_proxy_protocol_invalid_names_value(bad):
    e = refused("validation.proxy_protocol_invalid", target=_DROP,
                targets=[{"host": "a", "port": 1, "proxy_protocol": bad}])
    assert repr(bad) in e.message


def test_proxy_protocol_on_udp_is_refused():
    refused("validation.proxy_protocol_on_unsupported_rule", protocol="udp", target=_DROP,
            targets=[{"host": "a", "port": 1, "proxy_protocol": "v1"}])


def test_udp_without_proxy_protocol_is_fine():
    r = rule(protocol="udp", target=_DROP, targets=[{"host": "a", "port": 1, "proxy_protocol": None}])
    assert r.targets[0].proxy_protocol is None


# ---------------------------------------------------------------- SNI


@pytest.mark.parametrize("pattern,want", [
    ("example.com", "example.com"),
    ("*.example.com", "*.example.com"),
    ("API.Example.COM", "api.example.com"),
    ("*.a.b.example", "*.a.b.example"),
    ("localhost", "localhost"),
])
def test_sni_pattern_accepted_and_lowercased(pattern, want):
    assert rule(sni_pattern=pattern).sni_pattern == want
    assert validate_sni_pattern(pattern) == want


@pytest.mark.parametrize("bad", ["", "*", "*.com", "a.*.com", "*example.com", "**.example.com",
                                 "exa mple.com", "example.com.", "bücher.example", "x" * 254,
                                 "a" * 64 + ".com", "-a.example", 5])
def test_sni_pattern_invalid_names_value(bad):
    e = refused("validation.sni_pattern_malformed", sni_pattern=bad)
    if isinstance(bad, str) and bad and len(bad) < 100:
        assert bad.lower() in e.message or repr(bad) in e.message


def test_sni_on_udp_or_range_is_refused():
    refused("validation.sni_on_unsupported_rule", protocol="udp", sni_pattern="a.example")
    refused("validation.sni_on_unsupported_rule", listen_port=_DROP, listen="100-101",
            target="h:100-101", sni_pattern="a.example")


# ---------------------------------------------------------------- rate limits


def test_rate_limit_all_caps_and_default_bursts():
    rl = rule(rate_limit={"bandwidth_in_bps": 1000, "bandwidth_out_bps": 2000,
                          "new_connections_per_sec": 10, "concurrent_connections": 5}).rate_limit
    assert rl == RateLimit(bandwidth_in_bps=1000, bandwidth_out_bps=2000,
                           new_connections_per_sec=10, concurrent_connections=5)
    assert rl.has_bandwidth_cap
    assert rl.bandwidth_in_burst is None  # "one second of rate" is applied by the limiter


def test_connection_caps_alone_are_not_a_bandwidth_cap():
    rl = RateLimit.from_dict({"new_connections_per_sec": 3, "concurrent_connections": 2})
    assert not rl.has_bandwidth_cap
    assert RateLimit.from_dict({"bandwidth_out_bps": 1}).has_bandwidth_cap


@pytest.mark.parametrize("rate_field,burst_field", [
    ("bandwidth_in_bps", "bandwidth_in_burst"),
    ("bandwidth_out_bps", "bandwidth_out_burst"),
    ("new_connections_per_sec", "new_connections_burst"),
])
def test_burst_bounds_are_rate_over_100_to_rate_times_60(rate_field, burst_field):
    rate = 1000
    for ok in (10, 1000, 60000):
        rl = RateLimit.from_dict({rate_field: rate, burst_field: ok})
        assert getattr(rl, burst_field) == ok
    for bad in (9, 60001, 0, -1):
        with pytest.raises(PortunusError) as ei:
            RateLimit.from_dict({rate_field: rate, burst_field: bad})
        assert ei.value.code == "validation.rate_limit_burst_range"
        assert repr(bad) in ei.value.message
        assert burst_field in ei.value.message
        assert "[10, 60000]" in ei.value.message
    for bad in (True, 1.5, "100"):
        with pytest.raises(PortunusError) as ei:
            RateLimit.from_dict({rate_field: rate, burst_field: bad})
        assert ei.value.code == "validation.rate_limit_invalid"
        assert repr(bad) in ei.value.message and burst_field in ei.value.message


def test_burst_lower_bound_with_fractional_rate_over_100():
    # rate 50 -> lower bound ceil(0.5) = 1: burst 1 is fine; the bounds in the message are whole numbers
    assert RateLimit.from_dict({"new_connections_per_sec": 50, "new_connections_burst": 1}).new_connections_burst == 1
    assert RateLimit.from_dict({"new_connections_per_sec": 50, "new_connections_burst": 3000}).new_connections_burst == 3000
    with pytest.raises(PortunusError) as ei:
        RateLimit.from_dict({"new_connections_per_sec": 50, "new_connections_burst": 3001})
    assert ei.value.code == "validation.rate_limit_burst_range"
    assert "[1, 3000]" in ei.value.message
    with pytest.raises(PortunusError) as ei:
        RateLimit.from_dict({"new_connections_per_sec": 150, "new_connections_burst": 1})
    assert "[2, 9000]" in ei.value.message


def test_burst_without_its_rate_is_refused():
    with pytest.raises(PortunusError) as ei:
        RateLimit.from_dict({"concurrent_connections": 4, "bandwidth_in_burst": 100})
    assert ei.value.code == "validation.rate_limit_burst_without_rate"
    assert "bandwidth_in_burst" in ei.value.message and "bandwidth_in_bps" in ei.value.message


@pytest.mark.parametrize("field", ["bandwidth_in_bps", "bandwidth_out_bps", "new_connections_per_sec",
                                   "concurrent_connections"])
@pytest.mark.parametrize("bad", [0, -5, True, 1.5, "100", 1 << 63])
def test_zero_negative_and_non_integer_rates_are_refused(field, bad):
    code = "validation.rate_limit_cap_zero" if bad == 0 and bad is not False else "validation.rate_limit_invalid"
    e = refused(code, rate_limit={field: bad})
    assert e.exit_code == 2
    assert field in e.message
    assert repr(bad) in e.message


def test_caps_up_to_2_63_minus_1_are_valid():
    big = (1 << 63) - 1
    assert RateLimit.from_dict({"bandwidth_in_bps": big, "bandwidth_in_burst": big}).bandwidth_in_burst == big


def test_rate_limit_with_no_caps():
    e = refused("validation.rate_limit_no_caps_provided", rate_limit={})
    assert e.exit_code == 3
    refused("validation.rate_limit_no_caps_provided", rate_limit={"bandwidth_in_bps": None})


def test_rate_limit_must_be_an_object():
    e = refused("validation.rate_limit_invalid", rate_limit=[1000])
    assert "[1000]" in e.message


def test_rate_limit_unknown_field():
    e = refused("validation.unknown_field", rate_limit={"bandwidth_bps": 5})
    assert "bandwidth_bps" in e.message


def test_rate_limit_to_dict_round_trip():
    d = {"bandwidth_in_bps": 1000, "bandwidth_in_burst": 2000, "concurrent_connections": 7}
    rl = RateLimit.from_dict(d)
    assert rl.to_dict() == d
    assert RateLimit.from_dict(rl.to_dict()) == rl
    assert RateLimit.from_dict(None) is None


# ---------------------------------------------------------------- other fields


@pytest.mark.parametrize("bad", [None, "", "-lead", "has space", "a/b", "x" * 129, 7, "é"])
def test_invalid_rule_id_names_value(bad):
    e = refused("validation.invalid_rule_id", rule_id=bad)
    assert repr(bad) in e.message


def test_rule_id_edge_lengths_and_charset():
    assert rule(rule_id="x" * 128).rule_id == "x" * 128
    assert rule(rule_id="01J9Z:web.prod_1-a").rule_id == "01J9Z:web.prod_1-a"


@pytest.mark.parametrize("bad", ["TCP", "sctp", "", 6, None])
def test_invalid_protocol_names_value(bad):
    e = refused("validation.invalid_protocol", protocol=bad)
    assert repr(bad) in e.message


@pytest.mark.parametrize("bad", ["example.com", "999.1.1.1", "::g", "1.2.3"])
def test_invalid_listen_host_names_value(bad):
    e = refused("validation.invalid_listen_host", listen_host=bad)
    assert repr(bad) in e.message


@pytest.mark.parametrize("bad", ["true", 1, 0, "false"])
def test_prefer_ipv6_must_be_bool(bad):
    e = refused("validation.invalid_bool", prefer_ipv6=bad)
    assert repr(bad) in e.message


def test_prefer_ipv6_true():
    assert rule(prefer_ipv6=True).prefer_ipv6 is True


def test_health_check_interval_bounds():
    assert rule(health_check_interval_secs=1).health_check_interval_secs == 1
    assert rule(health_check_interval_secs="3600").health_check_interval_secs == 3600
    for bad in (0, 3601, -1, "soon", True):
        e = refused("validation.out_of_range", health_check_interval_secs=bad)
        assert repr(bad) in e.message
        assert "health_check_interval_secs" in e.message


def test_health_check_refused_where_not_server_pushed():
    d = {"rule_id": "r", "listen_port": 1, "target": "h:1", "health_check_interval_secs": 5}
    refused("validation.health_check_unsupported", d, allow_health_check=False)
    assert Rule.from_dict(d).health_check_interval_secs == 5


def test_udp_tunables_bounds():
    r = rule(protocol="udp", udp_max_flows=1, udp_flow_idle_secs=300)
    assert (r.udp_max_flows, r.udp_flow_idle_secs) == (1, 300)
    assert rule(udp_max_flows=65535, udp_flow_idle_secs=30).udp_max_flows == 65535
    for field, bad in (("udp_max_flows", 0), ("udp_max_flows", 65536),
                       ("udp_flow_idle_secs", 29), ("udp_flow_idle_secs", 301)):
        e = refused("validation.out_of_range", **{field: bad})
        assert field in e.message and repr(bad) in e.message


def test_owner_must_be_a_string():
    assert rule(owner="alice").owner == "alice"
    e = refused("validation.invalid_owner", owner=12)
    assert "12" in e.message


def test_unknown_rule_fields_are_named():
    e = refused("validation.unknown_field", colour="red", zebra=1)
    assert "colour" in e.message and "zebra" in e.message


@pytest.mark.parametrize("bad", [None, [], "rule", 3])
def test_rule_must_be_an_object(bad):
    e = refused("validation.invalid_rule", bad)
    assert type(bad).__name__ in e.message


def test_every_rule_refusal_is_a_400_with_exit_2_except_no_caps():
    cases = [
        {"rule_id": "r"},
        {"rule_id": "r", "listen_port": 0, "target": "h:1"},
        {"rule_id": "r", "listen": "9-1", "target": "h:1"},
        {"rule_id": "r", "listen_port": 1, "target": "nope"},
        {"rule_id": "r", "listen_port": 1, "target": "h:1", "sni_pattern": "*"},
        {"rule_id": "r", "listen_port": 1, "target": "h:1", "rate_limit": {"bandwidth_in_bps": 0}},
        {"rule_id": "r", "listen_port": 1, "target": "h:1", "bogus": 1},
        {"rule_id": "r", "listen": "1-2000", "target": "h:1-2000"},
        {"rule_id": "r", "listen_port": 1, "targets": [f"h:{i}" for i in range(1, 10)]},
    ]
    for d in cases:
        with pytest.raises(PortunusError) as ei:
            Rule.from_dict(d)
        assert ei.value.code.startswith("validation."), ei.value.code
        assert (ei.value.http_status, ei.value.exit_code) == (400, 2), ei.value.code


# ---------------------------------------------------------------- to_dict round trips


ROUND_TRIP = [
    {"rule_id": "single", "listen_port": 8080, "target": "10.0.0.5:80"},
    {"rule_id": "v6", "listen_port": 443, "listen_host": "::", "target": "[2001:db8::1]:8443",
     "prefer_ipv6": True},
    {"rule_id": "range", "listen": "30000-30050", "target": "backend.example:40000-40050", "owner": "alice"},
    {"rule_id": "multi", "listen_port": 80, "targets": [
        {"host": "a.example", "port": 80, "priority": 2, "proxy_protocol": "v1"},
        {"host": "10.0.0.2", "port": 81, "priority": 1, "proxy_protocol": "v2"}],
     "health_check_interval_secs": 10},
    {"rule_id": "sni", "listen_port": 443, "target": "10.0.0.9:443", "sni_pattern": "*.example.com",
     "rate_limit": {"bandwidth_in_bps": 1000000, "bandwidth_in_burst": 2000000,
                    "new_connections_per_sec": 50}},
    {"rule_id": "udp", "protocol": "udp", "listen_port": 5353, "target": "1.1.1.1:53",
     "udp_max_flows": 100, "udp_flow_idle_secs": 45},
]


@pytest.mark.parametrize("d", ROUND_TRIP, ids=[d["rule_id"] for d in ROUND_TRIP])
def test_to_dict_round_trips_through_from_dict_and_json(d):
    """What one role writes (to_dict over JSON) another role must accept unchanged."""
    r = Rule.from_dict(d)
    wire = json.loads(json.dumps(r.to_dict()))
    again = Rule.from_dict(wire)
    assert again == r
    assert again.to_dict() == r.to_dict()


def test_to_dict_shape_carries_the_api_fields():
    r = Rule.from_dict(ROUND_TRIP[3])
    d = r.to_dict()
    assert d["targets"] == [
        {"host": "a.example", "port": 80, "priority": 2, "proxy_protocol": "v1"},
        {"host": "10.0.0.2", "port": 81, "priority": 1, "proxy_protocol": "v2"},
    ]
    for key in ("rule_id", "protocol", "listen_port", "listen_port_end", "prefer_ipv6", "sni_pattern",
                "rate_limit", "health_check_interval_secs", "owner"):
        assert key in d


def test_range_target_to_dict_carries_its_end_and_parses_back():
    r = Rule.from_dict(ROUND_TRIP[2])
    assert r.to_dict()["targets"] == [{"host": "backend.example", "port": 40000, "port_end": 40050,
                                       "priority": 1, "proxy_protocol": None}]


def test_target_object_port_end_is_validated():
    base = {"rule_id": "r", "listen": "10-11"}
    e = refused("validation.invalid_port_range", {**base, "targets": [{"host": "h", "port": 20, "port_end": 19}]})
    assert "19" in e.message and "20" in e.message
    refused("validation.invalid_port", {**base, "targets": [{"host": "h", "port": 20, "port_end": 70000}]})
    refused("validation.port_range_width_mismatch",
            {**base, "targets": [{"host": "h", "port": 20, "port_end": 25}]})


def test_active_health_checks_are_tcp_only():
    from portunus.errors import PortunusError
    with pytest.raises(PortunusError) as e:
        Rule.from_dict({"rule_id": "u", "protocol": "udp", "listen_port": 5000,
                        "targets": [{"host": "a", "port": 1}, {"host": "b", "port": 2}],
                        "health_check_interval_secs": 5})
    assert e.value.code == "validation.health_check_on_unsupported_rule"
    assert "TCP rules only" in e.value.message


# ---------------------------------------------------------------- port modes (SPEC §2.8)

def _on(port, rule_id, **kw):
    from portunus.model import Rule
    return Rule.from_dict({"rule_id": rule_id, "listen_port": port, "target": "10.0.0.9:443", **kw})


def _conflict(new, *others):
    from portunus.model import port_conflict
    err = port_conflict(new, [(o, True) for o in others])
    return None if err is None else (err.code, err.fields.get("rule_id"))


def test_port_modes_the_first_rule_decides():
    sni_a = _on(443, "a", sni_pattern="a.example.com")
    plain = _on(443, "p")
    assert _conflict(plain, sni_a) is None  # the fallback
    assert _conflict(_on(443, "p2"), sni_a, plain) == ("conflict.sni_fallback_duplicate", "p")
    assert _conflict(_on(443, "b", sni_pattern="*.example.com"), sni_a, plain) is None
    assert _conflict(_on(443, "a2", sni_pattern="A.Example.com"), sni_a) == ("conflict.sni_route_duplicate", "a")
    assert _conflict(_on(443, "s", sni_pattern="a.example.com"), plain) == ("conflict.legacy_to_sni_unsupported", "p")
    assert _conflict(_on(443, "p2"), plain) == ("port_in_use", "p")


def test_port_modes_only_same_host_single_port_tcp_rules_share():
    sni_a = _on(443, "a", sni_pattern="a.example.com")
    assert _conflict(_on(443, "h", sni_pattern="b.example.com", listen_host="10.0.0.1"), sni_a) == ("port_in_use", "a")
    rng = _on("440-450", "r", target="10.0.0.9:440-450")
    assert _conflict(rng, sni_a) == ("port_in_use", "a")
    assert _conflict(_on(443, "u", protocol="udp"), sni_a) is None  # another protocol, another port
    assert _conflict(_on(8443, "o", sni_pattern="a.example.com"), sni_a) is None


def test_port_modes_pending_rules_do_not_decide_when_a_counting_one_exists():
    from portunus.model import port_conflict
    sni_pending, plain_active = _on(443, "s", sni_pattern="a.example.com"), _on(443, "p")
    err = port_conflict(_on(443, "n", sni_pattern="b.example.com"), [(sni_pending, False), (plain_active, True)])
    assert err.code == "conflict.legacy_to_sni_unsupported"
    assert port_conflict(_on(443, "n", sni_pattern="b.example.com"), [(sni_pending, True), (plain_active, True)]) is None
