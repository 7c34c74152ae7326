"""The rate-limit routes (SPEC §2.9, §6): owner caps per (client, owner), and a rule's caps.

``routes.ROUTES`` includes ``CAP_ROUTES``: ``(method, pattern, handler, access, summary)`` tuples,
so this module needs nothing from ``routes`` (no import cycle). The owner-cap handlers reach
``api.core.owner_caps`` (``server.owner_caps.OwnerCapService``, attached by ``serve``); they are
superadmin only. ``PUT rules/{id}`` is for the rule's owner or a superadmin (the ``owner`` level)
and changes only ``rate_limit`` (``server.owner_caps.update_rule_caps``).
"""

from __future__ import annotations

from ..errors import PortunusError
from ..server.owner_caps import update_rule_caps
from .auth import OWNER, SUPERADMIN

_ID = r"(?P<id>[^/]+)"
_OWNER = r"(?P<owner>[^/]+)"


def _service(api):
    service = getattr(api.core, "owner_caps", None)
    if service is None:  # an API built without serve's wiring (tests of other routes)
        raise PortunusError("internal", "owner caps are not wired in this server")
    return service


# ---------------------------------------------------------------- handlers

def list_owners(api, p, m, q, body, ctx):
    return 200, {"owners": _service(api).list_owners(m["id"])}


def get_owner_cap(api, p, m, q, body, ctx):
    return 200, _service(api).get(m["id"], m["owner"])


def put_owner_cap(api, p, m, q, body, ctx):
    return 200, _service(api).put(m["id"], m["owner"], body)


def delete_owner_cap(api, p, m, q, body, ctx):
    return 200, {"removed": True, "owner_cap": _service(api).delete(m["id"], m["owner"])}


def put_rule_caps(api, p, m, q, body, ctx):
    return 200, update_rule_caps(api.core, m["id"], body, request_id=ctx["request_id"])


_RATE_LIMIT = ("{rate_limit: {bandwidth_in_bps, bandwidth_out_bps, new_connections_per_sec, "
               "concurrent_connections, *_burst}}")
CAP_ROUTES = [
    ("GET", rf"/v1/clients/{_ID}/owners", list_owners, SUPERADMIN,
     "{owners: [{owner_id, has_rate_limit, rule_count}]}: the rule owners on a client (superadmin)."),
    ("GET", rf"/v1/clients/{_ID}/owners/{_OWNER}/rate-limit", get_owner_cap, SUPERADMIN,
     "{client_id, owner_id, rate_limit, updated_at}: the owner's envelope caps on the client; "
     "rate_limit null when uncapped (superadmin)."),
    ("PUT", rf"/v1/clients/{_ID}/owners/{_OWNER}/rate-limit", put_owner_cap, SUPERADMIN,
     f"{_RATE_LIMIT} -> the owner cap; set or replace it and push owner_rate_limit_update (superadmin)."),
    ("DELETE", rf"/v1/clients/{_ID}/owners/{_OWNER}/rate-limit", delete_owner_cap, SUPERADMIN,
     "Remove the owner's caps on the client -> {removed, owner_cap} (superadmin)."),
    ("PUT", rf"/v1/rules/{_ID}", put_rule_caps, OWNER,
     "{rate_limit: {...} | null} -> the rule with client_notified: change only the caps, a hot update that "
     "keeps the client's bucket state (its owner or a superadmin)."),
]
