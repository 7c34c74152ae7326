"""Checks of identity input (SPEC §5, §6): user ids, roles, ports, protocols, the grant fit.

Pure functions; ``identity.py`` uses them and re-exports the public ones. Every refusal is a
``PortunusError`` whose message names the bad value, cut short (``_shown``), never a secret.
"""

from __future__ import annotations

import re

from ..errors import PortunusError
from ..store import grants as store_grants
from ..store import users as store_users
from ..store.operators import LEGACY_ID, SUPERADMIN_ID

USER_ID_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,31}")
ROLES = store_users.ROLES
PROTOCOLS = ("tcp", "udp")
ANY_CLIENT = store_grants.ANY_CLIENT
MAX_DISPLAY_NAME = 64
MAX_NOTE = 200


def _shown(value, limit: int = 64) -> str:
    """repr of caller input for a message, cut so a huge value cannot flood a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def validate_user_id(user_id) -> str:
    """A new user's id: ``[a-z][a-z0-9_-]{0,31}``; a leading ``_`` is reserved."""
    if isinstance(user_id, str) and user_id.startswith("_"):
        raise PortunusError("validation.reserved_user_id",
                            f"user ids starting with '_' are reserved ({SUPERADMIN_ID}, {LEGACY_ID}), got {_shown(user_id)}",
                            user_id=user_id[:64])
    if not isinstance(user_id, str) or USER_ID_PATTERN.fullmatch(user_id) is None:
        raise PortunusError("validation.invalid_user_id",
                            f"a user id is a lowercase letter then up to 31 of a-z 0-9 _ -, got {_shown(user_id)}")
    return user_id


def validate_role(role) -> str:
    if role not in ROLES:
        raise PortunusError("validation.invalid_role", f"role must be superadmin or user, got {_shown(role)}")
    return role


def _port(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise PortunusError("validation.invalid_port", f"{what} must be a port 1-65535, got {_shown(value)}")
    return value


def validate_protocols(protocols) -> list[str]:
    if isinstance(protocols, str) or not isinstance(protocols, (list, tuple)) or not protocols:
        raise PortunusError("validation.invalid_protocols",
                            f"protocols must be a non-empty list of tcp/udp, got {_shown(protocols)}")
    for proto in protocols:
        if proto not in PROTOCOLS:
            raise PortunusError("validation.invalid_protocol", f"protocol {_shown(proto)} is not tcp or udp")
    return [p for p in PROTOCOLS if p in protocols]


def _address(remote_ip) -> str:
    # callers without a peer address (tests, a Unix socket) still share one key rather than none
    return remote_ip if isinstance(remote_ip, str) and remote_ip else "unknown"


def grant_fits(grant: dict, protocol: str, start: int, end: int) -> bool:
    return protocol in grant["protocols"] and grant["listen_port_start"] <= start and end <= grant["listen_port_end"]
