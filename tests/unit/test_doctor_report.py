"""Doctor result rendering: grouping, symbols, fixes, colour only when asked, JSON shape, exit code."""

from __future__ import annotations

import io
import json

import pytest

from portunus.doctor import report as r


def sample() -> list[r.Check]:
    return [
        r.ok("bundle.lookup", "bundle found at /etc/portunus/client.bundle.json", {"tried": {"/a": "missing"}}),
        r.fail("tls.pin", "pin mismatch", "re-enroll this host", {"expected": "aa", "got": "bb"}),
        r.warn("bundle.mode", "bundle is mode 0644", "chmod 600 /b", {"mode": "0644"}),
        r.skip("auth.token", "not checked"),
    ]


def test_text_groups_checks_in_a_fixed_order_with_symbols_values_and_fix():
    text = r.render_text(sample(), colour=False, title="portunus-client doctor")
    lines = text.splitlines()
    assert lines[0] == "portunus-client doctor"
    assert lines.index("Bundle") < lines.index("TLS pin") < lines.index("Token")
    bundle = text[text.index("Bundle"):text.index("TLS pin")]
    assert "✓ bundle found at /etc/portunus/client.bundle.json  [bundle.lookup]" in bundle
    assert "⚠ bundle is mode 0644  [bundle.mode]" in bundle  # grouped with its section, not in input order
    assert "      tried: /a=missing" in bundle
    assert "      fix: chmod 600 /b" in bundle
    assert "✗ pin mismatch  [tls.pin]" in text
    assert "      expected: aa" in text and "      got: bb" in text
    assert "– not checked  [auth.token]" in text
    assert lines[-1] == "1 ok, 1 warning(s), 1 failed, 1 skipped"
    assert "\x1b[" not in text


def test_fix_is_not_printed_for_a_passing_check():
    text = r.render_text([r.Check("datadir.x", r.OK, "fine", {}, "never shown")])
    assert "never shown" not in text


def test_multi_line_fix_is_indented_under_the_first_line():
    text = r.render_text([r.fail("cert.expiry", "expired", "issue a new cert\nthen reenroll-client")])
    assert "      fix: issue a new cert\n           then reenroll-client\n" in text


def test_colour_wraps_symbols_when_asked():
    text = r.render_text(sample(), colour=True)
    assert "\x1b[31m✗\x1b[0m" in text and "\x1b[32m✓\x1b[0m" in text and "\x1b[33m⚠\x1b[0m" in text


def test_json_is_a_list_of_the_five_fields():
    data = json.loads(r.render_json(sample()))
    assert [c["id"] for c in data] == ["bundle.lookup", "tls.pin", "bundle.mode", "auth.token"]
    assert all(set(c) == {"id", "status", "summary", "details", "fix"} for c in data)
    assert data[1] == {"id": "tls.pin", "status": "fail", "summary": "pin mismatch",
                       "details": {"expected": "aa", "got": "bb"}, "fix": "re-enroll this host"}
    assert data[3]["fix"] is None


@pytest.mark.parametrize("statuses, code", [((r.OK, r.WARN, r.SKIP), 0), ((r.OK, r.FAIL), 1), ((), 0)])
def test_exit_code_is_one_only_when_something_failed(statuses, code):
    assert r.exit_code([r.Check(f"g.c{i}", s, "x") for i, s in enumerate(statuses)]) == code


def test_unknown_status_is_refused():
    with pytest.raises(ValueError, match="status must be one of"):
        r.Check("a.b", "great", "x")


def test_unknown_group_is_titled_by_its_prefix_after_the_known_ones():
    text = r.render_text([r.ok("quota.x", "fine"), r.ok("bundle.y", "fine")])
    assert text.index("Bundle") < text.index("Quota")


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize("tty, env, expected", [
    (True, {}, True), (False, {}, False), (True, {"NO_COLOR": "1"}, False), (True, {"TERM": "dumb"}, False)])
def test_colour_only_on_a_terminal_without_no_color(tty, env, expected):
    assert r.use_colour(_Stream(tty), env) is expected
