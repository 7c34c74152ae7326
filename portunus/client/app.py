"""Run the edge agent: build the loop, runtime and agent, handle signals, drain, exit."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .. import __version__
from ..control.agent import Agent
from ..log import log
from ..loop import Loop
from ..relay.context import RelayContext
from ..relay.resolver import Resolver, parse_servers
from ..relay.runtime import RuleRuntime, RuntimeSettings
from ..sysinfo import raise_nofile_limit

# rate-limited warnings (log.limited) get their suppressed=N summary at least this often
LIMITED_FLUSH_INTERVAL = 60.0


@dataclass
class AgentSettings:
    """What the command line sets (defaults as in ``portunus-client --help``)."""
    reconnect_initial_delay_ms: int = 500
    reconnect_max_delay_secs: int = 30
    shutdown_drain_timeout_secs: int = 30
    stats_report_interval_secs: int = 5
    dns_servers: list[str] = field(default_factory=list)   # IP[:PORT]; empty: the system's
    capabilities: list[str] | None = None                   # None: every capability this build has


def dns_servers_from_env(environ=os.environ) -> list[str]:
    """``$PORTUNUS_DNS_SERVERS`` (comma-separated), the fallback when no --dns-server is given."""
    return [x for x in environ.get("PORTUNUS_DNS_SERVERS", "").split(",") if x.strip()]


def capabilities_from_env(environ=os.environ) -> list[str] | None:
    """Test hook: ``$PORTUNUS_CLIENT_CAPABILITIES`` declares fewer capabilities."""
    caps = environ.get("PORTUNUS_CLIENT_CAPABILITIES")
    return [c for c in caps.split(",") if c] if caps is not None else None


def flush_limited_every(loop: Loop, interval: float = LIMITED_FLUSH_INTERVAL) -> None:
    """A flood of rate-limited warnings that stopped still gets its summary line within ``interval``."""
    def flush() -> None:
        log.flush_limited()
        loop.call_later(interval, flush)
    loop.call_later(interval, flush)


def run_agent(bundle: dict, path: str, settings: AgentSettings) -> int:
    """Run until a signal stops it (or the server refuses us for good); the process exit code."""
    servers = parse_servers(settings.dns_servers) if settings.dns_servers else None
    nofile = raise_nofile_limit()
    loop = Loop()
    runtime = RuleRuntime(loop, RuntimeSettings(drain_timeout=float(settings.shutdown_drain_timeout_secs)),
                          RelayContext(loop, Resolver(loop, servers)))
    agent = Agent(loop, bundle, runtime, reconnect_initial=settings.reconnect_initial_delay_ms / 1000,
                  reconnect_max=float(settings.reconnect_max_delay_secs),
                  stats_interval=float(settings.stats_report_interval_secs),
                  capabilities=settings.capabilities)
    log.info("process.start", role="client", version=__version__, bundle=path, client_id=bundle["client_id"],
             client_name=bundle["client_name"], nofile_limit=nofile, pid=os.getpid())

    def drain(signame: str) -> None:
        log.info("process.shutdown", signal=signame, drain_timeout_secs=settings.shutdown_drain_timeout_secs)
        agent.send_stats_now()
        agent.stop()
        runtime.shutdown(loop.stop)

    def force(_signame: str) -> None:
        runtime.abort_all()
        loop.stop()

    loop.add_shutdown_handlers(drain, force)
    flush_limited_every(loop)
    agent.start()
    try:
        loop.run()
    finally:
        log.flush_limited()  # a forced stop skips the drain's flush
        runtime.ctx.close()
        loop.close()
    if agent.exit_code is not None:
        return agent.exit_code
    log.info("process.exit", code=0)
    return 0
