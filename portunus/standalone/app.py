"""Standalone mode: run the data plane from a TOML file, with no server."""

from __future__ import annotations

import json
import os
import signal
import socket

from ..errors import PortunusError
from ..log import log
from ..loop import Loop
from ..relay.context import RelayContext
from ..relay.resolver import Resolver
from ..relay.runtime import RuleRuntime, RuntimeSettings
from ..sysinfo import raise_nofile_limit
from .config import StandaloneConfig

STATS_LOG_INTERVAL = 60.0


class StatsSocket:
    """A Unix socket that answers each connection with one JSON snapshot, then closes."""

    def __init__(self, loop: Loop, path: str, snapshot):
        self.loop = loop
        self.path = path
        self.snapshot = snapshot
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise PortunusError("config_invalid", f"stats socket {path} is in use by another process")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # stale leftover of a dead process
            finally:
                probe.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(path)
        except OSError as exc:
            self.sock.close()
            raise PortunusError("config_invalid", f"cannot create stats socket {path}: {exc.strerror}") from None
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, OSError):
                return
            conn.setblocking(False)
            data = json.dumps(self.snapshot(), separators=(",", ":")).encode() + b"\n"
            self._write(conn, memoryview(data))

    def _write(self, conn: socket.socket, data: memoryview) -> None:
        """Write without ever blocking the loop; a reader that stalls is dropped after 5 s."""
        fd = conn.fileno()
        state = {"left": data}

        def finish() -> None:
            timer.cancel()
            self.loop.forget(fd)
            conn.close()

        def pump() -> None:
            try:
                n = conn.send(state["left"])
            except BlockingIOError:
                n = 0
            except OSError:
                finish()
                return
            state["left"] = state["left"][n:]
            if not state["left"]:
                finish()
            else:
                self.loop.add_writer(fd, pump)
        timer = self.loop.call_later(5.0, finish)
        pump()

    def close(self) -> None:
        self.loop.forget(self.sock.fileno())
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def run(cfg: StandaloneConfig, overrides: dict | None = None) -> int:
    """Run until a signal stops it; ``overrides`` (command-line settings) also apply to every reload."""
    overrides = overrides or {}
    log.configure(fmt=cfg.log_format, level=cfg.log_level)
    nofile = raise_nofile_limit()
    loop = Loop()
    ctx = RelayContext(loop, Resolver(loop, cfg.dns_servers or None))
    runtime = RuleRuntime(loop, RuntimeSettings(udp_max_flows=cfg.udp_max_flows,
                                                udp_flow_idle_secs=cfg.udp_flow_idle_secs,
                                                drain_timeout=cfg.shutdown_drain_secs), ctx)
    from .. import __version__
    log.info("process.start", role="standalone", version=__version__, label=cfg.label, config=cfg.path,
             rules=len(cfg.rules), nofile_limit=nofile, pid=os.getpid())

    _activate_all(loop, runtime, cfg.rules)
    stats_sock = StatsSocket(loop, cfg.stats_socket_path, lambda: _snapshot(cfg, runtime)) \
        if cfg.stats_socket_path else None
    _log_stats_every(loop, runtime, STATS_LOG_INTERVAL)

    state = {"stopping": False}

    def drain(signame: str) -> None:
        state["stopping"] = True
        log.info("process.shutdown", signal=signame, drain_timeout_secs=cfg.shutdown_drain_secs)
        runtime.shutdown(loop.stop)

    def force(signame: str) -> None:
        log.warn("process.shutdown_forced", signal=signame)
        runtime.abort_all()
        loop.stop()

    def reload() -> None:
        if not state["stopping"]:
            _reload(cfg, overrides, runtime)

    loop.add_shutdown_handlers(drain, force)
    loop.add_signal_handler(signal.SIGHUP, reload)
    log.info("process.ready", role="standalone", rules=[s.rule_id for s in runtime.statuses()])
    try:
        loop.run()
    finally:
        log.flush_limited()  # a forced stop skips the drain's flush
        if stats_sock is not None:
            stats_sock.close()
        runtime.ctx.close()
        loop.close()
    log.info("process.exit", code=0)
    return 0


def _activate_all(loop: Loop, runtime: RuleRuntime, rules) -> None:
    """Startup is all or nothing: on the first rule that fails, unbind what was bound and report its port."""
    failed = None
    for rule in rules:
        status = runtime.activate(rule)
        if status.state == "failed":
            failed = status
            break
    if failed is None:
        return
    for rid in list(runtime.rules):
        runtime.remove(rid)
    runtime.ctx.close()
    loop.close()
    raise PortunusError(failed.code if failed.code == "port_in_use" else "activation_failed",
                        f"rule {failed.rule_id!r}: {failed.reason}", rule_id=failed.rule_id, port=failed.port)


def _snapshot(cfg: StandaloneConfig, runtime: RuleRuntime) -> dict:
    """What the stats socket answers: each rule's counters next to what the rule is (`stats` needs no config)."""
    rows = runtime.snapshots(per_port=True, per_target=True)
    for row in rows:
        rule = runtime.rules[row["rule_id"]].rule
        row.update(listen_host=rule.listen_host, listen=rule.listen_label,
                   targets=[t.label() for t in rule.targets], sni_pattern=rule.sni_pattern,
                   caps=rule.rate_limit.to_dict() if rule.rate_limit else None)
    return {"label": cfg.label, "pid": os.getpid(), "rules": rows}


def _log_stats_every(loop: Loop, runtime: RuleRuntime, interval: float) -> None:
    def log_stats() -> None:
        for snap in runtime.snapshots():
            log.info("standalone.rule_stats", rule=snap["rule_id"], protocol=snap["protocol"],
                     bytes_in=snap["bytes_in"], bytes_out=snap["bytes_out"],
                     active_connections=snap["active_connections"], datagrams_in=snap["datagrams_in"],
                     datagrams_out=snap["datagrams_out"], active_flows=snap["active_flows"],
                     flows_dropped_overflow=snap["flows_dropped_overflow"], dns_failures=snap["dns_failures"])
        log.flush_limited()  # rate-limited warnings get their suppressed=N summary with the stats
        loop.call_later(interval, log_stats)
    loop.call_later(interval, log_stats)


def _reload(cfg: StandaloneConfig, overrides: dict, runtime: RuleRuntime) -> None:
    """SIGHUP: re-read the config; unchanged rules keep their listeners and connections."""
    from .config import load
    try:
        new = load(cfg.path)
        for name, value in overrides.items():
            setattr(new, name, value)
    except PortunusError as exc:
        log.error("config.reload_failed", code=exc.code, reason=exc.message, effect="kept the running rules")
        return
    log.configure(fmt=new.log_format, level=new.log_level)
    runtime.settings.udp_max_flows = new.udp_max_flows
    runtime.settings.udp_flow_idle_secs = new.udp_flow_idle_secs
    runtime.settings.drain_timeout = cfg.shutdown_drain_secs = new.shutdown_drain_secs
    before = {rid: live.rule for rid, live in runtime.rules.items()}
    statuses = runtime.apply(new.rules)
    log.info("config.reloaded", config=cfg.path,
             added=[r.rule_id for r in new.rules if r.rule_id not in before],
             changed=[r.rule_id for r in new.rules if r.rule_id in before and before[r.rule_id] != r],
             removed=[rid for rid in before if rid not in statuses],
             failed=[rid for rid, st in statuses.items() if st.state == "failed"])
