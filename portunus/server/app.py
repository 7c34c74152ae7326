"""`portunus-server serve`: wire the store, TLS, the control hub, the API and metrics."""

from __future__ import annotations

import json
import os
import sys
import threading

from .. import __version__
from ..control.enrollment import seed_san_hosts
from ..control.hub import Hub
from ..control.tls import ensure_server_cert, server_context
from ..errors import PortunusError
from ..log import log
from ..loop import Loop
from ..store import operators as store_operators
from ..store.db import Store
from ..sysinfo import raise_nofile_limit
from . import config as server_config
from .client_registry import StoreClientRegistry
from . import passwords
from .core import ServerCore, validate_seed_endpoint
from .identity import IdentityService
from .runtime_info import RUNTIME_FILE, read_runtime_info, runtime_info_path  # noqa: F401 -- re-exported
from .owner_caps import attach_owner_caps
from .traffic import start_traffic_services



def serve(data_dir: str, *, advertised_endpoint: str | None = None, ready_event: threading.Event | None = None) -> int:
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    cfg = server_config.load(data_dir)
    log.configure(fmt="json" if cfg.log_format == "json" else "pretty")
    raise_nofile_limit()
    store = Store.open(data_dir)
    cert, seed, seed_error = _certificate_and_seed(cfg, advertised_endpoint)
    if not store_operators.ensure_legacy_operator(store, cfg.operator_token) and cfg.operator_token:
        log.warn("startup.operator_token_ignored",
                 reason="another superadmin exists; operator_token only bootstraps a store without one")
    identity = IdentityService(store)
    setup_token = _start_onboarding(identity)
    passwords.start_hash_workers()  # Argon2 off this process's GIL: a login flood must not stall the loop

    loop = Loop()
    hub = Hub(loop, server_context(cert), StoreClientRegistry(store), cfg)
    control_host, control_port = hub.listen(*cfg.control_addr)
    core = ServerCore(cfg, store, hub, cert, advertised_seed=seed, seed_error=seed_error)
    hub.stats_sink = core.stats.update
    traffic = start_traffic_services(store, hub, core)  # quotas, accounting, housekeeping (SPEC §4.4)
    attach_owner_caps(store, hub, core)  # owner-cap routes, pushes and replay before quotas and rules

    http_srv, metrics_srv = _start_http(cfg, core, store, identity)
    http_host, http_port = http_srv.server_address[:2]
    m_host, m_port = metrics_srv.server_address[:2]
    info = {
        "pid": os.getpid(),
        "version": __version__,
        "control_listen": f"{control_host}:{control_port}",
        "operator_http_url": f"http://{_url_host(http_host)}:{http_port}",
        "metrics_url": f"http://{_url_host(m_host)}:{m_port}/metrics",
        "server_cert_sha256": cert.fingerprint,
    }

    def stop(signame: str) -> None:
        log.info("process.shutdown", signal=signame)
        http_srv.stopping = True
        threading.Thread(target=http_srv.shutdown, daemon=True).start()
        threading.Thread(target=metrics_srv.shutdown, daemon=True).start()
        hub.close()
        loop.call_later(0.2, loop.stop)

    loop.add_shutdown_handlers(stop, lambda _signame: loop.stop())
    _write_runtime_info(data_dir, info)
    _announce_ready(core, info, setup_token)
    if ready_event is not None:
        ready_event.set()
    try:
        loop.run()
    finally:
        try:
            os.unlink(runtime_info_path(data_dir))
        except OSError:
            pass
        http_srv.server_close()
        metrics_srv.server_close()
        traffic.stop()  # applies the reports still queued before the store closes
        loop.close()
        passwords.stop_hash_workers()
        store.close()
    log.info("process.exit", code=0)
    return 0


def _certificate_and_seed(cfg, advertised_endpoint: str | None) -> tuple:
    """The server certificate (created on first start) and the tier-2 seed endpoint, or why it was refused."""
    seed = advertised_endpoint or os.environ.get("PORTUNUS_ADVERTISED_ENDPOINT") or None
    cert = ensure_server_cert(cfg.cert_path, cfg.key_path, extra_hosts=seed_san_hosts(seed))
    seed_error = None
    if seed:
        try:
            seed = validate_seed_endpoint(seed, cert)
        except PortunusError as exc:
            # fail closed: enrollments are refused until the seed is fixed, never sent to a wrong host;
            # reported once, by _announce_ready, with whatever else decides the endpoint
            seed_error, seed = exc, None
    return cert, seed, seed_error


def _start_http(cfg, core: ServerCore, store: Store, identity: IdentityService) -> tuple:
    """The operator API and the metrics listener, each served on its own accept thread."""
    from ..http.app import OperatorAPI, make_metrics_server, make_server, serve_in_thread
    api = OperatorAPI(core, store, public_origin=cfg.values.get("operator_http_public_origin"), identity=identity)
    http_srv = make_server(*cfg.http_addr, api)
    metrics_srv = make_metrics_server(*cfg.metrics_addr, core)
    serve_in_thread(http_srv, "portunus-http")
    serve_in_thread(metrics_srv, "portunus-metrics")
    return http_srv, metrics_srv


def _write_runtime_info(data_dir: str, info: dict) -> None:
    """serve.json, written whole (rename), so the CLI and doctor never read half of it."""
    tmp = runtime_info_path(data_dir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, runtime_info_path(data_dir))


def _announce_ready(core: ServerCore, info: dict, setup_token: str | None) -> None:
    endpoint = core.advertised_endpoint_info()
    if endpoint["effective"] is None:
        log.error("startup.advertised_endpoint_invalid", source=endpoint["source"], code=endpoint["error"].code,
                  reason=endpoint["diagnostic"], effect="enrollment creation is refused until this is fixed")
    if setup_token:
        # the one place the setup token is shown (never in a log line): stderr, for the operator at the console
        print(f"Portunus onboarding setup token: {setup_token}", file=sys.stderr, flush=True)
    log.info("server.ready", **info, advertised_endpoint=endpoint["effective"],
             advertised_endpoint_source=endpoint["source"])


def _start_onboarding(identity: IdentityService) -> str | None:
    """While no active superadmin exists: this start's setup token for stderr (SPEC §5), else None."""
    if not identity.bootstrap_required():
        return None
    token = identity.start_onboarding()
    if token is not None:
        how = "the setup token printed on stderr ('Portunus onboarding setup token: …', valid 30 min)"
    elif identity.onboarding_open():  # a token from `onboarding-token` is still valid: the operator has it
        how = f"the token `portunus-server onboarding-token` printed (valid until " \
              f"{identity.cli_setup_token_expires_at()})"
    else:  # onboarding completed once and closed for good; a superadmin must be recovered, not created
        log.warn("startup.no_superadmin", hint="no active superadmin, and onboarding closed for good: stop the "
                                               "server and run `portunus-server reset-password USER --temporary`")
        return None
    log.warn("startup.no_superadmin",
             hint=f"onboarding: use {how} in the Web UI or POST /v1/auth/onboarding; or stop the server and run "
                  f"`portunus-server bootstrap-superadmin --name NAME`, or set operator_token in server.toml; "
                  f"until then /v1 answers 503 bootstrap_required")
    return token


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
