"""stats_report validation: only trusted shapes of a client's own rules are kept (issue 8 point 2)."""

from __future__ import annotations

import pytest

from portunus.control import stats_report as sr
from portunus.control.stats_report import RuleShape, StatsRejected, clean_snapshot
from portunus.model import Rule
from portunus.server.core import StatsCache

SHAPES = {"r-range": RuleShape(8000, 8009, 1), "r-multi": RuleShape(9000, 9000, 3)}


def snap(rule_id="r-range", **extra) -> dict:
    base = {"rule_id": rule_id, "protocol": "tcp", "state": "active", "bytes_in": 10, "bytes_out": 20,
            "active_connections": 1, "updated_at": 1700000000.5}
    base.update(extra)
    return base


def rejected(s, shapes=SHAPES) -> str:
    with pytest.raises(StatsRejected) as info:
        clean_snapshot(s, shapes)
    return info.value.reason


def test_a_well_formed_snapshot_keeps_its_counters_and_fills_the_rest_with_zero():
    out = clean_snapshot(snap(), SHAPES)
    assert out["rule_id"] == "r-range" and out["bytes_in"] == 10 and out["bytes_out"] == 20
    assert out["datagrams_in"] == 0 and out["target_failovers_total"] == 0
    assert out["updated_at"] == 1700000000.5


def test_unknown_fields_are_dropped_so_a_snapshot_stays_bounded():
    out = clean_snapshot(snap(junk="x" * 100000, nested={"a": [1] * 1000}), SHAPES)
    assert "junk" not in out and "nested" not in out


def test_a_rule_of_another_client_or_an_invented_id_is_rejected():
    assert rejected(snap("someone-elses-rule")) == sr.UNKNOWN_RULE


@pytest.mark.parametrize("value", ["12", -1, 1 << 63, 1.5, True, object(), [1], {"a": 1}, float("nan")])
def test_counters_must_be_non_negative_integers_below_2_63(value):
    assert rejected(snap(bytes_in=value)) == sr.BAD_COUNTER


def test_the_largest_int64_counter_is_accepted():
    assert clean_snapshot(snap(bytes_out=(1 << 63) - 1), SHAPES)["bytes_out"] == (1 << 63) - 1


def test_a_null_counter_counts_as_zero():
    assert clean_snapshot(snap(dns_failures=None), SHAPES)["dns_failures"] == 0


@pytest.mark.parametrize("bad", [None, 5, "x", [{"rule_id": 1}]])
def test_a_snapshot_that_is_not_an_object_with_a_rule_id_is_rejected(bad):
    assert rejected(bad if not isinstance(bad, list) else bad[0]) == sr.MALFORMED


def test_per_port_rows_inside_the_range_are_kept_with_every_counter():
    out = clean_snapshot(snap(per_port=[{"listen_port": 8000, "bytes_in": 5}, {"listen_port": 8009}]), SHAPES)
    assert out["per_port"][0] == {"listen_port": 8000, "bytes_in": 5, "bytes_out": 0, "active_connections": 0,
                                  "datagrams_in": 0, "datagrams_out": 0}
    assert out["per_port"][1]["listen_port"] == 8009


@pytest.mark.parametrize("per_port", [
    "not a list",
    {"listen_port": 8000},
    [{"listen_port": 7999}],
    [{"listen_port": 8010}],
    [{"listen_port": "8000"}],
    [{"listen_port": True}],
    [{"bytes_in": 1}],
    [{"listen_port": 8000}, {"listen_port": 8000}],
    [{"listen_port": 8000, "bytes_in": "many"}],
    [{"listen_port": 8000, "bytes_out": -5}],
    ["row"],
    [{"listen_port": 8000 + i % 10} for i in range(11)],
])
def test_malformed_per_port_is_rejected(per_port):
    assert rejected(snap(per_port=per_port)) == sr.MALFORMED


def test_per_target_rows_are_checked_against_the_rule_targets():
    row = {"index": 2, "host": "10.0.0.3", "port": 80, "priority": 0, "proxy_protocol": None, "health": "failed",
           "consecutive_failures": 3, "last_failure_at": 5.0, "last_success_at": None, "bytes_in": 1,
           "bytes_out": 2, "connections": 1}
    out = clean_snapshot(snap("r-multi", per_target=[row]), SHAPES)
    assert out["per_target"] == [row]


@pytest.mark.parametrize("per_target", [
    "x",
    [{"index": 3}],
    [{"index": -1}],
    [{"index": "0"}],
    [{"index": 0}, {"index": 0}],
    [{"index": 0, "bytes_in": "1"}],
    [{"index": i} for i in range(4)],
])
def test_malformed_per_target_is_rejected(per_target):
    assert rejected(snap("r-multi", per_target=per_target)) == sr.MALFORMED


def test_reported_target_strings_are_bounded_and_odd_values_neutralised():
    row = {"index": 0, "host": "h" * 10000, "port": 99999, "health": "exploded", "last_failure_at": "yesterday"}
    [out] = clean_snapshot(snap("r-multi", per_target=[row]), SHAPES)["per_target"]
    assert len(out["host"]) == sr.MAX_TEXT and out["port"] is None
    assert out["health"] == "healthy" and out["last_failure_at"] is None


def test_rule_shape_from_a_rule_and_from_its_dict():
    multi = Rule.from_dict({"rule_id": "r1", "protocol": "tcp", "listen_port": 7000,
                            "targets": [{"host": "127.0.0.1", "port": 9000}, {"host": "127.0.0.2", "port": 9000}]},
                           max_range_ports=100)
    assert RuleShape.of(multi) == RuleShape(7000, 7000, 2)
    assert RuleShape.of(multi.to_dict()) == RuleShape(7000, 7000, 2)
    ranged = Rule.from_dict({"rule_id": "r2", "protocol": "tcp", "listen_port": 7000, "listen_port_end": 7004,
                             "targets": [{"host": "127.0.0.1", "port": 9000, "port_end": 9004}]},
                            max_range_ports=100)
    assert RuleShape.of(ranged) == RuleShape.of(ranged.to_dict()) == RuleShape(7000, 7004, 1)


def test_stats_cache_holds_one_snapshot_per_rule_and_forgets():
    cache = StatsCache()
    for i in range(3):
        cache.update("c1", {"rules": [clean_snapshot(snap(bytes_in=i), SHAPES)], "at": 1.0})
    assert cache.get("r-range")["bytes_in"] == 2 and cache.get("r-range")["client_id"] == "c1"
    assert len(cache._by_rule) == 1
    cache.forget("r-range")
    assert cache.get("r-range") is None


@pytest.mark.parametrize("at", [1e308, -5, float("inf"), "now", None, True, sr.LATEST_TIME + 1])
def test_an_unusable_report_time_falls_back_to_the_receive_time(at):
    assert sr.report_time(at, 1234.5) == 1234.5


def test_a_usable_report_time_is_kept():
    assert sr.report_time(1700000000.25, 1234.5) == 1700000000.25


def test_a_snapshot_updated_at_out_of_range_is_dropped():
    assert clean_snapshot(snap(updated_at=1e308), SHAPES)["updated_at"] is None
