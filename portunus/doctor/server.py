"""`portunus-server doctor`: data dir, state database, store lock, certificate, endpoint, running server.

Offline checks read files only: the database through a ``mode=ro`` connection
(safe while ``serve`` runs), the lock's holder from /proc/locks, server.toml's
HTTP settings and the Web UI files of this build (``web``). The checks through
the running server are in ``online``.
"""

from __future__ import annotations

import datetime
import os
import re
import sqlite3
import stat
import urllib.parse
from dataclasses import dataclass

from cryptography import x509

from ..errors import PortunusError
from ..store import clients as store_clients
from ..store import db as store_db
from ..store import settings as store_settings
from . import host
from . import report as r
from . import web
from .online import API_TIMEOUT, Online, check_superadmin_offline, online_checks, superadmin_facts

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


def effective_endpoint(online: Online | None, ro_store, cert_info, env) -> dict:
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


# ------------------------------------------------------------------ this host, for serve

def serve_fd_needs(n_clients: int) -> dict[str, int]:
    """fds of serve beyond its baseline: one per client session, and what the HTTP listeners may hold at their
    caps (docs/server.md "Operator listener limits"), plus the descriptors the API leaves to the control plane."""
    from ..http.app import METRICS_MAX_CONNECTIONS
    from ..http.transport import FD_RESERVE, Limits
    return {"client_sessions": n_clients, "operator_api_connections": Limits().max_connections,
            "metrics_connections": METRICS_MAX_CONNECTIONS, "api_fd_reserve": FD_RESERVE}


def check_api_headroom(limit: int, open_fds: int, pid: int) -> r.Check:
    """The API takes a connection only below its fd ceiling (the limit minus the reserve): else 503 server_busy."""
    from ..http.transport import FD_RESERVE
    ceiling = max(limit - FD_RESERVE, 0)
    details = {"open_fds": open_fds, "limit": limit, "api_fd_ceiling": ceiling, "serve_pid": pid}
    if open_fds >= ceiling:
        return r.fail("limits.api_headroom", f"serve holds {open_fds} fds, at the API's ceiling of {ceiling} (its "
                                             f"limit {limit} minus {FD_RESERVE} kept for the control plane): every "
                                             "new API connection answers 503 server_busy", host.NOFILE_FIX.replace(
                                                 "agent's systemd unit", "server's systemd unit"), details)
    if open_fds >= ceiling * 0.8:
        return r.warn("limits.api_headroom", f"serve holds {open_fds} fds of the API's ceiling of {ceiling}: close "
                                             "to 503 server_busy", host.NOFILE_FIX.replace(
                                                 "agent's systemd unit", "server's systemd unit"), details)
    return r.ok("limits.api_headroom", f"serve holds {open_fds} fds, below the API's ceiling of {ceiling}", details)


def host_checks(cfg, serve_pid: int | None, ro_store) -> list[r.Check]:
    """fds for the client sessions and the HTTP listeners, and serve's own listen ports: capability, range."""
    import resource
    ports = [port for _host, port in (cfg.control_addr, cfg.http_addr, cfg.metrics_addr) if port]
    unpriv = host.read_text(f"{host.PROC}/sys/net/ipv4/ip_unprivileged_port_start")
    port_range = host.parse_port_range(host.read_text(f"{host.PROC}/sys/net/ipv4/ip_local_port_range"))
    clients = [c for c in store_clients.list_clients(ro_store) if not c["revoked"]] if ro_store else []
    who = f"/proc/{serve_pid}" if serve_pid else f"{host.PROC}/self"
    limits = host.parse_proc_limits(host.read_text(f"{who}/limits") or "")
    cap_eff = host.parse_cap_eff(host.read_text(f"{who}/status") or "")
    checks = []
    if serve_pid and limits:
        limit, source = limits[0], f"running serve pid {serve_pid}"
        open_fds = host.count_fds(serve_pid)
        if open_fds is not None:
            checks.append(check_api_headroom(limit, open_fds, serve_pid))
    else:
        limit = host.effective_nofile(*resource.getrlimit(resource.RLIMIT_NOFILE))
        source = "this shell's hard limit (serve raises its soft limit to it)"
    return [host.check_nofile(limit, serve_fd_needs(len(clients)), source), *checks,
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


def running_server(args, serve_pid: int | None) -> tuple[str | None, r.Check | None]:
    """(API URL, None) of the server to ask, or (None, the skip saying why there is none)."""
    from ..cli.api_client import operator_api_url
    url = operator_api_url(args)
    if url is None:
        why = "serve is not running" if serve_pid is None else "serve runs but wrote no serve.json"
        return None, r.skip("server.api", f"{why}: clients, rules, quotas and SNI not checked")
    return url, None


def run_checks(args, env=os.environ) -> list[r.Check]:
    data_dir = os.path.abspath(args.data_dir)
    cfg, checks = datadir_checks(data_dir, env)
    db_path = os.path.join(data_dir, store_db.DB_NAME)
    conn, db_results = database_checks(db_path)
    checks += db_results
    ro_store = ReadOnlyStore(conn) if conn is not None else None
    try:
        serve_pid, lock = check_lock(data_dir)
        checks.append(lock)
        url, no_server = running_server(args, serve_pid)
        if url is not None:
            online, online_results = online_checks(url, ro_store, env)
        else:
            online, online_results = None, [check_superadmin_offline(
                superadmin_facts(ro_store), bool(cfg and cfg.values.get("operator_token")),
                os.path.exists(db_path)), no_server]
        if cfg is not None:
            checks += cert_checks(cfg, online, ro_store, env)
            checks += host_checks(cfg, serve_pid, ro_store)
            checks.append(web.check_public_origin(cfg.values.get("operator_http_public_origin"),
                                                  web.listen_address(cfg.http_addr, url)))
        checks.append(web.check_webui_files())
        return checks + online_results
    finally:
        if conn is not None:
            conn.close()
