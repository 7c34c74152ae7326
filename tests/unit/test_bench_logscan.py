"""bench/portbench log scanning and the HTTP origin's request parsing, on canned text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from portbench.logscan import log_events, scan_json_lines, scan_json_log  # noqa: E402
from portbench.origins import RESP_CLOSE, RESP_KEEPALIVE, responses_for  # noqa: E402


def _line(**rec) -> str:
    return json.dumps(rec)


def test_warn_and_error_events_counted_per_kind_with_the_first_example():
    text = "\n".join([
        _line(level="info", event="process.start"),
        _line(level="warn", event="relay.accept_failed", n=1),
        _line(level="warn", event="relay.accept_failed", n=2),
        _line(level="ERROR", event="rule.failed"),
        "",
    ])
    problems = scan_json_lines(text)
    assert problems == [
        'warn:relay.accept_failed x2: {"level": "warn", "event": "relay.accept_failed", "n": 1}',
        'error:rule.failed x1: {"level": "ERROR", "event": "rule.failed"}',
    ]


def test_non_json_lines_are_reported_stripped_joined_and_limited():
    text = "\n".join(["Traceback (most recent call last):", '  File "x.py", line 1',
                      "[1, 2]", _line(level="info", event="ok"), "ValueError: boom"])
    assert scan_json_lines(text) == [
        'non-JSON stderr: Traceback (most recent call last): | File "x.py", line 1 | [1, 2] '
        "| ValueError: boom"]
    assert scan_json_lines(text, limit=1) == ["non-JSON stderr: Traceback (most recent call last):"]


def test_clean_log_has_no_problems_and_a_missing_log_is_not_an_error(tmp_path):
    assert scan_json_lines(_line(level="info", event="process.exit")) == []
    assert scan_json_log(tmp_path / "missing.log") == []
    assert log_events(tmp_path / "missing.log") == {}


def test_event_counts_from_a_log_file(tmp_path):
    log = tmp_path / "client.log"
    log.write_text("\n".join([_line(event="rule.activated"), _line(event="rule.activated"),
                              _line(event="proxy.splice_selected"), _line(level="info"),
                              "not json", "[]"]) + "\n")
    assert log_events(log) == {"rule.activated": 2, "proxy.splice_selected": 1}
    assert scan_json_log(log) == ["non-JSON stderr: not json | []"]


def test_origin_answers_every_pipelined_head_and_keeps_a_partial_one():
    buf = bytearray(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HT")
    out, close = responses_for(buf)
    assert out == [RESP_KEEPALIVE, RESP_KEEPALIVE] and close is False
    assert buf == b"GET /3 HT"


def test_origin_closes_after_a_connection_close_request():
    buf = bytearray(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\nGET /late HTTP/1.1\r\n\r\n")
    out, close = responses_for(buf)
    assert out == [RESP_CLOSE] and close is True
    assert RESP_CLOSE.endswith(b"Connection: close\r\n\r\nhello, world\n")
    assert b"Content-Length: 13\r\n" in RESP_KEEPALIVE
