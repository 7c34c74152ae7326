"""The quota and traffic-history routes (SPEC §4.4, §6), as rows for the routing table.

``routes.ROUTES`` includes ``QUOTA_ROUTES``: ``(method, pattern, handler, access, summary)``
tuples, so this module needs nothing from ``routes`` (no import cycle). The handlers reach
``api.core.quotas`` (``server.quotas.QuotaService``) and ``api.core.traffic``
(``server.traffic.TrafficAccounting``), which ``serve`` attaches.

Users read their own quotas and traffic: those routes are open to any authenticated principal
and the handler refuses another user's ``{u}`` with ``403 not_owner`` (the path's user is the
resource owner, so the check is the same for every such route). Everything else is superadmin.
"""

from __future__ import annotations

from ..errors import PortunusError
from .auth import AUTHENTICATED, SUPERADMIN
from .parse import query_value

_U = r"(?P<u>[^/]+)"
_CLIENT = r"(?P<client>[^/]+)"
_ID = r"(?P<id>[^/]+)"


def _own(principal, user_id: str) -> None:
    """A non-superadmin may read only the quotas and traffic of their own user id."""
    if principal is not None and not principal.is_superadmin and principal.user_id != user_id:
        raise PortunusError("not_owner", f"user {principal.user_id!r} may read only their own quotas and traffic, "
                                         f"not those of {user_id[:64]!r}", user_id=user_id)


def _history(api, query: dict, *, user_id=None, client_ref=None) -> dict:
    return api.core.traffic.history(from_=query_value(query, "from"), to=query_value(query, "to"),
                                    bucket=query_value(query, "bucket"), user_id=user_id, client_ref=client_ref)


# ---------------------------------------------------------------- handlers

def list_user_quotas(api, p, m, q, body, ctx):
    _own(p, m["u"])
    return 200, {"quotas": api.core.quotas.list_for_user(m["u"])}


def put_quota(api, p, m, q, body, ctx):
    change = api.core.quotas.put(m["u"], m["client"], body)
    return (201 if change.created else 200), change.view


def patch_quota(api, p, m, q, body, ctx):
    return 200, api.core.quotas.patch(m["u"], m["client"], body).view


def delete_quota(api, p, m, q, body, ctx):
    return 200, {"removed": True, "quota": api.core.quotas.delete(m["u"], m["client"])}


def quota_status(api, p, m, q, body, ctx):
    _own(p, m["u"])
    return 200, api.core.quotas.status(m["u"], m["client"])


def user_traffic(api, p, m, q, body, ctx):
    _own(p, m["u"])
    return 200, _history(api, q, user_id=m["u"], client_ref=query_value(q, "client_id"))


def list_client_quotas(api, p, m, q, body, ctx):
    return 200, {"quotas": api.core.quotas.list_for_client(m["id"])}


def client_traffic(api, p, m, q, body, ctx):
    return 200, _history(api, q, user_id=query_value(q, "user_id"), client_ref=m["id"])


def global_traffic(api, p, m, q, body, ctx):
    return 200, _history(api, q, user_id=query_value(q, "user_id"), client_ref=query_value(q, "client_id"))


_HISTORY = "?from=&to= (unix seconds), bucket=1m|1h"
QUOTA_ROUTES = [
    ("GET", rf"/v1/users/{_U}/quotas", list_user_quotas, AUTHENTICATED,
     "The user's traffic quotas (a user reads their own; superadmins any)."),
    ("PUT", rf"/v1/users/{_U}/quotas/{_CLIENT}", put_quota, SUPERADMIN,
     "Create (201) or replace the monthly quota of a (user, client) pair: {monthly_bytes, billing_anchor?}."),
    ("PATCH", rf"/v1/users/{_U}/quotas/{_CLIENT}", patch_quota, SUPERADMIN,
     "Change monthly_bytes and/or clear_period_usage (in that order, one push)."),
    ("DELETE", rf"/v1/users/{_U}/quotas/{_CLIENT}", delete_quota, SUPERADMIN,
     "Remove the quota: the pair forwards unmetered."),
    ("GET", rf"/v1/users/{_U}/quotas/{_CLIENT}/status", quota_status, AUTHENTICATED,
     "The quota view: usage, budget, period, exhausted/exhausted_at (own or superadmin)."),
    ("GET", rf"/v1/users/{_U}/traffic", user_traffic, AUTHENTICATED,
     f"The user's traffic history ({_HISTORY}, client_id=; own or superadmin)."),
    ("GET", rf"/v1/clients/{_ID}/quotas", list_client_quotas, SUPERADMIN, "The quotas on a client."),
    ("GET", rf"/v1/clients/{_ID}/traffic", client_traffic, SUPERADMIN,
     f"The client's traffic history ({_HISTORY}, user_id=)."),
    ("GET", r"/v1/traffic/global", global_traffic, SUPERADMIN,
     f"All traffic ({_HISTORY}, user_id=, client_id=)."),
]
