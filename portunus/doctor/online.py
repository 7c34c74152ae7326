"""`portunus-server doctor` through the running server: onboarding, clients, rules, DNS, quotas, SNI.

``GET /v1/auth/status`` is public, so the superadmin / onboarding check needs no
token; every other check asks the operator API with PORTUNUS_OPERATOR_TOKEN.
Each call has ``API_TIMEOUT``; ``/v1/metrics`` is fetched once and shared. A
feature that brings a check adds one function to ``ONLINE_CHECKS``. When serve
is not running, the superadmin check reads the state database (``mode=ro``).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..errors import PortunusError
from ..store import clients as store_clients
from ..store import db as store_db
from . import report as r

API_TIMEOUT = 2.0
SNI_STATS_MAX_PORTS = 16  # stats calls for SNI counters: one per shared (client, port), at most this many
SETUP_TOKEN_LINE = "Portunus onboarding setup token:"
ONBOARDING_FIX = (f"open the Web UI and use the setup token serve printed on stderr (`journalctl -u portunus-server "
                  f"-n 100 --no-pager | grep '{SETUP_TOKEN_LINE}'`; valid 30 min, replaced at each start), or stop "
                  "the server and run `portunus-server onboarding-token` for a fresh one; automation: "
                  "`portunus-server bootstrap-superadmin --name NAME` or operator_token in server.toml")
RECOVERY_FIX = ("onboarding closed for good when the first superadmin was created: stop the server and run "
                "`portunus-server reset-password USER --temporary` for a disabled or locked-out superadmin")


def human_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


# ------------------------------------------------------------------ superadmin / onboarding

def public_get(base_url: str, path: str, timeout: float = API_TIMEOUT) -> dict:
    """GET a public route with no credentials at all (auth/status): nothing secret is sent."""
    try:
        with urllib.request.urlopen(urllib.request.Request(base_url.rstrip("/") + path), timeout=timeout) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            err = json.loads(exc.read() or b"{}").get("error") or {}
        except (ValueError, AttributeError, OSError):
            err = {}
        code = err.get("code") if isinstance(err.get("code"), str) else "server_unreachable"
        raise PortunusError(code, f"GET {path}: HTTP {exc.code}: {str(err.get('message') or '')[:200]}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PortunusError("server_unreachable", f"GET {path}: {getattr(exc, 'reason', exc)}") from None


def superadmin_facts(ro_store) -> dict | None:
    """{active_superadmins, onboarding_completed} from the store; None when it has no identity tables yet."""
    if ro_store is None:
        return None
    try:
        conn = ro_store.read()
        active = conn.execute("SELECT COUNT(*) FROM users WHERE role = 'superadmin' AND disabled = 0").fetchone()[0]
        row = conn.execute("SELECT completed_at FROM onboarding_setup WHERE id = 1").fetchone()
    except sqlite3.Error:
        return None
    return {"active_superadmins": int(active), "onboarding_completed": bool(row and row["completed_at"])}


def check_superadmin(status: dict, facts: dict | None) -> r.Check:
    """From the running server's ``GET /v1/auth/status`` (and the store's counts, when readable)."""
    details = {"bootstrap_required": bool(status.get("bootstrap_required")), "server_version": status.get("version")}
    if facts is not None:
        details["active_superadmins"] = facts["active_superadmins"]
    if not status.get("bootstrap_required"):
        return r.ok("server.superadmin", "a superadmin exists: onboarding is closed", details)
    if facts is not None and facts["onboarding_completed"]:
        return r.fail("server.superadmin", "bootstrap_required: no active superadmin, and onboarding is closed for "
                                           "good; every protected route answers 503", RECOVERY_FIX, details)
    return r.fail("server.superadmin", "bootstrap_required: onboarding is open (no superadmin yet); every "
                                       "protected route answers 503 until it completes", ONBOARDING_FIX, details)


def check_superadmin_offline(facts: dict | None, operator_token_set: bool, has_db: bool) -> r.Check:
    """serve is not running: what it will do at its next start, from the store."""
    details = {"operator_token_in_server_toml": operator_token_set}
    if facts is not None:
        details.update(facts)
    if facts is not None and facts["active_superadmins"]:
        return r.ok("server.superadmin", f"{facts['active_superadmins']} active superadmin(s) in the store",
                    details)
    if operator_token_set:
        return r.ok("server.superadmin", "no superadmin yet: serve makes server.toml's operator_token one at start",
                    details)
    if facts is None:
        why = "no state.db yet" if not has_db else "the store predates users (serve migrates it)"
        return r.ok("server.superadmin", f"{why}: serve opens onboarding at start and prints "
                                         f"'{SETUP_TOKEN_LINE} …' on stderr", details)
    if facts["onboarding_completed"]:
        return r.fail("server.superadmin", "no active superadmin, and onboarding is closed for good: serve will "
                                           "answer 503 bootstrap_required", RECOVERY_FIX, details)
    return r.warn("server.superadmin", "no superadmin yet: serve opens onboarding at start (503 "
                                       "bootstrap_required until it completes)", ONBOARDING_FIX, details)


# ------------------------------------------------------------------ operator API (token)

@dataclass
class Online:
    api: object  # cli.api_client.ApiClient
    ro_store: object | None  # server.ReadOnlyStore
    now: float
    _clients: list | None = None
    _rules: list | None = None
    _metrics: str | None = None

    def clients(self) -> list[dict]:
        if self._clients is None:
            _, res = self.api.call("GET", "/v1/clients", timeout=API_TIMEOUT)
            self._clients = res.get("clients", [])
        return self._clients

    def rules(self) -> list[dict]:
        if self._rules is None:
            _, res = self.api.call("GET", "/v1/rules", timeout=API_TIMEOUT)
            self._rules = res.get("rules", [])
        return self._rules

    def metrics(self) -> str:
        if self._metrics is None:
            _, res = self.api.call("GET", "/v1/metrics", timeout=API_TIMEOUT)
            self._metrics = res.get("raw", "") if isinstance(res, dict) else str(res)
        return self._metrics


def check_clients_offline(ctx: Online) -> list[r.Check]:
    clients = ctx.clients()
    seen = {c["client_id"]: c.get("last_seen_at") for c in store_clients.list_clients(ctx.ro_store)} \
        if ctx.ro_store else {}
    offline = {}
    for c in clients:
        if c.get("revoked") or c.get("connected"):
            continue
        last = seen.get(c["client_id"])
        if last:
            ago = ctx.now - store_db.parse_rfc3339(last).timestamp()
            offline[c["client_name"]] = f"last connected {last} ({human_duration(ago)} ago)"
        else:
            offline[c["client_name"]] = "never connected"
    connected = sum(1 for c in clients if c.get("connected"))
    details = {"connected": connected, "offline": offline}
    if offline:
        return [r.warn("clients.offline", f"{len(offline)} client(s) offline, {connected} connected",
                       "run `portunus-client doctor` on each offline edge host (bundle, endpoint, pin, token)",
                       details)]
    return [r.ok("clients.offline", f"all {connected} non-revoked client(s) are connected", details)]


def check_client_capabilities(ctx: Online) -> list[r.Check]:
    from .. import __version__
    from ..control.agent import SUPPORTED_CAPABILITIES
    older = {}
    for c in ctx.clients():
        if not c.get("connected"):
            continue
        missing = [cap for cap in SUPPORTED_CAPABILITIES if cap not in (c.get("capabilities") or [])]
        if missing:
            older[c["client_name"]] = f"version {c.get('client_version') or '?'}, lacks {', '.join(missing)}"
    details = {"server_version": __version__, "server_capabilities": SUPPORTED_CAPABILITIES, "older": older}
    if older:
        return [r.warn("clients.capabilities", f"{len(older)} connected client(s) are older than this server: "
                                               "rules needing the missing features are refused (exit 3)",
                       "upgrade the portunus binary on those edge hosts", details)]
    return [r.ok("clients.capabilities", "every connected client declares this server's capabilities", details)]


def _listen_text(rule: dict) -> str:
    start, end = rule["listen_port"], rule.get("listen_port_end") or rule["listen_port"]
    return f"{rule.get('protocol')} {start}" + (f"-{end}" if end != start else "")


def check_failed_rules(ctx: Online) -> list[r.Check]:
    rules = ctx.rules()
    failed = {rule["rule_id"]: f"{_listen_text(rule)}: {rule.get('reason') or 'failed'}"
              for rule in rules if rule.get("state") == "failed"}
    if failed:
        first = next(iter(failed))
        return [r.fail("rules.failed", f"{len(failed)} failed rule(s) block their ports until removed",
                       f"free the port on the edge host, then `portunus-server remove-rule {first}` and push again "
                       "(no auto-retry)", {"failed": failed})]
    return [r.ok("rules.failed", f"no failed rule among {len(rules)}")]


_DNS_SERIES = re.compile(r'^portunus_rule_dns_failures_total\{([^}]*)\}\s+([0-9.e+]+)', re.M)


def parse_dns_failures(metrics_text: str) -> dict[str, int]:
    """rule id -> dns failures, from the Prometheus text."""
    out = {}
    for labels, value in _DNS_SERIES.findall(metrics_text):
        rule = re.search(r'rule="([^"]*)"', labels)
        if rule and float(value) > 0:
            out[rule.group(1)] = int(float(value))
    return out


def check_dns_failures(ctx: Online) -> list[r.Check]:
    failing = parse_dns_failures(ctx.metrics())
    if failing:
        return [r.warn("rules.dns_failures", f"{len(failing)} rule(s) had target name resolution failures "
                                             "(rule.dns_failed on the client)",
                       "check that the target names resolve from the edge host (`dig @SERVER NAME`) and that its "
                       "resolver answers (`portunus-client doctor`)", {"failures_by_rule": failing})]
    return [r.ok("rules.dns_failures", "no rule reports DNS failures")]




# ------------------------------------------------------------------ metrics text

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)', re.M)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_samples(metrics_text: str, family: str) -> list[tuple[dict, float]] | None:
    """[(labels, value)] of one family in Prometheus text; None when the server does not expose it at all."""
    out = []
    for name, labels, value in _SAMPLE.findall(metrics_text):
        if name != family:
            continue
        try:
            out.append(({k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(labels)},
                        float(value)))
        except ValueError:
            continue
    if not out and f"# TYPE {family} " not in metrics_text:
        return None
    return out


# ------------------------------------------------------------------ traffic quotas

QUOTA_EXHAUSTED = "portunus_traffic_quota_exhausted"


def quota_fix(user: str, client: str) -> str:
    return (f"if the period's budget is legitimately spent, raise it: `portunus-server quota set {user} {client} "
            f"--monthly SIZE` (PUT /v1/users/{user}/quotas/{client} {{\"monthly_bytes\": N}}); to start the period "
            f"over: `portunus-server quota clear {user} {client}` (PATCH … {{\"clear_period_usage\": true}}; a quota "
            "of 0 needs a raise). The client resumes without a reconnect (docs/quotas.md runbook)")


def quotas_from_metrics(ctx: Online) -> list[dict] | None:
    """[{user, client, exhausted, used, limit}] from ``/v1/metrics``; None when the family is absent."""
    text = ctx.metrics()
    flags = metric_samples(text, QUOTA_EXHAUSTED)
    if flags is None:
        return None
    used = {(lb.get("user"), lb.get("client")): int(v)
            for lb, v in metric_samples(text, "portunus_traffic_quota_bytes_used") or []}
    limit = {(lb.get("user"), lb.get("client")): int(v)
             for lb, v in metric_samples(text, "portunus_traffic_quota_bytes_limit") or []}
    out = []
    for labels, value in flags:
        key = (labels.get("user", "?"), labels.get("client", "?"))
        out.append({"user": key[0], "client": key[1], "exhausted": value >= 1, "used": used.get(key, "?"),
                    "limit": limit.get(key, "?")})
    return out


def quotas_from_api(ctx: Online) -> list[dict]:
    """The same from ``GET /v1/users/{u}/quotas`` per user (when the metrics route does not answer)."""
    _, res = ctx.api.call("GET", "/v1/users", timeout=API_TIMEOUT)
    out = []
    deadline = time.monotonic() + API_TIMEOUT
    for user in res.get("users", []):
        if time.monotonic() > deadline:
            break
        _, quotas = ctx.api.call("GET", f"/v1/users/{urllib.parse.quote(user['user_id'], safe='')}/quotas",
                                 timeout=API_TIMEOUT)
        for q in quotas.get("quotas", []):
            out.append({"user": q["user_id"], "client": q.get("client_name") or q["client_id"],
                        "exhausted": bool(q.get("exhausted")), "used": q.get("current_period_bytes_used"),
                        "limit": q.get("monthly_bytes")})
    return out


def check_quotas(ctx: Online) -> list[r.Check]:
    try:
        quotas, source = quotas_from_metrics(ctx), "/v1/metrics"
    except PortunusError:
        quotas = None
    if quotas is None:
        quotas, source = quotas_from_api(ctx), "/v1/users/{u}/quotas"
    offline = {c["client_name"] for c in ctx.clients() if not c.get("connected")}
    exhausted = {}
    for q in quotas:
        if not q["exhausted"]:
            continue
        note = f"{q['used']} of {q['limit']} bytes used this period"
        if q["client"] in offline:
            note += "; the client is offline, so a change waits for its reconnect replay"
        exhausted[f"{q['user']} on {q['client']}"] = note
    if exhausted:
        user, client = next(iter(exhausted)).split(" on ", 1)
        found = r.warn("quotas.exhausted", f"{len(exhausted)} of {len(quotas)} quota(s) exhausted: that user's "
                                           "connections on that client are cut until the period rolls over",
                       quota_fix(user, client), {"exhausted": exhausted, "source": source})
    else:
        found = r.ok("quotas.exhausted", f"none of {len(quotas)} quota(s) is exhausted", {"source": source})
    return [found, check_quota_support(quotas, ctx.clients())]


def check_quota_support(quotas: list[dict], clients: list[dict]) -> r.Check:
    """Quotas on connected clients that do not declare traffic_quota: stored, never sent, not enforced."""
    from ..server.quotas import QUOTA_CAPABILITY
    lacking = {c["client_name"]: c.get("client_version") or "?" for c in clients
               if c.get("connected") and QUOTA_CAPABILITY not in (c.get("capabilities") or [])}
    unenforced = {f"{q['user']} on {q['client']}": f"client version {lacking[q['client']]}"
                  for q in quotas if q["client"] in lacking}
    if unenforced:
        return r.warn("quotas.client_support", f"{len(unenforced)} quota(s) are on clients that do not declare "
                                               f"{QUOTA_CAPABILITY}: the server holds them back "
                                               "(control.updates_not_supported) and traffic there is not capped",
                      "upgrade the portunus binary on those edge hosts; the quotas are sent at their next connect",
                      {"unenforced": unenforced})
    return r.ok("quotas.client_support", f"every connected client with a quota declares {QUOTA_CAPABILITY}")


# ------------------------------------------------------------------ SNI listeners

SNI_COUNTERS = {"parse_failures": "portunus_tls_sni_listener_parse_failures_total",
                "misses": "portunus_tls_sni_listener_miss_total"}
SNI_FIX = ("parse failures: something that is not TLS (plain HTTP, a scanner) connects to that port — see "
           "`tls.parse_failed` in the client's log; misses: a hello named no pattern and the port has no fallback "
           "— see `tls.sni_no_match` / `tls.no_sni` and push a rule for that name, or a plain rule on the port as "
           "the fallback (docs/sni.md). Counts are since the client connected: compare two runs")


def sni_counters_from_metrics(text: str) -> dict[str, dict] | None:
    """'client port N' -> {parse_failures, misses}; None when the server renders no SNI listener family."""
    found: dict[str, dict] = {}
    any_family = False
    for key, family in SNI_COUNTERS.items():
        samples = metric_samples(text, family)
        any_family = any_family or samples is not None
        for labels, value in samples or []:
            found.setdefault(f"{labels.get('client', '?')} port {labels.get('port', '?')}", {})[key] = int(value)
    return found if any_family else None


def sni_counters_from_stats(ctx: Online, sni_rules: list[dict]) -> dict[str, dict] | None:
    """The same from each shared port's rule stats (``sni_listener``), if the server keeps that field."""
    ports = {}
    for rule in sni_rules:
        ports.setdefault(f"{rule.get('client_name') or rule.get('client_id')} port {rule['listen_port']}",
                         rule["rule_id"])
    found, seen_field = {}, False
    deadline = time.monotonic() + API_TIMEOUT
    for label, rule_id in list(ports.items())[:SNI_STATS_MAX_PORTS]:
        if time.monotonic() > deadline:
            break
        _, stats = ctx.api.call("GET", f"/v1/rules/{rule_id}/stats", timeout=API_TIMEOUT)
        listener = stats.get("sni_listener") if isinstance(stats, dict) else None
        if isinstance(listener, dict):
            seen_field = True
            found[label] = {key: int(listener.get(key) or 0) for key in SNI_COUNTERS}
    return found if seen_field else None


def check_sni_listeners(ctx: Online) -> list[r.Check]:
    sni_rules = [rule for rule in ctx.rules() if rule.get("sni_pattern") and rule.get("state") == "active"]
    if not sni_rules:
        return [r.ok("sni.listeners", "no active SNI rule")]
    try:
        counters = sni_counters_from_metrics(ctx.metrics())
    except PortunusError:  # the rule stats below carry the same counters
        counters = None
    if counters is None:
        counters = sni_counters_from_stats(ctx, sni_rules)
    if counters is None:
        return [r.skip("sni.listeners", f"{len(sni_rules)} SNI rule(s), but this server keeps no SNI listener "
                                        "counters yet (docs/sni.md): read them from the client's stats",
                       {"sni_rules": len(sni_rules)})]
    troubled = {port: c for port, c in counters.items() if c.get("parse_failures") or c.get("misses")}
    if troubled:
        return [r.warn("sni.listeners", f"{len(troubled)} SNI port(s) closed connections whose ClientHello did not "
                                        "parse or matched no rule", SNI_FIX, {"by_port": troubled})]
    return [r.ok("sni.listeners", f"{len(counters)} SNI port(s): no parse failures, no misses",
                 {"ports": sorted(counters)})]


# ------------------------------------------------------------------ all of it

ONLINE_CHECKS = (("clients.offline", check_clients_offline), ("clients.capabilities", check_client_capabilities),
                 ("rules.failed", check_failed_rules), ("rules.dns_failures", check_dns_failures),
                 ("quotas.exhausted", check_quotas), ("sni.listeners", check_sni_listeners))
API_FIXES = {
    "unauthenticated": "export the operator token of this server as PORTUNUS_OPERATOR_TOKEN",
    "bootstrap_required": ONBOARDING_FIX,
    "server_busy": ("the API refuses new connections: 256 are open, or serve is within 128 descriptors of its "
                    "fd limit (see limits.nofile); raise LimitNOFILE and look for a client holding connections "
                    "(`ss -tnp`)"),
}


def online_checks(url: str, ro_store, env) -> tuple[Online | None, list[r.Check]]:
    """The running server at ``url``: auth/status without credentials, then the token's checks."""
    from ..cli.api_client import ApiClient
    try:
        checks = [check_superadmin(public_get(url, "/v1/auth/status"), superadmin_facts(ro_store))]
    except PortunusError as exc:
        return None, [r.fail("server.api", f"{exc.code}: {exc.message}", API_FIXES.get(
            exc.code, "check that serve is healthy (its log), and --server / PORTUNUS_SERVER"), {"api": url})]
    if checks[0].details["bootstrap_required"]:
        return None, checks + [r.skip("server.api", "not checked: protected routes answer 503 bootstrap_required "
                                                    "until a superadmin exists", {"api": url})]
    token = env.get("PORTUNUS_OPERATOR_TOKEN")
    if not token:
        return None, checks + [r.skip("server.api", "PORTUNUS_OPERATOR_TOKEN is not set: clients, rules, quotas "
                                                    "and SNI not checked", {"api": url})]
    ctx = Online(ApiClient(url, token), ro_store, time.time())
    try:
        ctx.clients()
    except PortunusError as exc:
        fix = API_FIXES.get(exc.code, "check that serve is healthy (its log), and --server / PORTUNUS_SERVER")
        return None, checks + [r.fail("server.api", f"{exc.code}: {exc.message}", fix, {"api": url})]
    checks.append(r.ok("server.api", f"the operator API at {url} answers", {"api": url}))
    for check_id, fn in ONLINE_CHECKS:
        try:
            checks += fn(ctx)
        except PortunusError as exc:  # the API answered an error: that is the finding
            checks.append(r.fail(check_id, f"the server could not answer this check: {exc.code}: {exc.message}",
                                 API_FIXES.get(exc.code, "look for the error in the server's log around now")))
    return ctx, checks
