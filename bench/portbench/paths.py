"""The forwarding paths under test. Each starts its proxy in front of the shared
backends, returns the front ports, and on stop reports figures and problems.

  direct              no proxy (the ceiling)
  haproxy             haproxy `mode tcp`, its default thread count (one per CPU)
  haproxy-1t          the same with `nbthread 1` (one thread against one reactor)
  haproxy-splice      optional: haproxy on the kernel splice fast path
  nginx               nginx stream module, `worker_processes 1`, TCP and UDP
  rinetd              rinetd (TCP only)
  socat               one `socat TCP-LISTEN:...,fork` per TCP service (TCP only)
  portunus-*          standalone mode from a generated TOML
  client-*            a real server pushes the same rules to a real client
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import urllib.error
from pathlib import Path

from . import LOOPBACK, REPO, BenchError, log
from .deployment import Deployment
from .logscan import iperf_udp_icmp, log_events, scan_json_log
from .origins import Backends
from .procs import (ChildProcess, Procs, exit_problems, free_port, listener_addrs,
                    proc_peak_rss_mib, session_cpu_split, session_pids, wait_ready)
from .product import iperf_udp_rules, splice_env, standalone_config


NGINX_UDP_RCVBUF = "2m"  # = portunus relay/udp.py LISTEN_RCVBUF (2 MiB asked for)


class PathBase:
    name = "?"
    supports_udp = True

    def __init__(self):
        self.proc: ChildProcess | None = None
        self.problems: list[str] = []
        self.fronts: Backends | None = None
        self.tcp_used = True        # whether a TCP test runs (the splice check needs one)
        self.benign_targets: set[str] = set()   # iperf3 UDP targets (see iperf_udp_icmp)

    def start(self, be: Backends, procs: Procs) -> tuple[Backends, float | None]:
        raise NotImplementedError

    def stop(self, procs: Procs) -> dict:
        return {}

    def release(self, procs: Procs) -> dict | None:
        """Stop whatever of this path still runs (after a failed start or test):
        its stop info, or None when nothing had started."""
        return self.stop(procs) if self.proc is not None else None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def session_leaders(self) -> list[int]:
        """The pids whose sessions hold every process of the proxy (Procs.spawn starts each
        child as a session leader): their CPU is the path's CPU."""
        return [self.proc.pid] if self.proc is not None else []

    def cpu_split(self) -> tuple[float, float] | None:
        """Proxy (user, kernel) CPU seconds so far: every process of its sessions, live and
        reaped (nginx master + worker, socat parents + forked children). None without a
        proxy."""
        leaders = self.session_leaders()
        if not leaders:
            return None
        vals = [session_cpu_split(pid) for pid in leaders]
        if any(v is None for v in vals):
            return None
        return sum(v[0] for v in vals), sum(v[1] for v in vals)

    def cpu_secs(self) -> float | None:
        """Proxy CPU seconds so far (user + kernel; see cpu_split)."""
        split = self.cpu_split()
        return None if split is None else sum(split)

    def pids(self) -> list[int]:
        """Every live process of the proxy's sessions (what --syscalls attaches perf to)."""
        return [pid for sid in self.session_leaders() for pid in session_pids(sid)]

    def peak_rss_mib(self) -> float | None:
        """Peak RSS summed over the proxy's live processes (VmHWM of each)."""
        total, any_ = 0.0, False
        for sid in self.session_leaders():
            for pid in session_pids(sid):
                v = proc_peak_rss_mib(pid)
                if v is not None:
                    total, any_ = total + v, True
        return round(total, 2) if any_ else None


def udp_fronts(be: Backends) -> Backends:
    """Fresh front ports of a UDP-capable path; a second iperf port when `be` has one."""
    return Backends(free_port(), free_port(), free_port(), free_port() if be.iperf_b else 0)


def iperf_udp_targets(be: Backends) -> set[str]:
    """The targets of the iperf3 UDP rules (whose end-of-test ICMP warning is benign)."""
    return {f"{LOOPBACK}:{bp}" for _, _, bp, proto in iperf_udp_rules(be, be) if proto == "udp"}


def ready_ports(f: Backends) -> tuple[list[int], list[int]]:
    """(TCP, UDP) ports a UDP-capable path listens on once it is up."""
    tcp, udp = [f.iperf, f.http], [f.udp]
    if f.iperf_b:
        tcp.append(f.iperf_b)
        udp += [f.iperf, f.iperf_b]
    return tcp, udp


class DirectPath(PathBase):
    name = "direct"

    def start(self, be, procs):
        self.fronts = be
        return be, None


def _thread_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


class HaproxyPath(PathBase):
    """haproxy `mode tcp`. `threads` None: no nbthread line, i.e. haproxy's default of
    one thread per CPU (path `haproxy`); 1: `haproxy-1t`."""
    name = "haproxy"
    supports_udp = False

    def __init__(self, workdir: Path, threads: int | None, splice: bool = False,
                 name: str | None = None):
        super().__init__()
        self.workdir, self.threads, self.splice = workdir, threads, splice
        if name:
            self.name = name
        elif splice:
            self.name = "haproxy-splice"

    def config_text(self, f: Backends, be: Backends) -> str:
        cfg = ["global", "    maxconn 4000"]
        if self.threads:
            cfg.append(f"    nbthread {self.threads}")
        cfg += [
            "defaults",
            "    mode tcp",
            "    timeout connect 3s",
            "    timeout client 60s",
            "    timeout server 60s",
        ]
        if self.splice:     # kernel splice in both directions: a C reference for the fast path
            cfg += ["    option splice-request", "    option splice-response"]
        for nm, fp, bp in (("iperf", f.iperf, be.iperf), ("http", f.http, be.http)):
            cfg += [f"frontend fe_{nm}", f"    bind {LOOPBACK}:{fp}", f"    default_backend be_{nm}",
                    f"backend be_{nm}", f"    server s1 {LOOPBACK}:{bp}"]
        return "\n".join(cfg) + "\n"

    def start(self, be, procs):
        f = Backends(free_port(), free_port(), 0)
        path = self.workdir / f"{self.name}.cfg"
        path.write_text(self.config_text(f, be))
        t0 = time.monotonic()
        self.proc = procs.spawn(self.name, ["haproxy", "-db", "-f", str(path)])
        wait_ready([f.iperf, f.http], [], self.proc, timeout=15)
        self.fronts = f
        return f, time.monotonic() - t0

    def stop(self, procs):
        info = {"peak_rss_mib": self.peak_rss_mib(), "threads": _thread_count(self.proc.pid)}
        rc = procs.stop(self.proc, grace=5)
        info["exit_code"] = rc
        text = self.proc.log_path.read_text(errors="replace")
        for line in text.splitlines():
            if "ALERT" in line or "WARNING" in line:
                self.problems.append(line.strip())
        return info


NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def nginx_stream_config(f: Backends, be: Backends, prefix: Path,
                        module: str | None = NGINX_STREAM_MODULE) -> str:
    """nginx.conf of the `nginx` path: stream proxy for both TCP services and the UDP
    echo, one worker, foreground, every file under `prefix`, no access log.

    UDP: a session per client address (source port); `proxy_responses` is left unset
    (no limit: an echo flow answers every datagram and keeps going) and `proxy_timeout
    10s` ends idle flows, so the 256 flows of one run do not pile up across runs.
    With a second iperf port in `f`: `listen P udp` beside `listen P` on both iperf ports
    (iperf3 UDP). Every UDP listener gets `rcvbuf=2m`, the receive queue Portunus asks for on
    its UDP listen sockets (relay/udp.py LISTEN_RCVBUF): like for like, the row compares the
    proxies, not their default queue depth."""
    lines = []
    if module:
        lines.append(f"load_module {module};")
    lines += [
        "worker_processes 1;",
        "daemon off;",
        "master_process on;",
        f"pid {prefix / 'nginx.pid'};",
        f"error_log {prefix / 'error.log'} warn;",
        "worker_rlimit_nofile 16384;",
        "events { worker_connections 8192; multi_accept on; }",
        "stream {",
        f"    server {{ listen {LOOPBACK}:{f.iperf} backlog=4096; proxy_pass {LOOPBACK}:{be.iperf}; }}",
        f"    server {{ listen {LOOPBACK}:{f.http} backlog=4096; proxy_pass {LOOPBACK}:{be.http}; }}",
        f"    server {{ listen {LOOPBACK}:{f.udp} udp rcvbuf={NGINX_UDP_RCVBUF}; "
        f"proxy_pass {LOOPBACK}:{be.udp}; "
        "proxy_timeout 10s; }",
    ]
    for _, fp, bp, proto in iperf_udp_rules(f, be):     # iperf3 UDP: control TCP, data UDP
        if proto == "tcp":
            lines.append(f"    server {{ listen {LOOPBACK}:{fp} backlog=4096; proxy_pass "
                         f"{LOOPBACK}:{bp}; }}")
        else:
            lines.append(f"    server {{ listen {LOOPBACK}:{fp} udp rcvbuf={NGINX_UDP_RCVBUF}; "
                         f"proxy_pass {LOOPBACK}:{bp}; "
                         "proxy_timeout 10s; }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def nginx_argv(prefix: Path, conf: Path) -> list[str]:
    """Foreground nginx with its own prefix, config and startup error log (-e: before the
    config is read nginx would otherwise open /var/log/nginx/error.log)."""
    return ["nginx", "-p", str(prefix) + "/", "-c", str(conf), "-e", str(prefix / "error.log")]


# a peer resetting or closing mid-stream: iperf3's one-shot server ends its test so
# (every path sees it; portunus counts it, nginx and socat log it as an error)
BENIGN_PEER_ERRORS = ("(104: Connection reset by peer)", "(32: Broken pipe)",
                      "Connection reset by peer", "Broken pipe")


def nginx_log_problems(text: str) -> list[str]:
    """Lines of an nginx error log worth reporting: [alert], [emerg], [crit], [error],
    except a peer's reset / broken pipe (BENIGN_PEER_ERRORS)."""
    return [ln.strip() for ln in text.splitlines()
            if any(f"[{lv}]" in ln for lv in ("emerg", "alert", "crit", "error"))
            and not any(b in ln for b in BENIGN_PEER_ERRORS)]


def socat_log_problems(text: str) -> list[str]:
    """socat's error lines ("... socat[PID] E ..."), except a peer's reset / broken pipe."""
    return [ln.strip() for ln in text.splitlines()
            if re.search(r"socat\[\d+\] E ", ln) and not any(b in ln for b in BENIGN_PEER_ERRORS)]


class NginxPath(PathBase):
    """nginx stream (TCP and UDP), `worker_processes 1`; CPU = master + worker."""
    name = "nginx"
    supports_udp = True

    def __init__(self, workdir: Path):
        super().__init__()
        self.workdir = workdir
        self.prefix = workdir / "nginx-stream"

    def start(self, be, procs):
        f = udp_fronts(be)
        self.prefix.mkdir(exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(nginx_stream_config(f, be, self.prefix))
        t0 = time.monotonic()
        self.proc = procs.spawn(self.name, nginx_argv(self.prefix, conf))
        wait_ready(*ready_ports(f), self.proc, timeout=15)
        self.fronts = f
        return f, time.monotonic() - t0

    def stop(self, procs):
        info = {"peak_rss_mib": self.peak_rss_mib(),
                "processes": len(session_pids(self.proc.pid))}
        rc = procs.stop(self.proc, grace=5)     # SIGTERM: fast shutdown
        info["exit_code"] = rc
        for p in (self.prefix / "error.log", self.proc.log_path):
            try:
                self.problems += nginx_log_problems(p.read_text(errors="replace"))
            except OSError:
                pass
        return info


def rinetd_config(f: Backends, be: Backends) -> str:
    """rinetd.conf: the two TCP services, loopback to loopback, no log file."""
    return "".join(f"{LOOPBACK} {fp} {LOOPBACK} {bp}\n"
                   for fp, bp in ((f.iperf, be.iperf), (f.http, be.http)))


class RinetdPath(PathBase):
    """rinetd (TCP only), foreground."""
    name = "rinetd"
    supports_udp = False

    def __init__(self, workdir: Path):
        super().__init__()
        self.workdir = workdir

    def start(self, be, procs):
        f = Backends(free_port(), free_port(), 0)
        conf = self.workdir / "rinetd.conf"
        conf.write_text(rinetd_config(f, be))
        t0 = time.monotonic()
        self.proc = procs.spawn(self.name, ["rinetd", "-f", "-c", str(conf)])
        wait_ready([f.iperf, f.http], [], self.proc, timeout=15)
        self.fronts = f
        return f, time.monotonic() - t0

    def stop(self, procs):
        info = {"peak_rss_mib": self.peak_rss_mib()}
        info["exit_code"] = procs.stop(self.proc, grace=5)
        return info


def socat_argvs(f: Backends, be: Backends) -> list[list[str]]:
    """One forking socat per TCP service."""
    return [["socat", f"TCP-LISTEN:{fp},fork,reuseaddr,bind={LOOPBACK},backlog=4096",
             f"TCP:{LOOPBACK}:{bp}"] for fp, bp in ((f.iperf, be.iperf), (f.http, be.http))]


class SocatPath(PathBase):
    """socat (TCP only): a forking parent per service, a child per connection. Its CPU is
    the sessions' sum: the parents, their live children, and the reaped children (in the
    parents' cutime/cstime; socat waits for its children on SIGCHLD)."""
    name = "socat"
    supports_udp = False

    def __init__(self):
        super().__init__()
        self.others: list[ChildProcess] = []

    def session_leaders(self):
        return [p.pid for p in ([self.proc] if self.proc else []) + self.others]

    def start(self, be, procs):
        f = Backends(free_port(), free_port(), 0)
        t0 = time.monotonic()
        argvs = socat_argvs(f, be)
        self.proc = procs.spawn("socat-iperf", argvs[0])
        self.others = [procs.spawn("socat-http", argvs[1])]
        wait_ready([f.iperf, f.http], [], self.proc, timeout=15)
        if self.others[0].poll() is not None:
            raise BenchError(f"socat-http exited with code {self.others[0].returncode}")
        self.fronts = f
        return f, time.monotonic() - t0

    def stop(self, procs):
        info = {"peak_rss_mib": self.peak_rss_mib()}
        codes = []
        for p in self.others + [self.proc]:
            if p.poll() is not None and p is not self.proc:
                self.problems.append(f"{p.name} exited early (code {p.returncode})")
            codes.append(procs.stop(p, grace=3))
            self.problems += socat_log_problems(p.log_path.read_text(errors="replace"))
        info["exit_code"] = codes[-1]
        info["exit_codes"] = codes
        self.others = []
        return info

    def release(self, procs):
        if self.proc is None and not self.others:
            return None
        for p in self.others:
            procs.stop(p, grace=2)
        self.others = []
        return self.stop(procs) if self.proc is not None else {}


def stop_product_process(procs: Procs, p: ChildProcess, subject: str, drain: int,
                         drain_setting: str) -> tuple[dict, list[str]]:
    """SIGTERM a product process that carries traffic; wait its drain + 10 s.

    Returns its figures and what went wrong (exit, slow shutdown); `drain_setting`
    names the drain option in the slow-shutdown message."""
    info: dict = {"peak_rss_mib": proc_peak_rss_mib(p.pid)}
    alive_before = p.poll() is None
    t0 = time.monotonic()
    rc = procs.stop(p, grace=drain + 10)
    stop_secs = time.monotonic() - t0
    info.update(exit_code=rc, stop_secs=round(stop_secs, 3))
    problems = exit_problems(subject, alive_before, rc)
    if stop_secs > drain + 5:
        who = "" if subject == "process" else subject + " "
        problems.append(f"{who}took {stop_secs:.1f}s to exit after SIGTERM ({drain_setting})")
    return info, problems


def splice_problems(splice: bool, selected: int, tcp_used: bool, by: str = "") -> list[str]:
    """The fast path announces itself once per rule (SPEC §2.2): it must have, on a
    splice path that carried TCP, and must not have with PORTUNUS_DISABLE_SPLICE=1.
    `by` (" by the client") says whose log it is."""
    if splice and selected == 0 and tcp_used:
        return [f"proxy.splice_selected never logged{by}: splice fast path apparently not taken"]
    if not splice and selected:
        return [f"proxy.splice_selected logged{by} although PORTUNUS_DISABLE_SPLICE=1"]
    return []


class PortunusPath(PathBase):
    supports_udp = True

    def __init__(self, name: str, argv: list[str], workdir: Path, splice: bool,
                 listen_host: str | None, drain_secs: int = 1, log_level: str = "info"):
        super().__init__()
        self.name, self.argv, self.workdir = name, argv, workdir
        self.splice, self.listen_host, self.drain = splice, listen_host, drain_secs
        self.log_level = log_level

    def start(self, be, procs):
        f = udp_fronts(be)
        self.benign_targets = iperf_udp_targets(be)
        cfg = self.workdir / f"{self.name}.toml"
        cfg.write_text(standalone_config(f, be, self.listen_host, self.drain, self.log_level))
        t0 = time.monotonic()
        self.proc = procs.spawn(self.name, self.argv + ["--config", str(cfg)],
                                env=splice_env(self.splice), cwd=str(REPO))
        wait_ready(*ready_ports(f), self.proc, timeout=30)
        took = time.monotonic() - t0
        self.fronts = f
        if self.listen_host:
            addrs = listener_addrs([f.iperf, f.http])
            if addrs - {self.listen_host}:
                self.problems.append(f"listen_host={self.listen_host} in the config but listeners "
                                     f"bound {sorted(addrs)}")
        return f, took

    def stop(self, procs):
        p = self.proc
        info, problems = stop_product_process(procs, p, "process", self.drain,
                                              f"shutdown_drain_secs={self.drain}")
        self.problems += problems
        self.problems += scan_json_log(p.log_path, benign=iperf_udp_icmp(self.benign_targets))
        info["log"] = str(p.log_path)
        ev = log_events(p.log_path)
        info["events"] = ev
        if self.log_level in ("debug", "info"):     # below info the event is not logged
            self.problems += splice_problems(self.splice, ev.get("proxy.splice_selected", 0),
                                             self.tcp_used)
        return info


class ClientPath(PathBase):
    """Client mode (SPEC §11): a real `<bin> server` pushes the three bench rules
    (same as the standalone config) to a real `<bin> client`, which carries the
    bytes. Proxy CPU/RSS are the client's; the server is stopped afterwards."""
    supports_udp = True

    def __init__(self, name: str, base_argv: list[str], splice: bool, drain_secs: int = 1):
        super().__init__()
        self.name, self.base, self.splice, self.drain = name, base_argv, splice, drain_secs
        self.dep: Deployment | None = None
        self.tmp: str | None = None
        self.server: ChildProcess | None = None
        self.timings: dict[str, float] = {}

    @staticmethod
    def rules(f: Backends, be: Backends) -> list[dict]:
        common = {"client": Deployment.CLIENT_NAME, "listen_host": LOOPBACK}
        return [
            {**common, "listen_port": f.iperf, "target": f"{LOOPBACK}:{be.iperf}", "protocol": "tcp"},
            {**common, "listen_port": f.http, "target": f"{LOOPBACK}:{be.http}", "protocol": "tcp"},
            {**common, "listen_port": f.udp, "target": f"{LOOPBACK}:{be.udp}", "protocol": "udp",
             "udp_max_flows": 4096},
        ]

    @staticmethod
    def iperf_rules(f: Backends, be: Backends) -> list[dict]:
        """The iperf3 UDP test's extra rules (iperf_udp_rules), as pushed rules."""
        common = {"client": Deployment.CLIENT_NAME, "listen_host": LOOPBACK}
        return [{**common, "listen_port": fp, "target": f"{LOOPBACK}:{bp}", "protocol": proto,
                 **({"udp_max_flows": 4096} if proto == "udp" else {})}
                for _, fp, bp, proto in iperf_udp_rules(f, be)]

    def _deployment(self, procs: Procs) -> Deployment:
        self.tmp = tempfile.mkdtemp(prefix=f"portunus-bench-{self.name}-")
        server_env = dict(os.environ)
        server_env.pop("PORTUNUS_DISABLE_SPLICE", None)

        def spawn(name, argv, env=None):
            return procs.spawn(f"{self.name}-{name}", argv, cwd=str(REPO),
                               env=env if env is not None else server_env)

        return Deployment(self.base, self.tmp, spawn=spawn, client_env=splice_env(self.splice),
                          client_args=["--shutdown-drain-timeout-secs", str(self.drain)])

    def _push(self, dep: Deployment, body: dict) -> None:
        try:
            status, res = dep.call("POST", "/v1/rules", body, timeout=30)
        except urllib.error.HTTPError as e:
            raise BenchError(f"POST /v1/rules {body} -> {e.code}: "
                             f"{e.read()[:300].decode(errors='replace')}") from None
        if status != 201:
            raise BenchError(f"POST /v1/rules {body} -> {status} (wanted 201): {res}")

    def start(self, be, procs):
        f = udp_fronts(be)
        self.benign_targets = iperf_udp_targets(be)
        self.dep = dep = self._deployment(procs)
        t0 = time.monotonic()
        try:
            dep.start_server()
            self.server = dep.server_proc
            t1 = time.monotonic()
            bundle = dep.enroll()
            t2 = time.monotonic()
            try:
                dep.start_client(bundle)
            finally:
                self.proc = dep.client_proc
            t3 = time.monotonic()
            for body in self.rules(f, be):
                self._push(dep, body)
            t4 = time.monotonic()
            for body in self.iperf_rules(f, be):     # not in the 3-rule push timing
                self._push(dep, body)
            # the 201 means the client activated the rule; check the sockets anyway
            wait_ready(*ready_ports(f), self.proc, timeout=15)
        except (RuntimeError, OSError) as e:
            raise BenchError(f"{type(e).__name__}: {e}") from None
        self.timings = {"server_start_s": round(t1 - t0, 3), "enroll_s": round(t2 - t1, 3),
                        "client_connect_s": round(t3 - t2, 3), "push_3_rules_s": round(t4 - t3, 4)}
        log(f"  {self.name:<19} server {t1 - t0:.2f}s, enroll {t2 - t1:.2f}s, client connected "
            f"{t3 - t2:.2f}s, 3 rules pushed (201) {1000 * (t4 - t3):.0f} ms")
        self.fronts = f
        addrs = listener_addrs([f.iperf, f.http])
        if addrs - {LOOPBACK}:
            self.problems.append(f"rules pushed with listen_host={LOOPBACK} but listeners "
                                 f"bound {sorted(addrs)}")
        # "start -> listening" for the client: process start -> rules active
        return f, t4 - t2

    def _stop_client(self, procs: Procs, p: ChildProcess) -> dict:
        info, problems = stop_product_process(procs, p, "client", self.drain,
                                              f"--shutdown-drain-timeout-secs {self.drain}")
        self.problems += problems
        self.problems += ["client: " + x for x in scan_json_log(
            p.log_path, benign=iperf_udp_icmp(self.benign_targets))]
        ev = log_events(p.log_path)
        info["events"], info["log"] = ev, str(p.log_path)
        self.problems += splice_problems(self.splice, ev.get("proxy.splice_selected", 0),
                                         self.tcp_used and self.fronts is not None,
                                         " by the client")
        return info

    def _stop_server(self, procs: Procs, srv: ChildProcess) -> dict:
        info: dict = {"server_peak_rss_mib": proc_peak_rss_mib(srv.pid)}
        alive_before = srv.poll() is None
        rc = procs.stop(srv, grace=10)
        info["server_exit_code"] = rc
        self.problems += exit_problems("server", alive_before, rc)
        self.problems += ["server: " + x for x in scan_json_log(srv.log_path)]
        info["server_log"] = str(srv.log_path)
        return info

    def stop(self, procs):
        info: dict = {"timings": self.timings}
        p, srv = self.proc, self.server
        if self.dep is not None:        # also after a start that failed half-way
            p = p or self.dep.client_proc
            srv = srv or self.dep.server_proc
        if p is not None:
            info.update(self._stop_client(procs, p))
        if srv is not None:
            info.update(self._stop_server(procs, srv))
        if self.dep is not None:
            for q in self.dep.procs:        # e.g. a `client enroll` that hung
                if q.poll() is None:
                    procs.stop(q, grace=2)
        self.discard_data_dir()
        self.proc = self.server = self.dep = None
        return info

    def release(self, procs):
        return self.stop(procs)

    def discard_data_dir(self) -> None:
        """Server keys, bundle and state of this run (also of an interrupted one)."""
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
