"""The one error table: error code -> HTTP status -> CLI exit code -> default message.

Every error that reaches a user carries a stable code from this table. Codes under
``validation.`` that are not listed explicitly share the generic validation row.
"""

from __future__ import annotations

from dataclasses import dataclass

# Exit codes (SPEC §7.2).
EXIT_OK = 0
EXIT_GENERIC = 1
EXIT_USAGE = 2
EXIT_PREFLIGHT = 3
EXIT_NOT_CONNECTED = 4
EXIT_ACTIVATION = 5
EXIT_RBAC = 6
EXIT_UNAUTHENTICATED = 7
EXIT_NOT_FOUND = 8
EXIT_CONFLICT = 9
EXIT_STORE_IN_USE = 75
EXIT_SCHEMA_TOO_NEW = 78


@dataclass(frozen=True)
class ErrorKind:
    http_status: int
    exit_code: int
    message: str


_VALIDATION = ErrorKind(400, EXIT_USAGE, "invalid value")

ERRORS: dict[str, ErrorKind] = {
    # generic
    "internal": ErrorKind(500, EXIT_GENERIC, "internal error"),
    "io_error": ErrorKind(500, EXIT_GENERIC, "I/O error"),
    "config_invalid": ErrorKind(400, EXIT_USAGE, "configuration is invalid"),
    "usage": ErrorKind(400, EXIT_USAGE, "usage error"),
    "bad_request": ErrorKind(400, EXIT_USAGE, "malformed request"),
    "server_unreachable": ErrorKind(502, EXIT_GENERIC, "server unreachable"),
    "startup.unsupported_filesystem": ErrorKind(500, EXIT_GENERIC, "unsupported filesystem for the data dir"),
    # server certificate (§4.1)
    "startup.tls_key_permissions": ErrorKind(500, EXIT_GENERIC, "the TLS key file is open to group or others"),
    "startup.tls_files_incomplete": ErrorKind(500, EXIT_GENERIC, "only one of the TLS cert and key files exists"),
    "startup.tls_invalid": ErrorKind(500, EXIT_GENERIC, "the TLS cert or key file is invalid"),
    # client bundle (§3.2); local to the client, so no HTTP route returns them
    "bundle_not_found": ErrorKind(400, EXIT_GENERIC, "no client bundle found"),
    "bundle_invalid": ErrorKind(400, EXIT_GENERIC, "the client bundle is invalid"),
    # pre-flight refusals (capability gates)
    "unsupported_protocol": ErrorKind(422, EXIT_PREFLIGHT, "client does not support this protocol"),
    "multi_target_unsupported_by_client": ErrorKind(422, EXIT_PREFLIGHT, "client does not support multi-target rules"),
    "sni_unsupported_by_client": ErrorKind(422, EXIT_PREFLIGHT, "client does not support SNI routing"),
    "rate_limit_unsupported_by_client": ErrorKind(422, EXIT_PREFLIGHT, "client does not support rate limits"),
    "quota_unsupported_by_client": ErrorKind(422, EXIT_PREFLIGHT, "client does not support traffic quotas"),
    "proxy_protocol_unsupported_by_client": ErrorKind(422, EXIT_PREFLIGHT, "client does not support PROXY protocol"),
    "port_range_unsupported_by_client": ErrorKind(422, EXIT_PREFLIGHT, "client does not support port ranges"),
    "validation.rate_limit_no_caps_provided": ErrorKind(400, EXIT_PREFLIGHT, "no caps provided"),
    # connectivity / activation
    "client_not_connected": ErrorKind(409, EXIT_NOT_CONNECTED, "client is not connected"),
    "activation_failed": ErrorKind(409, EXIT_ACTIVATION, "rule activation failed"),
    "port_in_use": ErrorKind(409, EXIT_ACTIVATION, "port already in use"),
    # auth
    "unauthenticated": ErrorKind(401, EXIT_UNAUTHENTICATED, "missing or invalid credentials"),
    "token_revoked": ErrorKind(401, EXIT_UNAUTHENTICATED, "token has been revoked"),
    # a bad enrollment code is caller input that no retry can fix: a usage error (2), not a generic one
    "enrollment_invalid": ErrorKind(400, EXIT_USAGE, "enrollment code is not valid"),
    "forbidden": ErrorKind(403, EXIT_RBAC, "forbidden"),
    "not_owner": ErrorKind(403, EXIT_RBAC, "not the owner of this resource"),
    "client_not_granted": ErrorKind(403, EXIT_RBAC, "no grant covers this client"),
    "port_outside_grant": ErrorKind(403, EXIT_RBAC, "listen port outside any single grant"),
    "protocol_not_granted": ErrorKind(403, EXIT_RBAC, "protocol not granted"),
    "password_change_required": ErrorKind(403, EXIT_RBAC, "password change required"),
    "rate_limited": ErrorKind(429, EXIT_GENERIC, "too many attempts"),
    "bootstrap_required": ErrorKind(503, EXIT_GENERIC, "no superadmin exists yet"),
    "server_busy": ErrorKind(503, EXIT_GENERIC, "too many concurrent operator connections"),
    "demo_failed": ErrorKind(500, EXIT_GENERIC, "a demo child did not start or died; its log is kept"),
    # identity (SPEC §5, §6): credentials, onboarding, roles, CSRF for cookie sessions
    "invalid_login": ErrorKind(401, EXIT_UNAUTHENTICATED, "unknown user or wrong password"),
    "setup_token_required": ErrorKind(401, EXIT_UNAUTHENTICATED, "the onboarding setup token is required"),
    "setup_token_invalid": ErrorKind(401, EXIT_UNAUTHENTICATED, "the onboarding setup token is invalid or expired"),
    "already_bootstrapped": ErrorKind(409, EXIT_CONFLICT, "onboarding is closed: a superadmin exists"),
    "password_too_short": ErrorKind(422, EXIT_PREFLIGHT, "password shorter than 12 characters"),
    "password_too_long": ErrorKind(422, EXIT_PREFLIGHT, "password longer than 1024 bytes"),
    "role_required": ErrorKind(403, EXIT_RBAC, "this route is for superadmins"),
    "csrf_origin_required": ErrorKind(403, EXIT_RBAC, "cookie-authenticated writes need an Origin header"),
    "csrf_origin_mismatch": ErrorKind(403, EXIT_RBAC, "Origin is not the server's public origin"),
    "csrf_header_required": ErrorKind(403, EXIT_RBAC, "cookie-authenticated writes need X-Portunus-CSRF: 1"),
    "csrf_content_type_required": ErrorKind(403, EXIT_RBAC, "a request body must be application/json"),
    "conflict.last_superadmin": ErrorKind(409, EXIT_CONFLICT, "the last active superadmin must stay"),
    "conflict.user_exists": ErrorKind(409, EXIT_CONFLICT, "a user with this id already exists"),
    # lookups and conflicts
    "not_found": ErrorKind(404, EXIT_NOT_FOUND, "not found"),
    "client_ambiguous": ErrorKind(409, EXIT_CONFLICT, "client reference matches several clients"),
    "conflict.client_not_revoked": ErrorKind(409, EXIT_CONFLICT, "client must be revoked first"),
    "conflict.client_revoked": ErrorKind(409, EXIT_CONFLICT, "client is revoked"),
    "conflict.rule_exists": ErrorKind(409, EXIT_CONFLICT, "a rule with this id already exists"),
    "conflict.already_bootstrapped": ErrorKind(409, EXIT_CONFLICT, "bootstrap-superadmin already ran"),
    "conflict.legacy_to_sni_unsupported": ErrorKind(409, EXIT_CONFLICT, "an SNI rule cannot join a plain-mode port"),
    "conflict.sni_fallback_duplicate": ErrorKind(409, EXIT_CONFLICT, "this SNI port already has a fallback rule"),
    "conflict.sni_route_duplicate": ErrorKind(409, EXIT_CONFLICT, "this SNI pattern is already routed on the port"),
    # store
    "startup.store_in_use": ErrorKind(503, EXIT_STORE_IN_USE, "another process holds the store"),
    "store_in_use": ErrorKind(503, EXIT_STORE_IN_USE, "another process holds the store"),
    "startup.schema_version_too_new": ErrorKind(500, EXIT_SCHEMA_TOO_NEW, "database schema is newer than this binary"),
    "schema_version_too_new": ErrorKind(500, EXIT_SCHEMA_TOO_NEW, "database schema is newer than this binary"),
    # HTTP transport
    "method_not_allowed": ErrorKind(405, EXIT_USAGE, "method not allowed"),
    "payload_too_large": ErrorKind(413, EXIT_USAGE, "request body too large"),
    # control channel
    "protocol_error": ErrorKind(400, EXIT_GENERIC, "control protocol error"),
    "protocol_version_unsupported": ErrorKind(400, EXIT_GENERIC, "unsupported control protocol version"),
    "tls_pinned_mismatch": ErrorKind(400, EXIT_GENERIC, "server certificate does not match the pin"),
    "session_replaced": ErrorKind(409, EXIT_GENERIC, "a newer connection of this client took over"),
    "startup.listen_failed": ErrorKind(500, EXIT_GENERIC, "cannot listen"),
    # advertised endpoint
    "endpoint_invalid": ErrorKind(422, EXIT_PREFLIGHT, "advertised endpoint must be a bare host:port"),
    "endpoint_not_in_cert_san": ErrorKind(422, EXIT_PREFLIGHT, "advertised endpoint host not covered by the certificate"),
    "failed_precondition": ErrorKind(422, EXIT_PREFLIGHT, "failed precondition"),
    # traffic quotas and history (SPEC §4.4); quota_unsupported_by_client is with the capability gates
    "invalid_quota_size": ErrorKind(400, EXIT_USAGE, "monthly_bytes must be an integer >= 0"),
    "invalid_billing_anchor": ErrorKind(400, EXIT_USAGE, "billing_anchor must be unix seconds and is immutable"),
    "quota_target_not_found": ErrorKind(422, EXIT_PREFLIGHT, "no grant gives this user this client"),
    "quota_not_found": ErrorKind(404, EXIT_NOT_FOUND, "no quota for this user and client"),
    "invalid_time_range": ErrorKind(400, EXIT_USAGE, "from and to must be unix seconds with from < to"),
    "invalid_bucket": ErrorKind(400, EXIT_USAGE, "bucket must be 1m or 1h"),
    "quota_bucket_out_of_retention": ErrorKind(422, EXIT_PREFLIGHT, "the window is older than the bucket's retention"),
    "traffic_too_many_rows": ErrorKind(422, EXIT_PREFLIGHT, "the query would return more than 10000 rows"),
}


def kind_of(code: str) -> ErrorKind:
    """Look up a code; unknown ``validation.*`` and ``conflict.*`` codes get their family row."""
    if code in ERRORS:
        return ERRORS[code]
    if code.startswith("validation."):
        return _VALIDATION
    if code.startswith("conflict."):
        return ErrorKind(409, EXIT_CONFLICT, "conflict")
    return ERRORS["internal"]


class PortunusError(Exception):
    """An error with a stable code, a message naming the bad value, and optional fields."""

    def __init__(self, code: str, message: str | None = None, **fields):
        self.code = code
        self.message = message or kind_of(code).message
        self.fields = fields
        super().__init__(f"{code}: {self.message}")

    @property
    def http_status(self) -> int:
        return kind_of(self.code).http_status

    @property
    def exit_code(self) -> int:
        return kind_of(self.code).exit_code

    def to_json(self) -> dict:
        body = {"code": self.code, "message": self.message}
        body.update(self.fields)
        return {"error": body}

    def cli_line(self) -> str:
        return f"error: {self.code}: {self.message}"
