"""Control channel message schemas (SPEC §3.1, §3.4): one table, one validator, constructors.

``validate(msg, sender)`` checks a decoded frame against the table for the side
that sent it. Unknown extra fields pass (a newer peer may add some); missing or
mistyped known fields, unknown types and bad enumerated values are refused with
a ``MessageError`` whose code is stable and whose message names the type, the
field and the bad value (never a token's value).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .frames import short_repr

PROTOCOL_VERSION = 1
# the one list of what this build's client can run (the agent declares it in hello; doctor compares it)
CAPABILITIES = ("udp", "port_range", "multi_target", "proxy_protocol", "sni", "rate_limit", "traffic_quota")
FIRST_MESSAGE_TYPES = ("hello", "enroll")
RULE_STATES = ("active", "failed", "removed")
RULE_ACTIONS = ("push", "remove")
SET_ACTIONS = ("set", "remove")
SENDERS = ("client", "server")

_SECRET_FIELDS = frozenset({"token"})
_MAX_SHOWN = 60


class MessageError(Exception):
    """A message that does not fit its schema.

    Codes: ``message_unknown_type``, ``message_missing_field``, ``message_bad_field``.
    """

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


# ---------------------------------------------------------------- field kinds

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


class _Kind:
    # plain classes, not dataclasses: a @dataclass costs ~1.5 M instructions to create, and importing
    # dataclasses ~43 M, about a sixth of `client enroll` (issue 15, startup)
    __slots__ = ("name", "accepts")

    def __init__(self, name: str, accepts: Callable[[object], bool]):
        self.name = name  # "must be <name>"
        self.accepts = accepts

    def __repr__(self) -> str:
        return f"_Kind({self.name!r})"


_STR = _Kind("a string", lambda v: isinstance(v, str))
_INT = _Kind("an integer", _is_int)
_NUMBER = _Kind("a finite number", _is_number)
_OBJECT = _Kind("an object", lambda v: isinstance(v, dict))
_INT_OR_STR = _Kind("an integer or a string", lambda v: _is_int(v) or isinstance(v, str))
_STR_LIST = _Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
_OBJECT_LIST = _Kind("a list of objects", lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v))


class _Field:
    __slots__ = ("name", "kind", "required", "choices", "required_when")

    def __init__(self, name: str, kind: _Kind, required: bool = True, choices: tuple[str, ...] | None = None,
                 required_when: tuple[str, str] | None = None):
        self.name = name
        self.kind = kind
        self.required = required  # optional fields may be absent or null; validate() fills them with None
        self.choices = choices
        # (field, value) of a sibling: this optional field becomes required (non-null) when it matches
        self.required_when = required_when

    def __repr__(self) -> str:
        return f"_Field({self.name!r}, {self.kind!r}, required={self.required})"


def _req(name: str, kind: _Kind, choices: tuple[str, ...] | None = None) -> _Field:
    return _Field(name, kind, True, choices)


def _opt(name: str, kind: _Kind, required_when: tuple[str, str] | None = None) -> _Field:
    return _Field(name, kind, False, None, required_when)


CLIENT_MESSAGES: dict[str, tuple[_Field, ...]] = {
    "hello": (_req("token", _STR), _req("protocol_version", _INT), _req("client_version", _STR),
              _req("capabilities", _STR_LIST)),
    "enroll": (_req("code", _STR), _req("client_version", _STR)),
    "rule_status": (_req("rule_id", _STR), _req("state", _STR, RULE_STATES), _opt("reason", _STR),
                    _opt("code", _STR), _opt("port", _INT), _opt("request_id", _STR)),
    # owners: the owner envelope rows (limiter counters per owner with a cap, docs/rate-limits.md)
    "stats_report": (_req("rules", _OBJECT_LIST), _req("at", _NUMBER), _opt("owners", _OBJECT_LIST)),
    "pong": (_req("nonce", _INT_OR_STR),),
    # the pair's quota handle just ran dry (SPEC §2.10): the server marks exhausted_at at once
    "traffic_quota_exhausted": (_req("user_id", _STR), _req("client_id", _STR), _req("at", _NUMBER)),
}

SERVER_MESSAGES: dict[str, tuple[_Field, ...]] = {
    "welcome": (_req("client_id", _STR), _req("client_name", _STR), _req("server_version", _STR),
                _req("server_time", _NUMBER), _req("protocol_version", _INT),
                _req("stats_interval_secs", _NUMBER), _req("udp_max_flows_per_rule", _INT),
                _req("udp_flow_idle_secs", _INT)),
    "enrolled": (_req("client_id", _STR), _req("client_name", _STR), _req("token", _STR),
                 _req("server_endpoint", _STR)),
    "rule_update": (_req("action", _STR, RULE_ACTIONS), _req("rule_id", _STR), _opt("request_id", _STR),
                    _opt("rule", _OBJECT, required_when=("action", "push"))),
    "replay_done": (_req("rule_ids", _STR_LIST),),
    "owner_rate_limit_update": (_req("client_id", _STR), _req("owner_id", _STR),
                                _req("action", _STR, SET_ACTIONS),
                                _opt("rate_limit", _OBJECT, required_when=("action", "set"))),
    "traffic_quota_update": (_req("user_id", _STR), _req("client_id", _STR), _req("action", _STR, SET_ACTIONS),
                             _opt("state", _OBJECT, required_when=("action", "set"))),
    "ping": (_req("nonce", _INT_OR_STR),),
    "error": (_req("code", _STR), _req("message", _STR)),
}

_BY_SENDER = {"client": CLIENT_MESSAGES, "server": SERVER_MESSAGES}
_OTHER_SIDE = {"client": "server", "server": "client"}


# ---------------------------------------------------------------- validation

def _shown(field: str, value) -> str:
    """A value for an error message: repr, cut short; secrets never appear."""
    if field in _SECRET_FIELDS:
        return "<redacted>"
    return short_repr(value, _MAX_SHOWN)


def _bad(kind: str, field: str, must: str, value) -> MessageError:
    return MessageError("message_bad_field", f"{kind} field {field!r} must be {must}, got {_shown(field, value)}")


def validate(msg: dict, sender: str) -> dict:
    """Check ``msg`` as sent by ``sender`` ("client" or "server").

    Returns a shallow copy with every optional field present (None when absent);
    unknown extra fields are kept as they are.
    """
    if sender not in _BY_SENDER:
        raise ValueError(f"sender must be 'client' or 'server', got {sender!r}")
    if not isinstance(msg, dict):
        raise MessageError("message_bad_field", f"a message must be an object, got {type(msg).__name__}")
    if "type" not in msg:
        raise MessageError("message_missing_field", "message is missing field 'type'")
    kind = msg["type"]
    if not isinstance(kind, str):
        raise MessageError("message_bad_field", f"message field 'type' must be a string, got {_shown('type', kind)}")
    fields = _BY_SENDER[sender].get(kind)
    if fields is None:
        if kind in _BY_SENDER[_OTHER_SIDE[sender]]:
            raise MessageError("message_unknown_type",
                               f"{_shown('type', kind)} is a {_OTHER_SIDE[sender]} message; a {sender} may not send it")
        raise MessageError("message_unknown_type", f"unknown {sender} message type {_shown('type', kind)}")

    out = dict(msg)
    for f in fields:
        value = msg.get(f.name)
        if f.name not in msg or (value is None and not f.required):
            if f.required:
                raise MessageError("message_missing_field", f"{kind} message is missing field {f.name!r}")
            if f.required_when is not None and msg.get(f.required_when[0]) == f.required_when[1]:
                other, when = f.required_when
                raise MessageError("message_missing_field",
                                   f"{kind} message with {other} {when!r} is missing field {f.name!r}")
            out[f.name] = None
            continue
        if not f.kind.accepts(value):
            raise _bad(kind, f.name, f.kind.name, value)
        if f.choices is not None and value not in f.choices:
            raise _bad(kind, f.name, "one of " + ", ".join(repr(c) for c in f.choices), value)
    if kind == "rule_update" and out["rule"] is not None:
        # the rule a push carries must be the rule it names
        inner = out["rule"].get("rule_id", out["rule"].get("id"))
        if inner is not None and inner != out["rule_id"]:
            raise MessageError("message_bad_field",
                               f"rule_update field 'rule' has rule_id {_shown('rule_id', inner)}, "
                               f"not {_shown('rule_id', out['rule_id'])}")
    return out


def _built(msg: dict, sender: str) -> dict:
    # constructors refuse bad arguments here rather than on the far side of the wire
    validate(msg, sender)
    return msg


# ---------------------------------------------------------------- client -> server

def hello(token: str, client_version: str, capabilities=CAPABILITIES, *,
          protocol_version: int = PROTOCOL_VERSION) -> dict:
    return _built({"type": "hello", "token": token, "protocol_version": protocol_version,
                   "client_version": client_version, "capabilities": list(capabilities)}, "client")


def enroll(code: str, client_version: str) -> dict:
    return _built({"type": "enroll", "code": code, "client_version": client_version}, "client")


def rule_status(rule_id: str, state: str, *, reason: str | None = None, code: str | None = None,
                port: int | None = None, request_id: str | None = None) -> dict:
    return _built({"type": "rule_status", "rule_id": rule_id, "state": state, "reason": reason,
                   "code": code, "port": port, "request_id": request_id}, "client")


def stats_report(rules: list[dict], at: float, owners: list[dict] | None = None) -> dict:
    return _built({"type": "stats_report", "rules": list(rules), "at": at,
                   "owners": None if owners is None else list(owners)}, "client")


def pong(nonce: int | str) -> dict:
    return _built({"type": "pong", "nonce": nonce}, "client")


def traffic_quota_exhausted(user_id: str, client_id: str, at: float) -> dict:
    """The client's budget for ``user_id`` ran dry at ``at`` (its clock; the server uses its own)."""
    return _built({"type": "traffic_quota_exhausted", "user_id": user_id, "client_id": client_id, "at": at},
                  "client")


# ---------------------------------------------------------------- server -> client

def welcome(*, client_id: str, client_name: str, server_version: str, server_time: float,
            stats_interval_secs: float, udp_max_flows_per_rule: int, udp_flow_idle_secs: int,
            protocol_version: int = PROTOCOL_VERSION) -> dict:
    return _built({"type": "welcome", "client_id": client_id, "client_name": client_name,
                   "server_version": server_version, "server_time": server_time,
                   "protocol_version": protocol_version, "stats_interval_secs": stats_interval_secs,
                   "udp_max_flows_per_rule": udp_max_flows_per_rule,
                   "udp_flow_idle_secs": udp_flow_idle_secs}, "server")


def enrolled(client_id: str, client_name: str, token: str, server_endpoint: str) -> dict:
    return _built({"type": "enrolled", "client_id": client_id, "client_name": client_name,
                   "token": token, "server_endpoint": server_endpoint}, "server")


def rule_push(rule: dict, request_id: str | None = None) -> dict:
    """Push ``rule`` (a ``Rule.to_dict()``); the message's rule_id is the rule's."""
    rule_id = rule.get("rule_id", rule.get("id")) if isinstance(rule, dict) else None
    return _built({"type": "rule_update", "action": "push", "rule_id": rule_id,
                   "request_id": request_id, "rule": rule}, "server")


def rule_remove(rule_id: str, request_id: str | None = None) -> dict:
    return _built({"type": "rule_update", "action": "remove", "rule_id": rule_id,
                   "request_id": request_id, "rule": None}, "server")


def replay_done(rule_ids) -> dict:
    return _built({"type": "replay_done", "rule_ids": list(rule_ids)}, "server")


def owner_rate_limit_update(client_id: str, owner_id: str, action: str, rate_limit: dict | None = None) -> dict:
    return _built({"type": "owner_rate_limit_update", "client_id": client_id, "owner_id": owner_id,
                   "action": action, "rate_limit": rate_limit}, "server")


def traffic_quota_update(user_id: str, client_id: str, action: str, state: dict | None = None) -> dict:
    return _built({"type": "traffic_quota_update", "user_id": user_id, "client_id": client_id,
                   "action": action, "state": state}, "server")


def ping(nonce: int | str) -> dict:
    return _built({"type": "ping", "nonce": nonce}, "server")


def error(code: str, message: str) -> dict:
    return _built({"type": "error", "code": code, "message": message}, "server")
