"""Control channel message schemas (SPEC §3.1, §3.4): what each side may send, and how refusals read."""

from __future__ import annotations

import copy

import pytest

from portunus.control import messages as m
from portunus.control.frames import FrameDecoder, encode
from portunus.control.messages import (
    CAPABILITIES,
    CLIENT_MESSAGES,
    FIRST_MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SERVER_MESSAGES,
    MessageError,
    validate,
)
from portunus.model import Rule

TOKEN = "tok-" + "s3cr3t" * 10

RULE = Rule.from_dict({"rule_id": "r1", "listen_port": 8080, "target": "10.0.0.5:80"}).to_dict()

# one valid message of every type, written out by hand (not by the constructors)
VALID: dict[str, tuple[str, dict]] = {
    "hello": ("client", {"type": "hello", "token": TOKEN, "protocol_version": 1, "client_version": "0.1.0",
                         "capabilities": ["udp", "sni"]}),
    "enroll": ("client", {"type": "enroll", "code": "ABCD-1234", "client_version": "0.1.0"}),
    "rule_status": ("client", {"type": "rule_status", "rule_id": "r1", "state": "active", "reason": None,
                               "code": None, "port": 8080, "request_id": "req-1"}),
    "stats_report": ("client", {"type": "stats_report", "rules": [{"rule_id": "r1", "bytes_in": 5}],
                                "at": 1700000000.5, "owners": [{"owner": "alice", "active": 1}]}),
    "pong": ("client", {"type": "pong", "nonce": 3}),
    "traffic_quota_exhausted": ("client", {"type": "traffic_quota_exhausted", "user_id": "u1",
                                           "client_id": "01HZX", "at": 1700000000.5}),
    "welcome": ("server", {"type": "welcome", "client_id": "01HZX", "client_name": "edge-1",
                           "server_version": "0.1.0", "server_time": 1700000000.0, "protocol_version": 1,
                           "stats_interval_secs": 10, "udp_max_flows_per_rule": 1024,
                           "udp_flow_idle_secs": 60}),
    "enrolled": ("server", {"type": "enrolled", "client_id": "01HZX", "client_name": "edge-1", "token": TOKEN,
                            "server_endpoint": "203.0.113.5:7443"}),
    "rule_update": ("server", {"type": "rule_update", "action": "push", "rule_id": "r1", "request_id": "req-1",
                               "rule": RULE}),
    "replay_done": ("server", {"type": "replay_done", "rule_ids": ["r1", "r2"]}),
    "owner_rate_limit_update": ("server", {"type": "owner_rate_limit_update", "client_id": "01HZX",
                                           "owner_id": "u1", "action": "set",
                                           "rate_limit": {"bandwidth_in_bps": 1000}}),
    "traffic_quota_update": ("server", {"type": "traffic_quota_update", "user_id": "u1", "client_id": "01HZX",
                                        "action": "set",
                                        "state": {"monthly_bytes": 10, "budget_remaining_bytes": 5,
                                                  "period_started_at": 1, "period_ends_at": 2,
                                                  "exhausted": False}}),
    "ping": ("server", {"type": "ping", "nonce": "n-1"}),
    "error": ("server", {"type": "error", "code": "token_revoked", "message": "the token was revoked"}),
}

OTHER = {"client": "server", "server": "client"}


def valid(kind: str) -> tuple[str, dict]:
    sender, msg = VALID[kind]
    return sender, copy.deepcopy(msg)


def refused(code: str, msg, sender: str) -> MessageError:
    with pytest.raises(MessageError) as ei:
        validate(msg, sender)
    assert ei.value.code == code, ei.value.message
    return ei.value


def required_fields() -> list[tuple[str, str]]:
    out = []
    for table in (CLIENT_MESSAGES, SERVER_MESSAGES):
        for kind, fields in table.items():
            out += [(kind, f.name) for f in fields if f.required]
    return out


def optional_fields() -> list[tuple[str, str]]:
    out = []
    for table in (CLIENT_MESSAGES, SERVER_MESSAGES):
        for kind, fields in table.items():
            out += [(kind, f.name) for f in fields if not f.required]
    return out


# ---------------------------------------------------------------- constants and the table

def test_constants():
    assert PROTOCOL_VERSION == 1
    assert CAPABILITIES == ("udp", "port_range", "multi_target", "proxy_protocol", "sni", "rate_limit",
                            "traffic_quota")  # the order the agent has always declared in hello
    assert FIRST_MESSAGE_TYPES == ("hello", "enroll")
    assert set(FIRST_MESSAGE_TYPES) <= set(CLIENT_MESSAGES)


def test_every_type_is_covered_here():
    assert set(VALID) == set(CLIENT_MESSAGES) | set(SERVER_MESSAGES)
    assert not set(CLIENT_MESSAGES) & set(SERVER_MESSAGES)
    assert set(CLIENT_MESSAGES) == {"hello", "enroll", "rule_status", "stats_report", "pong",
                                    "traffic_quota_exhausted"}
    assert set(SERVER_MESSAGES) == {"welcome", "enrolled", "rule_update", "replay_done",
                                    "owner_rate_limit_update", "traffic_quota_update", "ping", "error"}


# ---------------------------------------------------------------- accepted

@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_message_passes_and_is_returned_as_a_copy(kind):
    sender, msg = valid(kind)
    before = copy.deepcopy(msg)
    out = validate(msg, sender)
    assert out == msg
    assert out is not msg
    assert msg == before


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_message_survives_the_wire(kind):
    sender, msg = valid(kind)
    (decoded,) = FrameDecoder().feed(encode(msg))
    assert validate(decoded, sender) == msg


@pytest.mark.parametrize("kind", sorted(VALID))
def test_unknown_extra_fields_are_kept(kind):
    sender, msg = valid(kind)
    msg["added_in_v2"] = {"anything": [1, 2]}
    assert validate(msg, sender)["added_in_v2"] == {"anything": [1, 2]}


@pytest.mark.parametrize("kind,field", optional_fields())
def test_optional_field_may_be_absent_and_comes_back_as_none(kind, field):
    sender, msg = valid(kind)
    if kind == "rule_update" and field == "rule":
        msg["action"] = "remove"
    if kind in ("owner_rate_limit_update", "traffic_quota_update"):
        msg["action"] = "remove"
    del msg[field]
    out = validate(msg, sender)
    assert field in out and out[field] is None
    assert field not in msg


@pytest.mark.parametrize("kind,field", optional_fields())
def test_optional_field_may_be_null(kind, field):
    sender, msg = valid(kind)
    if kind in ("rule_update", "owner_rate_limit_update", "traffic_quota_update"):
        msg["action"] = "remove"
    msg[field] = None
    assert validate(msg, sender)[field] is None


@pytest.mark.parametrize("state", ["active", "failed", "removed"])
def test_every_rule_state(state):
    _, msg = valid("rule_status")
    msg["state"] = state
    assert validate(msg, "client")["state"] == state


def test_failed_rule_status_with_reason_and_code():
    _, msg = valid("rule_status")
    msg.update(state="failed", reason="bind: address in use", code="port_in_use")
    out = validate(msg, "client")
    assert (out["reason"], out["code"]) == ("bind: address in use", "port_in_use")


@pytest.mark.parametrize("nonce", [0, -1, 2**63, "", "abc"])
def test_nonce_is_an_int_or_a_string(nonce):
    assert validate({"type": "ping", "nonce": nonce}, "server")["nonce"] == nonce
    assert validate({"type": "pong", "nonce": nonce}, "client")["nonce"] == nonce


@pytest.mark.parametrize("field,value", [
    ("server_time", 1700000000), ("server_time", 1700000000.123), ("stats_interval_secs", 0.5),
    ("stats_interval_secs", 10),
])
def test_numbers_take_ints_and_floats(field, value):
    _, msg = valid("welcome")
    msg[field] = value
    assert validate(msg, "server")[field] == value


def test_unknown_capabilities_pass_for_a_newer_client():
    _, msg = valid("hello")
    msg["capabilities"] = ["udp", "teleport"]
    assert validate(msg, "client")["capabilities"] == ["udp", "teleport"]


def test_empty_lists_are_lists():
    assert validate({"type": "replay_done", "rule_ids": []}, "server")["rule_ids"] == []
    assert validate({"type": "stats_report", "rules": [], "at": 0}, "client")["rules"] == []
    _, msg = valid("hello")
    msg["capabilities"] = []
    assert validate(msg, "client")["capabilities"] == []


def test_remove_may_still_carry_the_rule():
    _, msg = valid("rule_update")
    msg["action"] = "remove"
    assert validate(msg, "server")["rule"] == RULE


def test_push_rule_may_use_the_id_alias_or_leave_the_id_out():
    _, msg = valid("rule_update")
    msg["rule"] = {"id": "r1", "listen_port": 1, "target": "a:1"}
    assert validate(msg, "server")["rule"]["id"] == "r1"
    msg["rule"] = {"listen_port": 1, "target": "a:1"}
    assert validate(msg, "server")["rule_id"] == "r1"


# ---------------------------------------------------------------- message_unknown_type

@pytest.mark.parametrize("kind", sorted(VALID))
def test_a_type_is_known_only_for_the_side_that_sends_it(kind):
    sender, msg = valid(kind)
    err = refused("message_unknown_type", msg, OTHER[sender])
    assert repr(kind) in err.message
    assert f"is a {sender} message" in err.message


@pytest.mark.parametrize("sender", ["client", "server"])
@pytest.mark.parametrize("kind", ["", "HELLO", "helo", "rule_push", "bye", "hello "])
def test_unknown_type_is_refused(sender, kind):
    err = refused("message_unknown_type", {"type": kind}, sender)
    assert repr(kind) in err.message
    assert sender in err.message


def test_unknown_type_name_is_truncated():
    err = refused("message_unknown_type", {"type": "x" * 5000}, "client")
    assert len(err.message) < 120
    assert err.message.endswith("...")


def test_missing_type():
    err = refused("message_missing_field", {"token": TOKEN}, "client")
    assert "'type'" in err.message


@pytest.mark.parametrize("kind", [None, 1, True, ["hello"], {"a": 1}])
def test_type_that_is_not_a_string(kind):
    err = refused("message_bad_field", {"type": kind}, "client")
    assert "'type'" in err.message and repr(kind) in err.message


@pytest.mark.parametrize("msg", [None, [], "hello", 1, [("type", "hello")]])
def test_message_that_is_not_an_object(msg):
    err = refused("message_bad_field", msg, "server")
    assert "must be an object" in err.message


def test_sender_must_be_client_or_server():
    with pytest.raises(ValueError):
        validate({"type": "ping", "nonce": 1}, "operator")


# ---------------------------------------------------------------- message_missing_field

@pytest.mark.parametrize("kind,field", required_fields())
def test_every_required_field_is_required(kind, field):
    sender, msg = valid(kind)
    del msg[field]
    err = refused("message_missing_field", msg, sender)
    assert err.message == f"{kind} message is missing field {field!r}"


@pytest.mark.parametrize("kind,action,field", [
    ("rule_update", "push", "rule"),
    ("owner_rate_limit_update", "set", "rate_limit"),
    ("traffic_quota_update", "set", "state"),
])
@pytest.mark.parametrize("how", ["absent", "null"])
def test_payload_required_when_setting(kind, action, field, how):
    sender, msg = valid(kind)
    if how == "absent":
        del msg[field]
    else:
        msg[field] = None
    err = refused("message_missing_field", msg, sender)
    assert kind in err.message and repr(field) in err.message and repr(action) in err.message


# ---------------------------------------------------------------- message_bad_field

# a wrong value for every field of every kind: the first is always "null for a required field"
_WRONG_STR = [None, 1, True, ["a"], {"a": 1}, 1.5]
_WRONG_INT = [None, True, False, 1.0, 1.5, "1", [1], {"n": 1}]
_WRONG_NUMBER = [None, True, "1", [1], float("nan"), float("inf"), float("-inf")]
_WRONG_OBJECT = [None, [], "{}", 1, True, [{"a": 1}]]
_WRONG_INT_OR_STR = [None, True, 1.5, [1], {"n": 1}]
_WRONG_STR_LIST = [None, "udp", ("udp",), [1], ["udp", None], [["udp"]], {"udp": True}]
_WRONG_OBJECT_LIST = [None, {}, [1], [{"a": 1}, "b"], [[]], "[]"]

_WRONG_BY_KIND = {
    "a string": _WRONG_STR,
    "an integer": _WRONG_INT,
    "a finite number": _WRONG_NUMBER,
    "an object": _WRONG_OBJECT,
    "an integer or a string": _WRONG_INT_OR_STR,
    "a list of strings": _WRONG_STR_LIST,
    "a list of objects": _WRONG_OBJECT_LIST,
}


def bad_field_cases():
    for table in (CLIENT_MESSAGES, SERVER_MESSAGES):
        for kind, fields in table.items():
            for f in fields:
                for i, wrong in enumerate(_WRONG_BY_KIND[f.kind.name]):
                    if wrong is None and not f.required:
                        continue  # null is how an optional field says "absent"
                    yield pytest.param(kind, f.name, f.kind.name, wrong, id=f"{kind}.{f.name}-{i}")


@pytest.mark.parametrize("kind,field,must,wrong", list(bad_field_cases()))
def test_every_field_refuses_the_wrong_json_type(kind, field, must, wrong):
    sender, msg = valid(kind)
    msg[field] = wrong
    err = refused("message_bad_field", msg, sender)
    assert err.message.startswith(f"{kind} field {field!r} must be {must}, got ")
    if field == "token":
        assert err.message.endswith("got <redacted>")
    else:
        assert err.message.endswith(f"got {wrong!r}")


@pytest.mark.parametrize("kind,field,wrong", [
    ("rule_status", "state", "running"),
    ("rule_status", "state", "ACTIVE"),
    ("rule_status", "state", ""),
    ("rule_update", "action", "upsert"),
    ("rule_update", "action", "set"),
    ("owner_rate_limit_update", "action", "push"),
    ("owner_rate_limit_update", "action", "delete"),
    ("traffic_quota_update", "action", "remove "),
    ("traffic_quota_update", "action", "Set"),
])
def test_enumerated_values(kind, field, wrong):
    sender, msg = valid(kind)
    msg[field] = wrong
    err = refused("message_bad_field", msg, sender)
    assert kind in err.message and repr(field) in err.message and repr(wrong) in err.message
    assert "must be one of" in err.message


def test_bool_is_not_an_int():
    _, msg = valid("hello")
    msg["protocol_version"] = True
    err = refused("message_bad_field", msg, "client")
    assert err.message == "hello field 'protocol_version' must be an integer, got True"


def test_pushed_rule_must_be_the_named_rule():
    _, msg = valid("rule_update")
    msg["rule_id"] = "r2"
    err = refused("message_bad_field", msg, "server")
    assert "'r1'" in err.message and "'r2'" in err.message


def test_long_bad_value_is_truncated():
    _, msg = valid("rule_status")
    msg["state"] = "z" * 10000
    err = refused("message_bad_field", msg, "client")
    assert len(err.message) < 200
    assert err.message.endswith("...")
    assert "z" * 100 not in err.message


def test_big_bad_container_is_truncated():
    _, msg = valid("replay_done")
    msg["rule_ids"] = list(range(10000))
    err = refused("message_bad_field", msg, "server")
    assert len(err.message) < 200


# ---------------------------------------------------------------- tokens never appear

@pytest.mark.parametrize("kind", ["hello", "enrolled"])
@pytest.mark.parametrize("wrong", [12345678901234, ["tok-s3cr3t"], {"t": "tok-s3cr3t"}, True])
def test_bad_token_value_is_redacted(kind, wrong):
    sender, msg = valid(kind)
    msg["token"] = wrong
    err = refused("message_bad_field", msg, sender)
    assert "<redacted>" in err.message
    assert "s3cr3t" not in err.message and "12345678901234" not in err.message


@pytest.mark.parametrize("kind", ["hello", "enrolled"])
def test_good_token_never_appears_in_other_fields_errors(kind):
    sender, msg = valid(kind)
    for field in msg:
        if field in ("type", "token"):
            continue
        bad = dict(msg)
        bad[field] = None
        err = refused("message_bad_field", bad, sender)
        assert TOKEN not in err.message and "s3cr3t" not in err.message
        assert TOKEN not in str(err)
    err = refused("message_unknown_type", msg, OTHER[sender])
    assert "s3cr3t" not in err.message


def test_message_error_shape():
    err = MessageError("message_bad_field", "hello field 'x' must be a string, got 1")
    assert isinstance(err, Exception)
    assert err.code == "message_bad_field"
    assert err.message == "hello field 'x' must be a string, got 1"
    assert str(err) == "message_bad_field: hello field 'x' must be a string, got 1"


# ---------------------------------------------------------------- constructors

def built_messages() -> list[tuple[str, str, dict]]:
    """(sender, expected type, message) for every constructor, in several shapes."""
    return [
        ("client", "hello", m.hello(TOKEN, "0.1.0", ["udp"])),
        ("client", "hello", m.hello(TOKEN, "0.1.0")),
        ("client", "hello", m.hello(TOKEN, "0.1.0", (), protocol_version=2)),
        ("client", "enroll", m.enroll("ABCD-1234", "0.1.0")),
        ("client", "rule_status", m.rule_status("r1", "active", port=8080, request_id="req-1")),
        ("client", "rule_status", m.rule_status("r1", "failed", reason="bind failed", code="port_in_use")),
        ("client", "rule_status", m.rule_status("r1", "removed")),
        ("client", "stats_report", m.stats_report([{"rule_id": "r1", "bytes_in": 1}], 1700000000.5)),
        ("client", "stats_report", m.stats_report([], 0)),
        ("client", "pong", m.pong(7)),
        ("client", "pong", m.pong("n-7")),
        ("client", "traffic_quota_exhausted", m.traffic_quota_exhausted("u1", "01HZX", 1700000000.5)),
        ("server", "welcome", m.welcome(client_id="01HZX", client_name="edge-1", server_version="0.1.0",
                                        server_time=1700000000.25, stats_interval_secs=10,
                                        udp_max_flows_per_rule=1024, udp_flow_idle_secs=60)),
        ("server", "enrolled", m.enrolled(client_id="01HZX", client_name="edge-1", token=TOKEN,
                                          server_endpoint="203.0.113.5:7443")),
        ("server", "rule_update", m.rule_push(RULE, "req-1")),
        ("server", "rule_update", m.rule_push(RULE)),
        ("server", "rule_update", m.rule_remove("r1", "req-2")),
        ("server", "rule_update", m.rule_remove("r1")),
        ("server", "replay_done", m.replay_done(["r1", "r2"])),
        ("server", "replay_done", m.replay_done(())),
        ("server", "owner_rate_limit_update",
         m.owner_rate_limit_update("01HZX", "u1", "set", {"bandwidth_in_bps": 1000})),
        ("server", "owner_rate_limit_update", m.owner_rate_limit_update("01HZX", "u1", "remove")),
        ("server", "traffic_quota_update",
         m.traffic_quota_update("u1", "01HZX", "set", VALID["traffic_quota_update"][1]["state"])),
        ("server", "traffic_quota_update", m.traffic_quota_update("u1", "01HZX", "remove")),
        ("server", "ping", m.ping(1)),
        ("server", "ping", m.ping("n-1")),
        ("server", "error", m.error("token_revoked", "the token was revoked")),
    ]


def test_every_type_has_a_constructor():
    assert {kind for _, kind, _ in built_messages()} == set(VALID)


@pytest.mark.parametrize("sender,kind,msg", built_messages(), ids=lambda v: v if isinstance(v, str) else "")
def test_constructor_round_trips_through_encode_decode_validate(sender, kind, msg):
    assert msg["type"] == kind
    assert validate(msg, sender) == msg  # constructors spell out every optional field
    dec = FrameDecoder()
    frame = encode(msg)
    got = []
    for i in range(len(frame)):
        got.extend(dec.feed(frame[i:i + 1]))
    assert got == [msg]
    assert validate(got[0], sender) == msg
    with pytest.raises(MessageError) as ei:
        validate(got[0], OTHER[sender])
    assert ei.value.code == "message_unknown_type"


def test_all_constructed_messages_in_one_stream():
    built = built_messages()
    stream = b"".join(encode(msg) for _, _, msg in built)
    assert FrameDecoder().feed(stream) == [msg for _, _, msg in built]


def test_hello_defaults():
    msg = m.hello(TOKEN, "0.1.0")
    assert msg == {"type": "hello", "token": TOKEN, "protocol_version": PROTOCOL_VERSION,
                   "client_version": "0.1.0", "capabilities": list(CAPABILITIES)}


def test_welcome_carries_the_protocol_version():
    (msg,) = [msg for _, kind, msg in built_messages() if kind == "welcome"]
    assert msg["protocol_version"] == PROTOCOL_VERSION
    assert msg["udp_max_flows_per_rule"] == 1024 and msg["udp_flow_idle_secs"] == 60


def test_rule_push_names_the_rule_it_carries():
    msg = m.rule_push(RULE, "req-1")
    assert msg == {"type": "rule_update", "action": "push", "rule_id": "r1", "request_id": "req-1", "rule": RULE}
    assert Rule.from_dict(msg["rule"]).rule_id == "r1"


def test_rule_push_accepts_the_id_alias():
    assert m.rule_push({"id": "abc", "listen_port": 1, "target": "a:1"})["rule_id"] == "abc"


def test_rule_remove_shape():
    assert m.rule_remove("r1", "req-2") == {"type": "rule_update", "action": "remove", "rule_id": "r1",
                                            "request_id": "req-2", "rule": None}


def test_replay_done_lists_the_ids_in_order():
    assert m.replay_done(iter(["b", "a"]))["rule_ids"] == ["b", "a"]


@pytest.mark.parametrize("make,code", [
    (lambda: m.rule_push({"listen_port": 1}), "message_bad_field"),       # no rule id to name
    (lambda: m.rule_push("r1"), "message_bad_field"),
    (lambda: m.rule_status("r1", "running"), "message_bad_field"),
    (lambda: m.rule_status("r1", "active", port="8080"), "message_bad_field"),
    (lambda: m.hello(TOKEN, "0.1.0", [1]), "message_bad_field"),
    (lambda: m.hello(None, "0.1.0"), "message_bad_field"),
    (lambda: m.pong(1.5), "message_bad_field"),
    (lambda: m.ping(True), "message_bad_field"),
    (lambda: m.stats_report([1], 0), "message_bad_field"),
    (lambda: m.stats_report([], float("nan")), "message_bad_field"),
    (lambda: m.replay_done([1]), "message_bad_field"),
    (lambda: m.owner_rate_limit_update("c", "o", "set"), "message_missing_field"),
    (lambda: m.owner_rate_limit_update("c", "o", "clear"), "message_bad_field"),
    (lambda: m.traffic_quota_update("u", "c", "set"), "message_missing_field"),
    (lambda: m.welcome(client_id="c", client_name="n", server_version="v", server_time=0,
                       stats_interval_secs=10, udp_max_flows_per_rule=1024, udp_flow_idle_secs=60.0),
     "message_bad_field"),
    (lambda: m.error("token_revoked", None), "message_bad_field"),
])
def test_constructors_refuse_bad_arguments(make, code):
    with pytest.raises(MessageError) as ei:
        make()
    assert ei.value.code == code


def test_constructor_refusing_a_token_does_not_show_it():
    with pytest.raises(MessageError) as ei:
        m.enrolled(client_id="c", client_name="n", token=b"s3cr3t-bytes", server_endpoint="h:1")
    assert "s3cr3t" not in str(ei.value)


def test_enrolled_takes_positional_arguments():
    msg = m.enrolled("01HZX", "edge-1", TOKEN, "203.0.113.5:7443")
    assert msg == VALID["enrolled"][1]


def _nested(depth: int) -> list:
    outer = inner = []
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return outer


def test_a_deeply_nested_bad_value_is_described_without_recursion():
    _, msg = valid("rule_status")
    msg["state"] = _nested(5000)  # plain repr() would raise RecursionError
    err = refused("message_bad_field", msg, "client")
    assert len(err.message) < 200 and "[[" in err.message
