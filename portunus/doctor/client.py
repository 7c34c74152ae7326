"""`portunus-client doctor`: the edge host's checks (bundle, endpoint, pin, token, fds, splice, ports, DNS,
the capabilities the replayed rules need).

The token check is the agent's own hello, sent only after the TLS leaf matched
the pin. When an agent on this host already holds a connection to the server,
that check is answered by the connection itself and no hello is sent, so the
running agent's session is never replaced.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import time
from dataclasses import dataclass, field

from .. import __version__
from ..control import enrollment
from ..control import messages as m
from ..control.frames import FrameDecoder, FrameError, encode
from ..control.tls import client_context, fingerprint_der, pins_match
from ..errors import PortunusError
from ..model import Rule, is_ip_literal
from ..relay import dns
from . import host
from . import report as r

STEP_TIMEOUT = 1.5   # each network step: resolve, connect, handshake, hello answer
DNS_TIMEOUT = 1.0
PIN_FIX = ("generate a fresh enrollment command (`portunus-server reenroll-client NAME`) and run it here, or "
           "restore the original server.crt + server.key on the server")
CONNECT_FIX = ("check that control_listen on the server matches the bundle's server_endpoint, and that no "
               "firewall / security group / NAT drops TCP to that port")


@dataclass
class AgentProcess:
    """An agent on this host with an established connection to the bundle's server."""
    pid: int
    open_fds: int
    nofile: tuple[int, int] | None
    cap_eff: int | None
    listen_ports: dict[str, list[int]]  # protocol -> ports
    environ: dict[str, str] | None = None  # None when /proc/PID/environ is not readable
    dns_servers: list[str] = field(default_factory=list)  # its --dns-server arguments


@dataclass
class Session:
    """What the endpoint checks learned: addresses, the rules replayed after a hello, a running agent."""
    addrs: list[str] = field(default_factory=list)
    rules: list[Rule] | None = None
    udp_max_flows: int | None = None
    agent: AgentProcess | None = None
    unreadable: dict[str, str] = field(default_factory=dict)  # rule id -> why this build cannot read it
    capabilities: list[str] = field(default_factory=list)  # what this build's hello declared


# ------------------------------------------------------------------ bundle

def check_bundle_lookup(explicit: str | None, env) -> tuple[str | None, r.Check]:
    tried = [explicit] if explicit else enrollment.bundle_search_paths(env)
    states = {p: ("found" if os.path.isfile(p) else ("not a file" if os.path.exists(p) else "missing"))
              for p in tried}
    try:
        path = enrollment.find_bundle(explicit, env)
    except PortunusError as exc:
        return None, r.fail("bundle.lookup", f"bundle_not_found: {exc.message}",
                            "pass --bundle PATH or set PORTUNUS_CLIENT_BUNDLE; enroll first with "
                            "`portunus-client enroll '<uri>'` if this host never was", {"tried": states})
    return path, r.ok("bundle.lookup", f"bundle found at {path}", {"tried": states})


def check_bundle_file(path: str) -> tuple[dict | None, list[r.Check]]:
    try:
        bundle = enrollment.read_bundle(path)
    except PortunusError as exc:
        return None, [r.fail("bundle.parse", f"{exc.code}: {exc.message}",
                             "re-enroll this host (`portunus-server reenroll-client NAME` on the server, "
                             "then run the printed command here)", {"path": path})]
    details = {"client_id": bundle["client_id"], "client_name": bundle["client_name"],
               "server_endpoint": bundle["server_endpoint"], "server_cert_sha256": bundle["server_cert_sha256"]}
    checks = [r.ok("bundle.parse", "bundle parses (token present, not shown)", details)]
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    mode_details = {"path": path, "mode": f"{mode:04o}", "owner_uid": st.st_uid}
    if mode & 0o077:
        checks.append(r.warn("bundle.mode", f"bundle is mode {mode:04o}: group/others can read the token",
                             f"chmod 600 {path}", mode_details))
    else:
        checks.append(r.ok("bundle.mode", f"bundle is mode {mode:04o}", mode_details))
    return bundle, checks


# ------------------------------------------------------------------ endpoint, pin, token

def resolve_endpoint(hostname: str, servers: list[tuple[str, int]] | None) -> tuple[list[str], str | None]:
    """Resolve as the agent does (IP literal, /etc/hosts, its DNS servers), within STEP_TIMEOUT."""
    from ..loop import Loop
    from ..relay.resolver import Resolver
    loop = Loop()
    resolver = Resolver(loop, servers)
    out: dict = {}
    try:
        resolver.resolve(hostname, False, lambda addrs, err: out.update(addrs=addrs, err=err))
        loop.run_until(lambda: bool(out), STEP_TIMEOUT)
    finally:
        resolver.close()
        loop.close()
    if not out:
        return [], f"no answer within {STEP_TIMEOUT:g} s"
    return [ip for _fam, ip in out["addrs"]], (out["err"] if not out["addrs"] else None)


def check_resolve(hostname: str, servers, session: Session) -> r.Check:
    addrs, err = resolve_endpoint(hostname, servers)
    session.addrs = addrs
    if err is not None or not addrs:
        return r.fail("endpoint.resolve", f"cannot resolve {hostname}: {err}",
                      "check the name and this host's resolver (see the dns.servers check below)",
                      {"host": hostname})
    return r.ok("endpoint.resolve", f"{hostname} resolves to {', '.join(addrs)}", {"host": hostname})


def connect(ip: str, port: int) -> tuple[socket.socket | None, str | None]:
    try:
        return socket.create_connection((ip, port), timeout=STEP_TIMEOUT), None
    except socket.timeout:
        return None, f"connect timeout after {STEP_TIMEOUT:g} s"
    except OSError as exc:
        name = {111: "ECONNREFUSED", 101: "ENETUNREACH", 113: "EHOSTUNREACH"}.get(exc.errno or 0)
        return None, f"{name or exc.strerror or exc}"


def handshake(sock: socket.socket) -> tuple[ssl.SSLSocket | None, str | None]:
    try:
        tls = client_context().wrap_socket(sock, server_hostname=None)
        return tls, None
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        return None, f"TLS handshake failed: {exc}"


def check_pin(tls: ssl.SSLSocket, bundle: dict) -> r.Check:
    der = tls.getpeercert(binary_form=True)
    expected = bundle["server_cert_sha256"]
    got = fingerprint_der(der) if der else None
    details = {"expected": expected, "got": got}
    if der is None or not pins_match(expected, der):
        return r.fail("tls.pin", "control.tls_pinned_mismatch: the server's leaf certificate does not match the "
                                 "bundle's server_cert_sha256 (the agent exits 1)", PIN_FIX, details)
    return r.ok("tls.pin", "the server's leaf certificate matches the pin", details)


def declared_capabilities(env) -> list[str]:
    """What this build's agent declares in its hello (control/agent.py), or the agent's own override."""
    from ..control.agent import SUPPORTED_CAPABILITIES
    caps = env.get("PORTUNUS_CLIENT_CAPABILITIES")  # the agent's own test hook: declare what it declares
    return [c for c in caps.split(",") if c] if caps is not None else list(SUPPORTED_CAPABILITIES)


def hello_exchange(tls: ssl.SSLSocket, token: str, env) -> tuple[dict | None, list[dict], str | None]:
    """Send the agent's hello; (welcome or error message, replayed rule dicts, transport failure)."""
    capabilities = declared_capabilities(env)
    decoder, first, rules = FrameDecoder(), None, []
    deadline = time.monotonic() + STEP_TIMEOUT
    try:
        tls.sendall(encode(m.hello(token, __version__, capabilities)))
        while time.monotonic() < deadline:
            tls.settimeout(max(0.05, deadline - time.monotonic()))
            data = tls.recv(65536)
            if not data:
                break
            for msg in decoder.feed(data):
                if first is None:
                    first = msg
                elif msg.get("type") == "rule_update" and msg.get("action") == "push":
                    rules.append(msg.get("rule") or {})
                elif msg.get("type") == "replay_done":
                    return first, rules, None
            if first is not None and first.get("type") == "error":
                return first, rules, None
    except (OSError, FrameError) as exc:
        return first, rules, f"{type(exc).__name__}: {exc}"
    return first, rules, ("the rule replay did not finish within the timeout" if first
                          else f"no answer to the hello within {STEP_TIMEOUT:g} s")


def check_token(tls: ssl.SSLSocket, bundle: dict, env, session: Session) -> r.Check:
    reply, rule_dicts, err = hello_exchange(tls, bundle["token"], env)
    if reply is None:
        return r.fail("auth.token", f"the server did not answer the hello: {err}",
                      "check the server's log for control.refused around this time", {})
    if reply.get("type") == "error":
        code = reply.get("code")
        fix = {"token_revoked": "generate a re-enrollment command (`portunus-server reenroll-client NAME`) and "
                                "run it on this host",
               "unauthenticated": "the server does not know this token (reset, older backup, or another "
                                  "server): enroll again"}.get(
            code, "run the same Portunus version on the server and this host")
        return r.fail("auth.token", f"auth.failure reason={code}: {reply.get('message')}", fix, {"code": code})
    parsed = [(d, _rule(d)) for d in rule_dicts]
    session.rules = [rule for _d, rule in parsed if isinstance(rule, Rule)]
    session.unreadable = {str(d.get("rule_id") or "?")[:64]: rule for d, rule in parsed if isinstance(rule, str)}
    session.capabilities = declared_capabilities(env)
    session.udp_max_flows = reply.get("udp_max_flows_per_rule")
    details = {"client_id": reply.get("client_id"),
               "note": "the server logged this as a short session (client.connected / client.disconnected)"}
    if err is not None:  # welcomed, but the replay was cut short: the port checks see only part of the rules
        details["replay"] = err
    return r.ok("auth.token", f"token accepted by server {reply.get('server_version')} as "
                              f"{reply.get('client_name')}; {len(session.rules)} rule(s) replayed", details)


def _rule(d: dict) -> Rule | str:
    """The rule as this build reads it, or why it cannot (``code: message``)."""
    try:
        return Rule.from_dict(d, max_range_ports=65535)
    except PortunusError as exc:
        return f"{exc.code}: {exc.message}"


def check_rule_capabilities(session: Session) -> r.Check:
    """Replayed rules that need a capability this build's agent does not declare, or that it cannot read."""
    if session.rules is None:
        why = (f"an agent (pid {session.agent.pid}) holds the session, so no rules were replayed; "
               "`portunus-server doctor` shows its capabilities (clients.capabilities)"
               if session.agent is not None else "no rules known (the token check did not run)")
        return r.skip("rules.capabilities", why)
    from ..server.core import required_capabilities
    declared = set(session.capabilities)
    lacking = {}
    for rule in session.rules:
        missing = [cap for cap, _code in required_capabilities(rule) if cap not in declared]
        if missing:
            lacking[rule.rule_id] = f"{rule.protocol} {rule.listen_label}: needs {', '.join(missing)}"
    for rule_id, why in session.unreadable.items():
        lacking[rule_id] = f"this build cannot read it ({why})"
    details = {"declared": sorted(declared), "client_version": __version__}
    if lacking:
        first = next(iter(lacking))
        return r.fail("rules.capabilities", f"{len(lacking)} of the server's rule(s) for this client need what "
                                            f"this build ({__version__}) lacks: they will not work here",
                      f"upgrade the portunus binary on this host to the server's version, or remove those rules "
                      f"(`portunus-server remove-rule {first}`)", {**details, "rules": lacking})
    return r.ok("rules.capabilities", f"this build declares every capability the {len(session.rules)} replayed "
                                      "rule(s) need", details)


def agent_client_id(pid: int) -> str | None:
    """The client id of the bundle a running agent uses (its --bundle, its environment, its lookup chain)."""
    argv = (host.read_text(f"{host.PROC}/{pid}/cmdline") or "").split("\x00")
    explicit = None
    for i, arg in enumerate(argv):
        if arg == "--bundle" and i + 1 < len(argv):
            explicit = argv[i + 1]
        elif arg.startswith("--bundle="):
            explicit = arg.split("=", 1)[1]
    environ_text = host.read_text(f"{host.PROC}/{pid}/environ")
    agent_env = host.parse_environ(environ_text) if environ_text is not None else {}
    try:
        cwd = os.readlink(f"{host.PROC}/{pid}/cwd")
    except OSError:
        cwd = None
    candidates = [explicit] if explicit else enrollment.bundle_search_paths(agent_env)
    for path in candidates:
        if path and not os.path.isabs(path) and cwd:
            path = os.path.join(cwd, path)
        try:
            return enrollment.read_bundle(path)["client_id"]
        except (PortunusError, OSError, KeyError, TypeError):
            continue
    return None


def find_connected_agent(addrs: list[str], port: int, client_id: str | None = None) -> AgentProcess | None:
    """The portunus process on this host connected to the server AS THIS BUNDLE'S CLIENT (another
    client's agent says nothing about this bundle's token, and its limits are not this client's)."""
    sockets = host.read_sockets()
    inodes = {s.inode for s in sockets
              if s.proto == "tcp" and s.state == "ESTABLISHED" and s.remote_port == port and s.remote_ip in addrs}
    owners = host.socket_owners(inodes) if inodes else {}
    pids = sorted(set(owners.values()))
    if client_id is not None:
        pids = [pid for pid in pids if agent_client_id(pid) == client_id]
    if not pids:
        return None
    pid = pids[0]
    own_inodes, open_fds = host.process_socket_inodes(pid)
    listen: dict[str, list[int]] = {"tcp": [], "udp": []}
    for s in sockets:
        if s.inode in own_inodes and ((s.proto == "tcp" and s.state == "LISTEN")
                                      or (s.proto == "udp" and s.remote_port == 0)):
            listen[s.proto].append(s.local_port)
    listen["udp"] = [p for p in listen["udp"] if p != 0]
    limits_text = host.read_text(f"{host.PROC}/{pid}/limits")
    status_text = host.read_text(f"{host.PROC}/{pid}/status")
    environ_text = host.read_text(f"{host.PROC}/{pid}/environ")
    argv = (host.read_text(f"{host.PROC}/{pid}/cmdline") or "").split("\x00")
    return AgentProcess(pid, open_fds, host.parse_proc_limits(limits_text) if limits_text else None,
                        host.parse_cap_eff(status_text) if status_text else None, listen,
                        host.parse_environ(environ_text) if environ_text is not None else None,
                        [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--dns-server"])


def endpoint_checks(bundle: dict, servers, env, session: Session) -> list[r.Check]:
    hostname, port = enrollment.split_endpoint(bundle["server_endpoint"])
    checks = [check_resolve(hostname, servers, session)]
    if not session.addrs:
        return checks + [r.skip("endpoint.tcp", "not tried: the endpoint does not resolve"),
                         r.skip("tls.pin", "not checked: no connection"), r.skip("auth.token", "not checked")]
    ip = session.addrs[0]
    sock, err = connect(ip, port)
    if sock is None:
        return checks + [r.fail("endpoint.tcp", f"cannot connect to {ip}:{port}: {err}", CONNECT_FIX,
                                {"address": f"{ip}:{port}"}),
                         r.skip("tls.pin", "not checked: no connection"), r.skip("auth.token", "not checked")]
    checks.append(r.ok("endpoint.tcp", f"{ip}:{port} accepts TCP", {"address": f"{ip}:{port}"}))
    tls, err = handshake(sock)
    if tls is None:
        return checks + [r.fail("tls.pin", err, "something that does not speak TLS answers on that port: check "
                                                "control_listen and what listens there", {}),
                         r.skip("auth.token", "not checked")]
    with tls:
        pin = check_pin(tls, bundle)
        checks.append(pin)
        if pin.status != r.OK:
            return checks + [r.skip("auth.token", "not checked: the token is never sent to an unproven server")]
        session.agent = find_connected_agent(session.addrs, port, bundle.get("client_id"))
        if session.agent is not None:
            checks.append(r.ok("auth.token", f"an agent on this host (pid {session.agent.pid}) holds a connection "
                                             "to the server; no hello sent, so its session stays",
                               {"agent_pid": session.agent.pid}))
        else:
            checks.append(check_token(tls, bundle, env, session))
    return checks


# ------------------------------------------------------------------ what the rules need of the host

def rule_fd_needs(rules: list[Rule], udp_default: int | None) -> dict[str, int]:
    """fds per rule before traffic (its listen ports) plus the UDP flow cap it may fill."""
    needs: dict[str, int] = {}
    for rule in rules:
        n = rule.port_count
        if rule.protocol == "udp":
            n += rule.udp_max_flows or udp_default or 1024
        needs[f"rule {rule.rule_id} ({rule.protocol} {rule.listen_label})"] = n
    return needs


def held_ports(rules: list[Rule], sockets: list[host.SocketEntry]) -> dict[int, str]:
    """Listen ports of the rules that some socket on this host occupies now (no agent runs)."""
    by_port: dict[tuple[str, int], str] = {}
    for s in sockets:
        if s.proto == "tcp" and s.state == "TIME_WAIT":
            continue  # SO_REUSEADDR binds over TIME_WAIT (seed 004, v1.6.1)
        by_port.setdefault((s.proto, s.local_port), f"{s.proto} {s.state}")
    out = {}
    for rule in rules:
        for p in rule.listen_ports:
            if (rule.protocol, p) in by_port:
                out[p] = by_port[(rule.protocol, p)]
    return out


def rule_checks(session: Session, env) -> list[r.Check]:
    agent = session.agent
    own_status = host.read_text(f"{host.PROC}/self/status") or ""
    unpriv = host.read_text(f"{host.PROC}/sys/net/ipv4/ip_unprivileged_port_start")
    unpriv_start = int(unpriv) if unpriv and unpriv.strip().isdigit() else None
    port_range = host.parse_port_range(host.read_text(f"{host.PROC}/sys/net/ipv4/ip_local_port_range"))
    if agent is not None:
        ports = agent.listen_ports["tcp"] + agent.listen_ports["udp"]
        n_listen = len(ports)
        needs = {"listen_sockets": n_listen,
                 "connections_seen": max(0, agent.open_fds - host.FD_BASELINE - n_listen)}
        limit = agent.nofile[0] if agent.nofile else None
        checks = [host.check_nofile(limit, needs, f"running agent pid {agent.pid}", agent.open_fds)
                  if limit else r.skip("limits.nofile", f"cannot read /proc/{agent.pid}/limits")]
        checks.append(host.check_privileged_ports(ports, agent.cap_eff, unpriv_start, f"the agent (pid {agent.pid})"))
        checks.append(host.check_ephemeral_ports(ports, port_range))
        return checks
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = host.effective_nofile(soft, hard)
    rules = session.rules
    if rules is None:
        return [host.check_nofile(limit, {}, "this shell's hard limit (the agent raises its soft limit to it)"),
                r.skip("ports.privileged", "no rules known (the token check did not run)"),
                r.skip("ports.ephemeral", "no rules known (the token check did not run)")]
    ports = [p for rule in rules for p in rule.listen_ports]
    checks = [host.check_nofile(limit, rule_fd_needs(rules, session.udp_max_flows),
                                "this shell's hard limit (the agent raises its soft limit to it)"),
              host.check_privileged_ports(ports, host.parse_cap_eff(own_status), unpriv_start, "this user"),
              host.check_ephemeral_ports(ports, port_range)]
    held = held_ports(rules, host.read_sockets())
    if held:
        checks.append(r.fail("ports.free", f"{len(held)} listen port(s) are in use on this host now: activation "
                                           "will fail with port_in_use",
                             "stop what holds them (`ss -tanp` / `ss -uanp` shows the owner), or move the rules; "
                             "failed rules block their ports until removed",
                             {"held": {str(p): what for p, what in sorted(held.items())[:20]}}))
    else:
        checks.append(r.ok("ports.free", f"all {len(ports)} listen port(s) of the replayed rules are free"))
    return checks


# ------------------------------------------------------------------ resolver

def dns_check(bundle: dict | None, session: Session, servers, source: str) -> r.Check:
    hosts_table = dns.read_hosts()
    names = []
    if bundle is not None:
        names.append(enrollment.split_endpoint(bundle["server_endpoint"])[0])
    for rule in session.rules or []:
        names += [t.host for t in rule.targets]
    needed = sorted({n for n in names if not is_ip_literal(n) and n.lower().rstrip(".") not in hosts_table})
    results = host.probe_dns_servers(servers, needed[0] if needed else "localhost", DNS_TIMEOUT)
    return host.check_dns_servers(results, source, needed)


def dns_servers(cli_servers: list[str], env) -> tuple[list[tuple[str, int]], str, bool]:
    """(servers, where they came from, explicit) — the agent's own precedence."""
    from ..relay.resolver import parse_servers
    values = cli_servers or [x for x in env.get("PORTUNUS_DNS_SERVERS", "").split(",") if x.strip()]
    if values:
        return parse_servers(values), "--dns-server" if cli_servers else "PORTUNUS_DNS_SERVERS", True
    return dns.read_resolv_conf(), "/etc/resolv.conf", False


# ------------------------------------------------------------------ all of it

def run_checks(bundle_path: str | None, cli_dns_servers: list[str], env=os.environ) -> list[r.Check]:
    servers, source, explicit = dns_servers(cli_dns_servers, env)
    session = Session()
    path, lookup = check_bundle_lookup(bundle_path, env)
    checks = [lookup]
    bundle = None
    if path is not None:
        bundle, file_checks = check_bundle_file(path)
        checks += file_checks
    if bundle is not None:
        checks += endpoint_checks(bundle, servers if explicit else None, env, session)
    else:
        checks.append(r.skip("endpoint.resolve", "not checked: no usable bundle"))
    checks += rule_checks(session, env)
    checks.append(check_rule_capabilities(session))
    agent = session.agent
    agent_env = agent.environ if agent is not None and agent.environ is not None else None
    if agent_env is not None and not cli_dns_servers:
        # the running agent's own settings are the ones that matter
        servers, source, _ = dns_servers(agent.dns_servers, agent_env)
        source = f"{source} of the agent (pid {agent.pid})"
    checks += [host.check_splice_kernel(host.splice_probe()),
               host.check_pipe_max_size(_int(host.read_text(f"{host.PROC}/sys/fs/pipe-max-size")),
                                        host.pipe_size_probe()),
               host.check_splice_env(agent_env if agent_env is not None else env,
                                     f"the agent (pid {agent.pid})" if agent_env is not None else "this shell"),
               dns_check(bundle, session, servers, source)]
    return checks


def _int(text: str | None) -> int | None:
    return int(text) if text and text.strip().isdigit() else None
