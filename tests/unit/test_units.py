"""cli/units.py: human units for the cap flags and the CAPS column."""

from __future__ import annotations

import pytest

from portunus.cli.units import caps_from_flags, caps_text, format_quantity, parse_bytes, parse_count
from portunus.errors import PortunusError
from portunus.model import RateLimit


@pytest.mark.parametrize("text,expected", [
    ("4096", 4096), (" 7 ", 7), (4096, 4096), ("0", 0),
    ("10M", 10_000_000), ("512K", 512_000), ("512k", 512_000), ("1.5G", 1_500_000_000), ("2T", 2 * 10**12),
    ("2TiB", 2 * 1024**4), ("512KiB", 512 * 1024), ("1.5KiB", 1536), ("1MiB", 1 << 20), ("3Gi", 3 << 30),
    ("10MB", 10_000_000), ("10MB/s", 10_000_000), ("10MiBps", 10 << 20), ("64B", 64),
    ("100Mbit", 12_500_000), ("1Gbit/s", 125_000_000), ("10Gbits", 1_250_000_000), ("8bit", 1),
])
def test_byte_quantities(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", [
    "", "M", "-1", "+5", "1e6", "10 MB extra", "1.0001K", "1bit", "12bits", "10Mbps", "10Mb", "0x10",
    "1,000", "iB", "5iB", "1.5", "10XB", None, True, 1.5, [], "१२",
])
def test_bad_byte_quantities_name_the_value(text):
    with pytest.raises(PortunusError) as ei:
        parse_bytes(text, "--bandwidth-in-bps")
    assert ei.value.code == "validation.invalid_unit_value" and ei.value.exit_code == 2
    assert "--bandwidth-in-bps" in ei.value.message and repr(text) in ei.value.message


def test_huge_values_stop_at_the_counter_limit():
    assert parse_bytes("8EiB".replace("E", "P")) == 8 * 1024**5
    with pytest.raises(PortunusError):
        parse_bytes("99999999P")


@pytest.mark.parametrize("text,expected", [("100", 100), ("2K", 2000), ("1.5M", 1_500_000), ("1k", 1000)])
def test_counts(text, expected):
    assert parse_count(text) == expected


@pytest.mark.parametrize("text", ["10KiB", "5B", "1bit", "3/s", "1.5", "x"])
def test_counts_take_no_byte_units(text):
    with pytest.raises(PortunusError) as ei:
        parse_count(text, "--concurrent-connections")
    assert ei.value.code == "validation.invalid_unit_value" and "--concurrent-connections" in ei.value.message


def test_flags_become_a_rate_limit_body_the_model_accepts():
    body = caps_from_flags({"bandwidth_in_bps": "10M", "bandwidth_out_bps": None, "bandwidth_in_burst": "20M",
                            "new_connections_per_sec": "100", "concurrent_connections": "1K",
                            "new_connections_burst": None, "bandwidth_out_burst": None})
    assert body == {"bandwidth_in_bps": 10_000_000, "bandwidth_in_burst": 20_000_000,
                    "new_connections_per_sec": 100, "concurrent_connections": 1000}
    assert RateLimit.from_dict(body).to_dict() == body
    assert caps_from_flags({"bandwidth_in_bps": None}) == {}
    with pytest.raises(PortunusError) as ei:
        caps_from_flags({"bandwidth_in": "1"})
    assert ei.value.code == "validation.unknown_field"
    with pytest.raises(PortunusError) as ei:
        caps_from_flags({"new_connections_per_sec": "1KiB"})
    assert "--new-connections-per-sec" in ei.value.message


@pytest.mark.parametrize("n,text", [
    (0, "0"), (999, "999"), (1000, "1.0K"), (1049, "1.0K"), (9949, "9.9K"), (9950, "10K"), (512_000, "512K"),
    (999_499, "999K"), (999_500, "1.0M"), (1_000_000, "1.0M"), (1 << 20, "1.0M"), (1_500_000_000, "1.5G"),
    (1_250_000_000, "1.3G"), (2 * 10**12, "2.0T"), (10**19, "10E"),
])
def test_format_quantity_is_short_and_never_shows_1000_of_a_unit(n, text):
    assert format_quantity(n) == text


def test_the_caps_column():
    assert caps_text({"bandwidth_in_bps": 1_000_000, "bandwidth_out_bps": 512_000,
                      "new_connections_per_sec": 100, "concurrent_connections": 1000}) == "↓1.0M ↑512K 100/s ≤1000"
    assert caps_text({"concurrent_connections": 5}) == "≤5"
    assert caps_text({"new_connections_per_sec": 25_000, "concurrent_connections": 100_000}) == "25000/s ≤100000"
    assert caps_text({"bandwidth_out_bps": 125_000_000, "bandwidth_out_burst": 1}) == "↑125M"
    assert caps_text(None) == "-" and caps_text({}) == "-"


def test_what_is_shown_parses_back_near_the_original():
    for n in (1, 999, 1234, 56_789, 1_000_000, 987_654_321, 10**12):
        shown = format_quantity(n)
        assert abs(parse_bytes(shown) - n) <= n * 0.05
