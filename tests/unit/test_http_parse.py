"""Request parsing: ASCII-only integers, Content-Length, JSON bodies (issue 8 point 3)."""

from __future__ import annotations

import json

import pytest

from portunus.errors import PortunusError
from portunus.http.parse import (INT64_MAX, MAX_JSON_DEPTH, ascii_int, check_json_value, content_length, json_body,
                                 query_flag, query_int, query_value)


def refused(expected, fn, *args, **kwargs) -> PortunusError:
    with pytest.raises(PortunusError) as ei:
        fn(*args, **kwargs)
    assert ei.value.code == expected, ei.value
    assert 400 <= ei.value.http_status < 500
    return ei.value


@pytest.mark.parametrize("text,value", [("0", 0), ("7", 7), ("0042", 42), (str(INT64_MAX), INT64_MAX)])
def test_ascii_int_accepts_plain_decimal(text, value):
    assert ascii_int(text, "limit") == value


@pytest.mark.parametrize("text", ["²", "٣", "５", "1²", "-1", "+1", "1e3", "0x10", " 1", "1 ", "", "1_000",
                                  "9223372036854775808", "99999999999999999999", None, 5])
def test_ascii_int_refuses_everything_else_and_names_it(text):
    e = refused("validation.out_of_range", ascii_int, text, "limit")
    assert "limit" in e.message and repr(text) in e.message


def test_ascii_int_bounds_and_code():
    e = refused("validation.invalid_cursor", ascii_int, "0", "cursor", low=1, code="validation.invalid_cursor")
    assert "cursor" in e.message
    e = refused("validation.out_of_range", ascii_int, "1001", "limit", high=1000)
    assert "1..1000" not in e.message and "0..1000" in e.message


@pytest.mark.parametrize("values,length", [([], None), (["0"], 0), (["12"], 12), ([" 12 "], 12)])
def test_content_length(values, length):
    assert content_length(values) == length


@pytest.mark.parametrize("values", [["abc"], ["-1"], ["0x10"], ["1e3"], ["5, 5"], ["٣"], ["²"], [""], ["5", "5"],
                                    ["1" * 20]])
def test_bad_content_length_is_bad_request(values):
    e = refused("bad_request", content_length, values)
    assert "Content-Length" in e.message


def test_query_helpers():
    q = {"limit": ["5", "7"], "per_port": ["TRUE"], "x": [""]}
    assert query_value(q, "limit") == "7" and query_value(q, "missing") is None
    assert query_int(q, "limit") == 7 and query_int(q, "missing", 100) == 100
    assert query_flag(q, "per_port") and not query_flag(q, "x") and not query_flag(q, "missing")
    refused("validation.out_of_range", query_int, {"limit": ["²"]}, "limit")


def test_json_body_decodes_objects_and_empty_is_none():
    assert json_body(b"") is None
    assert json_body(b'{"name":"edge","n":[1,2.5,true,null]}') == {"name": "edge", "n": [1, 2.5, True, None]}


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000, b"[" * (MAX_JSON_DEPTH + 2) +
                                  b"]" * (MAX_JSON_DEPTH + 2)])
def test_deep_bodies_are_bad_request(body):
    e = refused("bad_request", json_body, body)
    assert "nest" in e.message or "JSON" in e.message


@pytest.mark.parametrize("body", [b"{", b"\xff\xfe", b"NaN", b'{"a":Infinity}', b'{"a":-Infinity}', b"1 2"])
def test_invalid_json_is_bad_request(body):
    refused("bad_request", json_body, body)


@pytest.mark.parametrize("body,field", [
    (b'{"name":"\\ud800"}', "name"),
    (b'{"address":"ok\\udfffok"}', "address"),
    (b'{"targets":["a:1","\\ud834:80"]}', "targets[1]"),
    (b'{"rate_limit":{"scope":"\\udc00"}}', "rate_limit.scope"),
    (b'["\\ud800"]', "body[0]"),
])
def test_lone_surrogates_are_named(body, field):
    e = refused("validation.invalid_string", json_body, body)
    assert e.fields["field"] == field and field in e.message
    json.dumps(e.to_json())  # the error itself stays encodable


def test_lone_surrogate_in_a_key_is_refused():
    e = refused("validation.invalid_string", json_body, b'{"\\ud800":1}')
    assert "field name" in e.message


def test_a_valid_surrogate_pair_is_fine():
    assert json_body(b'{"name":"\\ud83d\\ude00"}') == {"name": "\U0001F600"}


@pytest.mark.parametrize("value", [1 << 63, -(1 << 63) - 1, 10 ** 30])
def test_integers_beyond_64_bits_are_refused(value):
    e = refused("validation.out_of_range", check_json_value, {"ttl_secs": value})
    assert "ttl_secs" in e.message


def test_wide_documents_are_walked_without_recursion():
    check_json_value({"k": list(range(100_000))})
