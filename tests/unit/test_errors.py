"""The one error table: code -> HTTP status -> CLI exit code (SPEC §6, §7.2)."""

from __future__ import annotations

import json

import pytest

from portunus import errors
from portunus.errors import ERRORS, PortunusError, kind_of

# SPEC §7.2, one row per code the table lists: (code, exit code, HTTP status per §6/§3.1/§4.2)
SPEC_ROWS = [
    # 1 generic
    ("internal", 1, 500),
    ("io_error", 1, 500),
    ("server_unreachable", 1, None),
    ("startup.unsupported_filesystem", 1, None),
    # 2 usage / validation
    ("usage", 2, 400),
    ("bad_request", 2, 400),
    # 3 pre-flight refusals: capability gates are 422 (§3.1)
    ("unsupported_protocol", 3, 422),
    ("multi_target_unsupported_by_client", 3, 422),
    ("sni_unsupported_by_client", 3, 422),
    ("rate_limit_unsupported_by_client", 3, 422),
    ("quota_unsupported_by_client", 3, 422),
    ("port_range_unsupported_by_client", 3, 422),
    ("validation.rate_limit_no_caps_provided", 3, None),
    # 4
    ("client_not_connected", 4, 409),
    # 5 activation
    ("activation_failed", 5, 409),
    ("port_in_use", 5, 409),
    # 6 RBAC
    ("forbidden", 6, 403),
    ("not_owner", 6, 403),
    ("client_not_granted", 6, 403),
    ("port_outside_grant", 6, 403),
    ("protocol_not_granted", 6, 403),
    ("password_change_required", 6, 403),
    # 7
    ("unauthenticated", 7, 401),
    # 8
    ("not_found", 8, 404),
    # 9 conflicts
    ("client_ambiguous", 9, 409),
    ("conflict.legacy_to_sni_unsupported", 9, 409),
    # store
    ("store_in_use", 75, None),
    ("startup.store_in_use", 75, None),
    ("schema_version_too_new", 78, None),
    ("startup.schema_version_too_new", 78, None),
    # §6 statuses without a dedicated exit code
    ("rate_limited", None, 429),
    ("bootstrap_required", None, 503),
]


@pytest.mark.parametrize("code,exit_code,status", SPEC_ROWS, ids=[r[0] for r in SPEC_ROWS])
def test_listed_codes_map_to_spec_exit_code_and_status(code, exit_code, status):
    assert code in ERRORS, f"{code} missing from the table"
    kind = kind_of(code)
    if exit_code is not None:
        assert kind.exit_code == exit_code
    if status is not None:
        assert kind.http_status == status
    e = PortunusError(code)
    assert (e.exit_code, e.http_status) == (kind.exit_code, kind.http_status)


def test_exit_code_constants_match_spec_table():
    assert (errors.EXIT_OK, errors.EXIT_GENERIC, errors.EXIT_USAGE, errors.EXIT_PREFLIGHT,
            errors.EXIT_NOT_CONNECTED, errors.EXIT_ACTIVATION, errors.EXIT_RBAC,
            errors.EXIT_UNAUTHENTICATED, errors.EXIT_NOT_FOUND, errors.EXIT_CONFLICT,
            errors.EXIT_STORE_IN_USE, errors.EXIT_SCHEMA_TOO_NEW) == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 75, 78)


def test_every_row_has_a_real_status_a_nonzero_exit_code_and_a_message():
    valid_exits = {1, 2, 3, 4, 5, 6, 7, 8, 9, 75, 78}
    for code, kind in ERRORS.items():
        assert 400 <= kind.http_status <= 599, code
        assert kind.exit_code in valid_exits, code
        assert kind.message.strip(), code


def test_status_and_exit_code_families_agree_across_the_table():
    """§6 and §7.2 describe the same families: 401<->7, 403<->6, 404<->8, 422<->3."""
    pairs = {401: 7, 403: 6, 404: 8, 422: 3}
    for code, kind in ERRORS.items():
        if kind.http_status in pairs:
            assert kind.exit_code == pairs[kind.http_status], code
        if kind.exit_code in (4, 5, 9):
            assert kind.http_status == 409, code


@pytest.mark.parametrize("code", ["validation.invalid_port", "validation.port_range_width_mismatch",
                                  "validation.sni_pattern_invalid", "validation.anything_new"])
def test_unlisted_validation_codes_get_the_validation_row(code):
    assert code not in ERRORS
    e = PortunusError(code, "listen port must be a number 1-65535, got 0")
    assert (e.http_status, e.exit_code) == (400, 2)


def test_listed_validation_code_overrides_the_family():
    assert kind_of("validation.rate_limit_no_caps_provided").exit_code == 3
    assert kind_of("validation.something_else").exit_code == 2


@pytest.mark.parametrize("code", ["conflict.some_future_conflict", "conflict.x"])
def test_unlisted_conflict_codes_get_the_conflict_row(code):
    assert code not in ERRORS
    e = PortunusError(code)
    assert (e.http_status, e.exit_code) == (409, 9)
    assert e.message  # a default message, never empty


@pytest.mark.parametrize("code", ["totally_unknown", "validation", "conflict", "Validation.x", ""])
def test_unknown_codes_fall_back_to_internal(code):
    e = PortunusError(code)
    assert (e.http_status, e.exit_code) == (500, 1)


def test_to_json_envelope_shape_with_fields():
    e = PortunusError("activation_failed", "port_in_use (port 30005 already bound)",
                      rule_id="r-1", reason="port_in_use", port=30005)
    body = e.to_json()
    assert body == {"error": {"code": "activation_failed",
                              "message": "port_in_use (port 30005 already bound)",
                              "rule_id": "r-1", "reason": "port_in_use", "port": 30005}}
    assert json.loads(json.dumps(body)) == body  # serialisable as the API body


def test_to_json_without_fields_has_exactly_code_and_message():
    body = PortunusError("not_found", "rule 'r9' not found").to_json()
    assert list(body) == ["error"]
    assert body["error"] == {"code": "not_found", "message": "rule 'r9' not found"}


def test_default_message_comes_from_the_table():
    e = PortunusError("client_not_connected")
    assert e.message == ERRORS["client_not_connected"].message
    assert e.to_json()["error"]["message"] == e.message
    assert PortunusError("conflict.new_thing").message == "conflict"
    assert PortunusError("validation.x").message == "invalid value"


def test_fields_do_not_mutate_between_instances():
    a = PortunusError("port_in_use", "port 1 busy", port=1)
    b = PortunusError("port_in_use", "port 2 busy", port=2)
    a.to_json()["error"]["port"] = 99
    assert a.to_json()["error"]["port"] == 1
    assert b.to_json()["error"]["port"] == 2


def test_cli_line_and_str():
    e = PortunusError("activation_failed", "port_in_use (port 30005 already bound)")
    assert e.cli_line() == "error: activation_failed: port_in_use (port 30005 already bound)"
    assert str(e) == "activation_failed: port_in_use (port 30005 already bound)"
    assert e.code == "activation_failed"


def test_is_an_exception_that_can_be_raised_and_caught():
    with pytest.raises(PortunusError) as ei:
        raise PortunusError("store_in_use", pid=1234)
    assert ei.value.exit_code == 75
    assert ei.value.fields == {"pid": 1234}
    assert isinstance(ei.value, Exception)
