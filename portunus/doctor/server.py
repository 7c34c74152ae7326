"""`portunus-server doctor`: data dir, state database, store lock, certificate, endpoint, running server.

Offline checks read files only: the database through a ``mode=ro`` connection
(safe while ``serve`` runs), the lock's holder from /proc/locks. Online checks
ask the running server's API with PORTUNUS_OPERATOR_TOKEN. A feature that brings
a check (superadmin onboarding, quotas) adds one function to ``ONLINE_CHECKS``.
"""

from __future__ import annotations

import datetime
import os
import re
import sqlite3
import stat
import time
import urllib.parse
from dataclasses import dataclass

from cryptography import x509

from ..errors import PortunusError
from ..store import clients as store_clients
from ..store import db as store_db
from ..store import settings as store_settings
from . import host
from . import report as r

API_TIMEOUT = 2.0
FREE_FAIL_BYTES = 64 << 20
FREE_WARN_BYTES = 512 << 20
CERT_WARN_DAYS = 30
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ReadOnlyStore:
    """Just enough of ``Store`` for the aggregates' read functions, over a ``mode=ro`` connection."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def read(self) -> sqlite3.Connection:
        return self._conn


def open_readonly(db_path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{urllib.parse.quote(db_path)}?mode=ro", uri=True, timeout=API_TIMEOUT,
                           isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def human_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


# ------------------------------------------------------------------ data dir

def check_filesystem(data_dir: str, env) -> r.Check:
    probe = store_db._nearest_existing(data_dir)
    try:
        name = store_db.unsupported_filesystem(store_db.filesystem_magic(probe))
    except OSError as exc:
        return r.fail("datadir.filesystem", f"cannot inspect the filesystem of {probe}: {exc.strerror}", None)
    details = {"path": probe, "filesystem": name or "local"}
    if name is None:
        return r.ok("datadir.filesystem", f"{probe} is on a supported filesystem", details)
    fix = "move --data-dir to a local writable disk filesystem (not NFS, tmpfs or ramfs)"
    if env.get(store_db.ALLOW_ANY_FS_ENV) == "1":
        return r.warn("datadir.filesystem", f"{probe} is on {name}, allowed only by {store_db.ALLOW_ANY_FS_ENV}=1",
                      fix, details)
    return r.fail("datadir.filesystem", f"startup.unsupported_filesystem: {probe} is on {name}; serve refuses "
                                        "to start", fix, details)


def check_permissions(data_dir: str) -> r.Check:
    if not os.path.exists(data_dir):
        return r.warn("datadir.permissions", f"{data_dir} does not exist yet (serve creates it 0700)",
                      "pass the data dir serve uses (--data-dir / PORTUNUS_DATA_DIR) if this is not it")
    st = os.stat(data_dir)
    mode = stat.S_IMODE(st.st_mode)
    details = {"path": data_dir, "mode": f"{mode:04o}", "owner_uid": st.st_uid}
    if not stat.S_ISDIR(st.st_mode):
        return r.fail("datadir.permissions", f"{data_dir} is not a directory", None, details)
    if not os.access(data_dir, os.W_OK | os.X_OK):
        return r.fail("datadir.permissions", f"{data_dir} is not writable by uid {os.geteuid()}",
                      f"chown the data dir to the user serve runs as (chown -R portunus-server {data_dir})",
                      details)
    if mode & 0o077:
        return r.warn("datadir.permissions", f"{data_dir} is mode {mode:04o}: others may read the state",
                      f"chmod 700 {data_dir}", details)
    return r.ok("datadir.permissions", f"{data_dir} is mode {mode:04o} and writable", details)


def check_free_space(data_dir: str) -> r.Check:
    probe = store_db._nearest_existing(data_dir)
    vfs = os.statvfs(probe)
    free = vfs.f_bavail * vfs.f_frsize
    details = {"path": probe, "free_bytes": free, "free": f"{free / (1 << 20):.0f} MiB"}
    fix = "free disk space on that filesystem (the WAL and backups grow there)"
    if free < FREE_FAIL_BYTES:
        return r.fail("datadir.free_space", f"only {free >> 20} MiB free: writes will fail", fix, details)
    if free < FREE_WARN_BYTES:
        return r.warn("datadir.free_space", f"{free >> 20} MiB free", fix, details)
    return r.ok("datadir.free_space", f"{free >> 30} GiB free" if free >= 1 << 30 else f"{free >> 20} MiB free",
                details)


# ------------------------------------------------------------------ state database

def check_integrity(conn: sqlite3.Connection, db_path: str) -> r.Check:
    try:
        rows = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.Error as exc:
        return r.fail("store.integrity", f"cannot read {db_path}: {exc}",
                      "restore the latest backup (`portunus-server restore --in FILE --force`, server stopped)",
                      {"path": db_path})
    if rows == ["ok"]:
        return r.ok("store.integrity", "PRAGMA quick_check: ok", {"path": db_path})
    return r.fail("store.integrity", f"PRAGMA quick_check found {len(rows)} problem(s)",
                  "stop serve and restore the latest backup (`portunus-server restore --in FILE --force`)",
                  {"path": db_path, "first_problems": rows[:5]})


def check_schema(conn: sqlite3.Connection) -> r.Check:
    known = store_db.load_migrations()[-1].version
    try:
        current = int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])
    except sqlite3.Error:
        current = 0
    details = {"schema_version": current, "binary_knows": known}
    if current > known:
        return r.fail("store.schema", f"startup.schema_version_too_new: schema {current} is newer than this "
                                      f"binary (knows up to {known}); serve exits 78",
                      "run the newer Portunus binary, or restore a backup made by this version", details)
    if current < known:
        return r.ok("store.schema", f"schema {current}; serve migrates it to {known} at its next start", details)
    return r.ok("store.schema", f"schema {current}, as this binary expects", details)


def check_lock(data_dir: str) -> tuple[int | None, r.Check]:
    """(pid of a running serve, check): who holds state.db.lock, read from /proc/locks (never taken)."""
    lock_path = os.path.join(data_dir, store_db.LOCK_NAME)
    if not os.path.exists(lock_path):
        return None, r.warn("store.lock", "no serve has run on this data dir yet (no lock file)",
                            "start the server: systemctl start portunus-server (or portunus-server serve)")
    holders = host.lock_holders(lock_path)
    if holders is None:  # no /proc/locks: the pid serve wrote, if that process lives
        text = host.read_text(lock_path) or ""
        holders = [int(text)] if text.strip().isdigit() and host.pid_alive(int(text)) else []
    holders = sorted(set(holders))
    if not holders:
        return None, r.warn("store.lock", "serve is not running on this data dir (the store lock is free)",
                            "start the server: systemctl start portunus-server (or portunus-server serve)",
                            {"lock_file": lock_path})
    pid = holders[0]
    cmdline = host.process_cmdline(pid)
    details = {"pid": pid, "command": cmdline or "-"}
    if re.search(r"\bserve\b", cmdline) or not cmdline:
        return pid, r.ok("store.lock", f"serve is running (pid {pid}) and holds the store", details)
    return None, r.warn("store.lock", f"pid {pid} holds the store, and it is not serve: serve would exit 75 "
                                      "(startup.store_in_use)",
                        "let that offline command finish, or stop it; only one process may open a data dir",
                        details)


# ------------------------------------------------------------------ certificate

@dataclass
class CertFacts:
    info: object  # tls.CertInfo
    leaf: x509.Certificate


def load_cert(cert_path: str, key_path: str) -> tuple[CertFacts | None, list[r.Check]]:
    from ..control import tls
    cert_exists, key_exists = os.path.exists(cert_path), os.path.exists(key_path)
    paths = {"cert": cert_path, "key": key_path}
    if not cert_exists and not key_exists:
        return None, [r.ok("cert.files", "no certificate yet: serve generates a self-signed pair at first start",
                           paths)]
    if cert_exists != key_exists:
        missing = key_path if cert_exists else cert_path
        return None, [r.fail("cert.files", f"startup.tls_files_incomplete: {missing} is missing",
                             f"restore {missing}, or remove the other file to generate a new pair (every client "
                             "must then re-enroll)", paths)]
    checks = []
    mode = stat.S_IMODE(os.stat(key_path).st_mode)
    if mode & 0o077:
        checks.append(r.fail("cert.key_mode", f"startup.tls_key_permissions: {key_path} is mode {mode:04o}; serve "
                                              "refuses a key open to group or others", f"chmod 600 {key_path}",
                             {"path": key_path, "mode": f"{mode:04o}"}))
    else:
        checks.append(r.ok("cert.key_mode", f"key is mode {mode:04o}", {"path": key_path}))
    try:
        with open(cert_path, "rb") as f:
            leaf = x509.load_pem_x509_certificates(f.read())[0]
        info = tls._load_pair(cert_path, key_path) if not mode & 0o077 else _info_without_key(tls, leaf, paths)
    except (PortunusError, ValueError, OSError) as exc:
        message = exc.message if isinstance(exc, PortunusError) else str(exc)
        return None, checks + [r.fail("cert.files", f"startup.tls_invalid: {message}",
                                      "the cert or key is not PEM, the key is encrypted, or they do not match",
                                      paths)]
    return CertFacts(info, leaf), checks


def _info_without_key(tls, leaf: x509.Certificate, paths: dict):
    from cryptography.hazmat.primitives import serialization
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = list(san.get_values_for_type(x509.DNSName))
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns_names, ips = [], []
    return tls.CertInfo(paths["cert"], paths["key"], tls.fingerprint_der(leaf.public_bytes(serialization.Encoding.DER)),
                        dns_names, ips)


def check_expiry(leaf: x509.Certificate, now: datetime.datetime) -> r.Check:
    not_after = leaf.not_valid_after_utc
    not_before = leaf.not_valid_before_utc
    details = {"not_before": not_before.isoformat(), "not_after": not_after.isoformat()}
    fix = ("issue a new certificate with the same SANs; clients pin the leaf, so after replacing it run "
           "`reenroll-client` for each client")
    if now < not_before:
        return r.fail("cert.expiry", f"the certificate is not valid before {not_before:%Y-%m-%d %H:%M}Z "
                                     "(check this host's clock)", fix, details)
    days = (not_after - now).total_seconds() / 86400
    if days < 0:
        return r.fail("cert.expiry", f"the certificate expired on {not_after:%Y-%m-%d}", fix, details)
    if days < CERT_WARN_DAYS:
        return r.warn("cert.expiry", f"the certificate expires in {days:.0f} day(s), on {not_after:%Y-%m-%d}",
                      fix, details)
    return r.ok("cert.expiry", f"valid until {not_after:%Y-%m-%d} ({days:.0f} days)", details)


def effective_endpoint(online: "Online | None", ro_store, cert_info, env) -> dict:
    """{effective, source, diagnostic}: the running server's answer, else the same tiers computed offline."""
    if online is not None:
        try:
            _, info = online.api.call("GET", "/v1/settings/advertised-endpoint", timeout=API_TIMEOUT)
            return info
        except PortunusError:
            pass
    from ..server.core import ADVERTISED_OVERRIDE_KEY, validate_seed_endpoint
    override = store_settings.get_setting(ro_store, ADVERTISED_OVERRIDE_KEY) if ro_store else None
    seed = env.get("PORTUNUS_ADVERTISED_ENDPOINT")
    for source, value in (("override", override), ("seed", seed)):
        if value:
            try:
                return {"effective": validate_seed_endpoint(value, cert_info), "source": source, "diagnostic": None}
            except PortunusError as exc:
                return {"effective": None, "source": source, "diagnostic": f"{exc.code}: {exc.message}"}
    return {"effective": None, "source": "loopback", "diagnostic": "no override and no seed"}


def check_endpoint(endpoint: dict, cert_info, control_port: int | None) -> r.Check:
    from ..control.tls import san_covers
    sans = list(cert_info.sans_dns) + list(cert_info.sans_ip)
    effective, source = endpoint.get("effective"), endpoint.get("source")
    details = {"effective": effective, "source": source, "cert_sans": sans}
    if effective is None and source in ("override", "seed"):
        details["diagnostic"] = endpoint.get("diagnostic")
        return r.fail("cert.endpoint_san", f"the advertised endpoint ({source}) is refused: "
                                           f"{endpoint.get('diagnostic')}; enrollments fail closed",
                      "set an override / PORTUNUS_ADVERTISED_ENDPOINT whose host the certificate SAN covers, or "
                      "reissue the certificate with that host (endpoint_not_in_cert_san), then restart", details)
    host_part, _, port_part = (effective or "").rpartition(":")
    control_port = port_part or control_port
    if source in ("loopback", "request_host") and (not effective or host_part in LOOPBACK_HOSTS):
        return r.warn("cert.endpoint_san", f"no override or seed: bundles would point at 127.0.0.1:"
                                           f"{control_port or '<control port>'}, which a remote client cannot reach",
                      "set PORTUNUS_ADVERTISED_ENDPOINT (or an override: PUT /v1/settings/advertised-endpoint) "
                      "to a SAN-covered public host:port, then recreate the affected enrollments", details)
    if not san_covers(cert_info, host_part):
        return r.fail("cert.endpoint_san", f"endpoint_not_in_cert_san: {host_part!r} is not covered by the "
                                           "certificate SAN", "reissue the certificate with that host, or "
                                                              "correct the endpoint", details)
    return r.ok("cert.endpoint_san", f"advertised endpoint {effective} ({source}) is covered by the SAN", details)


# ------------------------------------------------------------------ through the running server

@dataclass
class Online:
    api: object  # cli.server.ApiClient
    ro_store: ReadOnlyStore | None
    now: float
    _clients: list | None = None

    def clients(self) -> list[dict]:
        if self._clients is None:
            _, res = self.api.call("GET", "/v1/clients", timeout=API_TIMEOUT)
            self._clients = res.get("clients", [])
        return self._clients


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
    _, res = ctx.api.call("GET", "/v1/rules", timeout=API_TIMEOUT)
    rules = res.get("rules", [])
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
    _, res = ctx.api.call("GET", "/v1/metrics", timeout=API_TIMEOUT)
    text = res.get("raw", "") if isinstance(res, dict) else str(res)
    failing = parse_dns_failures(text)
    if failing:
        return [r.warn("rules.dns_failures", f"{len(failing)} rule(s) had target name resolution failures "
                                             "(rule.dns_failed on the client)",
                       "check that the target names resolve from the edge host (`dig @SERVER NAME`) and that its "
                       "resolver answers (`portunus-client doctor`)", {"failures_by_rule": failing})]
    return [r.ok("rules.dns_failures", "no rule reports DNS failures")]


ONLINE_CHECKS = (check_clients_offline, check_client_capabilities, check_failed_rules, check_dns_failures)


def online_checks(args, serve_pid: int | None, ro_store, env) -> tuple[Online | None, list[r.Check]]:
    from ..cli.server import ApiClient, _api_url
    url = _api_url(args)
    if url is None:
        why = "serve is not running" if serve_pid is None else "serve runs but wrote no serve.json"
        return None, [r.skip("server.api", f"{why}: clients and rules not checked")]
    token = env.get("PORTUNUS_OPERATOR_TOKEN")
    if not token:
        return None, [r.skip("server.api", "PORTUNUS_OPERATOR_TOKEN is not set: clients and rules not checked",
                             {"api": url})]
    ctx = Online(ApiClient(url, token), ro_store, time.time())
    try:
        ctx.clients()
    except PortunusError as exc:
        fix = {"unauthenticated": "export the operator token of this server as PORTUNUS_OPERATOR_TOKEN",
               "bootstrap_required": "stop the server and run `portunus-server bootstrap-superadmin --name NAME`, "
                                     "or set operator_token in server.toml, then start it"}.get(
            exc.code, "check that serve is healthy (its log), and --server / PORTUNUS_SERVER")
        return None, [r.fail("server.api", f"{exc.code}: {exc.message}", fix, {"api": url})]
    checks = [r.ok("server.api", f"the operator API at {url} answers", {"api": url})]
    for fn in ONLINE_CHECKS:
        try:
            checks += fn(ctx)
        except PortunusError as exc:
            checks.append(r.fail(f"server.{fn.__name__.removeprefix('check_')}", f"{exc.code}: {exc.message}",
                                 None))
    return ctx, checks


# ------------------------------------------------------------------ this host, for serve

HTTP_FD_ALLOWANCE = 32  # operator API and metrics connections served at once, each one fd (plus sqlite's)


def host_checks(cfg, serve_pid: int | None, ro_store) -> list[r.Check]:
    """fds for the client sessions, and serve's own listen ports: capability and ephemeral range."""
    import resource
    ports = [port for _host, port in (cfg.control_addr, cfg.http_addr, cfg.metrics_addr) if port]
    unpriv = host.read_text(f"{host.PROC}/sys/net/ipv4/ip_unprivileged_port_start")
    port_range = host.parse_port_range(host.read_text(f"{host.PROC}/sys/net/ipv4/ip_local_port_range"))
    clients = [c for c in store_clients.list_clients(ro_store) if not c["revoked"]] if ro_store else []
    needs = {"client_sessions": len(clients), "operator_api_and_metrics": HTTP_FD_ALLOWANCE}
    who = f"/proc/{serve_pid}" if serve_pid else f"{host.PROC}/self"
    limits = host.parse_proc_limits(host.read_text(f"{who}/limits") or "")
    cap_eff = host.parse_cap_eff(host.read_text(f"{who}/status") or "")
    if serve_pid and limits:
        limit, source = limits[0], f"running serve pid {serve_pid}"
    else:
        limit = host.effective_nofile(*resource.getrlimit(resource.RLIMIT_NOFILE))
        source = "this shell's hard limit (serve raises its soft limit to it)"
    return [host.check_nofile(limit, needs, source),
            host.check_privileged_ports(ports, cap_eff, int(unpriv) if unpriv and unpriv.strip().isdigit() else None,
                                        f"serve (pid {serve_pid})" if serve_pid else "this user"),
            host.check_ephemeral_ports(ports, port_range)]


# ------------------------------------------------------------------ all of it

def datadir_checks(data_dir: str, env) -> tuple[object, list[r.Check]]:
    """(config or None, checks) for the directory itself and server.toml."""
    from ..server import config as server_config
    checks = [check_filesystem(data_dir, env), check_permissions(data_dir)]
    if os.path.exists(data_dir):
        checks.append(check_free_space(data_dir))
    try:
        return server_config.load(data_dir), checks
    except PortunusError as exc:
        return None, checks + [r.fail("datadir.config", f"{exc.code}: {exc.message}",
                                      "fix the named key (server.toml.example)")]


def database_checks(db_path: str) -> tuple[sqlite3.Connection | None, list[r.Check]]:
    if not os.path.exists(db_path):
        return None, [r.ok("store.integrity", "no state.db yet: serve creates it at first start")]
    try:
        conn = open_readonly(db_path)
        return conn, [check_integrity(conn, db_path), check_schema(conn)]
    except sqlite3.Error as exc:
        return None, [r.fail("store.integrity", f"cannot open {db_path} read-only: {exc}",
                             "check the file's owner and mode; restore the latest backup if it is damaged")]


def cert_checks(cfg, online: Online | None, ro_store, env) -> list[r.Check]:
    facts, checks = load_cert(cfg.cert_path, cfg.key_path)
    if facts is None:
        return checks
    checks.append(check_expiry(facts.leaf, datetime.datetime.now(datetime.timezone.utc)))
    endpoint = effective_endpoint(online, ro_store, facts.info, env)
    return checks + [check_endpoint(endpoint, facts.info, cfg.control_addr[1] or None)]


def run_checks(args, env=os.environ) -> list[r.Check]:
    data_dir = os.path.abspath(args.data_dir)
    cfg, checks = datadir_checks(data_dir, env)
    conn, db_results = database_checks(os.path.join(data_dir, store_db.DB_NAME))
    checks += db_results
    ro_store = ReadOnlyStore(conn) if conn is not None else None
    try:
        serve_pid, lock = check_lock(data_dir)
        checks.append(lock)
        online, online_results = online_checks(args, serve_pid, ro_store, env)
        if cfg is not None:
            checks += cert_checks(cfg, online, ro_store, env)
            checks += host_checks(cfg, serve_pid, ro_store)
        return checks + online_results
    finally:
        if conn is not None:
            conn.close()
