"""Structured logging: JSON lines, compact text, level filter, redaction tripwire (SPEC §8.2)."""

from __future__ import annotations

import io
import json
import re
import threading
from datetime import datetime

import pytest

from portunus.log import Logger


def lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def records(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in lines(buf)]


@pytest.fixture
def buf():
    return io.StringIO()


@pytest.fixture
def logger(buf):
    return Logger(stream=buf)


# ---------------------------------------------------------------- JSON lines


def test_json_line_has_timestamp_level_event_and_fields(logger, buf):
    logger.info("rule.activated", rule="r1", port=8080, ok=True, ratio=0.5, tags=["a", "b"], extra=None)
    [rec] = records(buf)
    assert rec["level"] == "info"
    assert rec["event"] == "rule.activated"
    assert rec["rule"] == "r1" and rec["port"] == 8080 and rec["ok"] is True
    assert rec["ratio"] == 0.5 and rec["tags"] == ["a", "b"] and rec["extra"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["timestamp"])
    datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00"))


def test_one_line_per_event_and_newline_terminated(logger, buf):
    logger.info("a", text="multi\nline\nvalue")
    logger.warn("b")
    logger.error("c")
    out = buf.getvalue()
    assert out.endswith("\n")
    assert [r["event"] for r in records(buf)] == ["a", "b", "c"]
    assert records(buf)[0]["text"] == "multi\nline\nvalue"


def test_level_names_in_output(logger, buf):
    logger.info("i")
    logger.warn("w")
    logger.error("e")
    logger.log("warning", "w2")
    assert [(r["event"], r["level"]) for r in records(buf)] == [
        ("i", "info"), ("w", "warn"), ("e", "error"), ("w2", "warning")]


def test_non_json_values_are_stringified_not_fatal(logger, buf):
    class Thing:
        def __str__(self):
            return "thing-7"

    logger.info("x", obj=Thing(), raw=b"\x00\x01")
    [rec] = records(buf)
    assert rec["obj"] == "thing-7"
    assert rec["raw"] == str(b"\x00\x01")


def test_context_fields_appear_on_every_line_and_fields_override_them(buf):
    lg = Logger(stream=buf, role="client", request_id="req-1")
    lg.info("one")
    lg.info("two", request_id="req-2")
    one, two = records(buf)
    assert one["role"] == "client" and one["request_id"] == "req-1"
    assert two["role"] == "client" and two["request_id"] == "req-2"


def test_configure_updates_format_level_and_context(buf):
    lg = Logger(stream=buf)
    lg.configure(level="warn", client_id="01HX")
    lg.info("hidden")
    lg.warn("shown")
    [rec] = records(buf)
    assert rec["event"] == "shown" and rec["client_id"] == "01HX"
    lg.configure(fmt="compact")
    lg.error("now.text")
    last = lines(buf)[-1]
    assert not last.startswith("{")
    assert "now.text" in last


# ---------------------------------------------------------------- level filtering


@pytest.mark.parametrize("threshold,emitted", [
    ("debug", ["d", "i", "w", "e"]),
    ("info", ["i", "w", "e"]),
    ("warn", ["w", "e"]),
    ("warning", ["w", "e"]),
    ("error", ["e"]),
])
def test_level_filtering(buf, threshold, emitted):
    lg = Logger(stream=buf, level=threshold)
    lg.debug("d")
    lg.info("i")
    lg.warn("w")
    lg.error("e")
    assert [r["event"] for r in records(buf)] == emitted
    assert lg.enabled("error")
    assert lg.enabled("debug") == (threshold == "debug")


def test_default_level_is_info(logger, buf):
    logger.debug("nope")
    logger.info("yes")
    assert [r["event"] for r in records(buf)] == ["yes"]


# ---------------------------------------------------------------- redaction tripwire


@pytest.mark.parametrize("field", ["token", "client_secret", "password", "private_key", "new_password",
                                   "operator_token", "Setup_Token", "PASSWORD_HASH", "tls_private_key_pem",
                                   "secret"])
def test_sensitive_field_value_never_printed_and_violation_follows(logger, buf, field):
    value = "s3cr3t-VALUE-do-not-print"
    logger.info("auth.attempt", user="alice", **{field: value})
    assert value not in buf.getvalue()
    first, second = records(buf)
    assert first["event"] == "auth.attempt"
    assert first["user"] == "alice"
    assert first[field] == "[redacted]"
    assert second["event"] == "audit.redaction_violation"
    assert second["level"] == "error"
    assert second["fields"] == [field]
    assert second["source_event"] == "auth.attempt"


def test_several_sensitive_fields_give_one_violation_line_naming_all(logger, buf):
    logger.info("x", token="t-val", password="p-val", other="fine")
    assert "t-val" not in buf.getvalue() and "p-val" not in buf.getvalue()
    recs = records(buf)
    assert len(recs) == 2
    assert sorted(recs[1]["fields"]) == ["password", "token"]
    assert recs[0]["other"] == "fine"


def test_harmless_fields_do_not_trip(logger, buf):
    logger.info("y", user="u", pin="sha256:ab", code_len=6, fingerprint="ab:cd")
    assert [r["event"] for r in records(buf)] == ["y"]


def test_names_are_matched_by_substring(logger, buf):
    # §8.2: a name *containing* a sensitive word trips, even when it is innocent
    logger.info("limits.refill", bucket_tokens=42)
    rec, violation = records(buf)
    assert rec["bucket_tokens"] == "[redacted]"
    assert violation["fields"] == ["bucket_tokens"]


def test_sensitive_context_field_is_redacted_too(buf):
    lg = Logger(stream=buf, api_token="ctx-secret")
    lg.info("hello")
    assert "ctx-secret" not in buf.getvalue()
    recs = records(buf)
    assert recs[0]["api_token"] == "[redacted]"
    assert recs[1]["event"] == "audit.redaction_violation"


def test_sensitive_key_nested_in_a_logged_object_is_redacted(logger, buf):
    """Logging a whole message (e.g. a hello frame) must not leak the token inside it."""
    logger.info("control.frame", msg={"type": "hello", "token": "nested-secret",
                                      "auth": {"client_secret": "deeper"}},
                frames=[{"password": "in-a-list"}])
    out = buf.getvalue()
    assert "nested-secret" not in out and "deeper" not in out and "in-a-list" not in out
    rec, violation = records(buf)
    assert rec["msg"]["type"] == "hello"
    assert rec["msg"]["token"] == "[redacted]"
    assert rec["msg"]["auth"]["client_secret"] == "[redacted]"
    assert violation["event"] == "audit.redaction_violation"
    assert sorted(violation["fields"]) == ["frames[0].password", "msg.auth.client_secret", "msg.token"]


def test_redaction_does_not_modify_the_callers_object(logger, buf):
    msg = {"type": "hello", "token": "keep-me"}
    logger.info("x", msg=msg)
    assert msg == {"type": "hello", "token": "keep-me"}


def test_filtered_event_writes_nothing_not_even_a_violation(buf):
    lg = Logger(stream=buf, level="error")
    lg.info("quiet", token="t")
    assert buf.getvalue() == ""  # filtered out entirely: no line, no violation
    lg.error("loud", token="t-secret")
    assert "t-secret" not in buf.getvalue()
    assert [r["event"] for r in records(buf)] == ["loud", "audit.redaction_violation"]


def test_redaction_in_compact_format(buf):
    lg = Logger(stream=buf, fmt="compact")
    lg.info("auth", client_secret="zz-secret-zz")
    out = buf.getvalue()
    assert "zz-secret-zz" not in out
    first, second = lines(buf)
    assert "client_secret=[redacted]" in first
    assert "audit.redaction_violation" in second
    assert "client_secret" in second


# ---------------------------------------------------------------- compact / pretty


@pytest.mark.parametrize("fmt", ["compact", "pretty"])
def test_human_format_line(buf, fmt):
    lg = Logger(stream=buf, fmt=fmt)
    lg.warn("rule.failed", rule="r1", port=30005, reason="port in use", ok=False)
    [line] = lines(buf)
    m = re.fullmatch(r"(\S+) (WARN ) rule\.failed (.*)", line)
    assert m, line
    datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
    assert m.group(3) == 'rule=r1 port=30005 reason="port in use" ok=false'


def test_compact_without_fields_has_no_trailing_space(buf):
    lg = Logger(stream=buf, fmt="compact")
    lg.info("process.start")
    [line] = lines(buf)
    assert line.endswith("INFO  process.start")


def test_compact_value_with_newline_stays_on_one_line(buf):
    """A value from the network (SNI name, path, …) must not forge a second log line."""
    lg = Logger(stream=buf, fmt="compact")
    lg.info("tls.sni_no_match", sni="evil\n2030-01-01T00:00:00Z INFO  fake.event", tab="a\tb", cr="x\ry")
    out = lines(buf)
    assert len(out) == 1
    assert "fake.event" in out[0]  # still visible, but quoted inside this line
    assert r'sni="evil\n2030' in out[0]
    assert r'tab="a\tb"' in out[0]
    assert r'cr="x\ry"' in out[0]


def test_compact_quotes_empty_and_quote_bearing_values(buf):
    lg = Logger(stream=buf, fmt="compact")
    lg.info("x", empty="", q='say "hi"', plain="ok")
    [line] = lines(buf)
    assert 'empty=""' in line
    assert r'q="say \"hi\""' in line
    assert "plain=ok" in line


# ---------------------------------------------------------------- streams


def test_closed_stream_never_raises():
    s = io.StringIO()
    lg = Logger(stream=s)
    s.close()
    lg.error("still.fine", x=1)  # must not raise


def test_concurrent_writers_never_interleave_lines(buf):
    lg = Logger(stream=buf)

    def worker(n):
        for i in range(200):
            lg.info("t", worker=n, i=i, pad="x" * 200)

    ts = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    recs = records(buf)  # every line parses as one whole JSON object
    assert len(recs) == 1200
    for n in range(6):
        assert [r["i"] for r in recs if r["worker"] == n] == list(range(200))


# ---------------------------------------------------------------- rate-limited lines


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clocked(buf):
    clock = FakeClock()
    return Logger(stream=buf, clock=clock), clock


def test_limited_first_occurrence_is_written_at_once(clocked, buf):
    lg, _ = clocked
    lg.limited("warn", "control.rejected", key="10.0.0.1", reason="bad_frame")
    [rec] = records(buf)
    assert rec["event"] == "control.rejected" and rec["level"] == "warn"
    assert rec["reason"] == "bad_frame" and "suppressed" not in rec


def test_limited_counts_inside_window_and_reports_after_it(clocked, buf):
    lg, clock = clocked
    lg.limited("warn", "e", key="k", every=60, n=1)
    for i in range(5):
        clock.now += 10
        lg.limited("warn", "e", key="k", every=60, n=i + 2)
    assert len(records(buf)) == 1
    clock.now += 20  # 70 s after the written line
    lg.limited("warn", "e", key="k", every=60, n=7)
    recs = records(buf)
    assert len(recs) == 2
    assert recs[1]["n"] == 7 and recs[1]["suppressed"] == 5


def test_limited_after_window_without_swallowed_lines_has_no_suppressed_field(clocked, buf):
    lg, clock = clocked
    lg.limited("info", "e", every=5)
    clock.now += 5
    lg.limited("info", "e", every=5)
    recs = records(buf)
    assert len(recs) == 2 and "suppressed" not in recs[1]


def test_limited_keys_and_events_are_independent(clocked, buf):
    lg, _ = clocked
    lg.limited("warn", "e", key="a")
    lg.limited("warn", "e", key="b")
    lg.limited("warn", "other", key="a")
    lg.limited("warn", "e", key="a")
    assert [(r["event"]) for r in records(buf)] == ["e", "e", "other"]


def test_flush_limited_writes_summary_for_pending_counts_only(clocked, buf):
    lg, _ = clocked
    lg.limited("warn", "e", key="a", peer="10.0.0.1")
    lg.limited("warn", "e", key="a", peer="10.0.0.1")
    lg.limited("warn", "e", key="a", peer="10.0.0.1")
    lg.limited("warn", "quiet", key="b")
    lg.flush_limited()
    recs = records(buf)
    assert len(recs) == 3
    summary = recs[2]
    assert summary["event"] == "e" and summary["suppressed"] == 2 and summary["peer"] == "10.0.0.1"
    lg.flush_limited()  # nothing pending any more
    assert len(records(buf)) == 3


def test_limited_tracks_a_bounded_number_of_keys(buf):
    clock = FakeClock()
    lg = Logger(stream=buf, clock=clock, limited_max_keys=3)
    for i in range(10):
        lg.limited("warn", "e", key=str(i))
    assert len(lg._limited) == 3
    lg.limited("warn", "e", key="0")  # forgotten, so written again as a first occurrence
    assert len(records(buf)) == 11


def test_limited_respects_level_filter(buf):
    lg = Logger(stream=buf, level="error", clock=FakeClock())
    lg.limited("warn", "e")
    lg.flush_limited()
    assert buf.getvalue() == ""


def test_limited_redacts_sensitive_fields(clocked, buf):
    lg, _ = clocked
    lg.limited("warn", "e", api_token="s3cret")
    assert "s3cret" not in buf.getvalue()


def test_limited_is_thread_safe(clocked, buf):
    lg, _ = clocked

    def hammer():
        for _ in range(500):
            lg.limited("warn", "e", key="shared")

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lg.flush_limited()
    recs = records(buf)
    assert len(recs) == 2 and recs[1]["suppressed"] == 1999


def test_module_logger_has_limited_api():
    from portunus.log import log
    assert callable(log.limited) and callable(log.flush_limited)


def test_a_deeply_nested_field_is_cut_instead_of_recursing(logger, buf):
    deep = inner = []
    for _ in range(5000):
        inner.append([])
        inner = inner[0]
    logger.warn("e", value=deep, msg={"token": "s3cret", "rules": deep})
    [rec] = [r for r in records(buf) if r["event"] == "e"]
    assert "[too deep]" in json.dumps(rec) and "s3cret" not in buf.getvalue()
