"""The forwarding paths under test. Each starts its proxy in front of the shared
backends, returns the front ports, and on stop reports figures and problems.

  direct              no proxy (the ceiling)
  haproxy[-splice]    haproxy `mode tcp` (optionally on the kernel splice fast path)
  portunus-*          standalone mode from a generated TOML
  client-*            a real server pushes the same rules to a real client
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import urllib.error
from pathlib import Path

from . import LOOPBACK, REPO, BenchError, log
from .deployment import Deployment
from .logscan import log_events, scan_json_log
from .origins import Backends
from .procs import (ChildProcess, Procs, exit_problems, free_port, listener_addrs,
                    proc_peak_rss_mib, wait_ready)
from .product import splice_env, standalone_config


class PathBase:
    name = "?"
    supports_udp = True

    def __init__(self):
        self.proc: ChildProcess | None = None
        self.problems: list[str] = []
        self.fronts: Backends | None = None
        self.tcp_used = True        # whether a TCP test runs (the splice check needs one)

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


class DirectPath(PathBase):
    name = "direct"

    def start(self, be, procs):
        self.fronts = be
        return be, None


class HaproxyPath(PathBase):
    name = "haproxy"
    supports_udp = False

    def __init__(self, workdir: Path, threads: int, splice: bool = False):
        super().__init__()
        self.workdir, self.threads, self.splice = workdir, threads, splice
        if splice:
            self.name = "haproxy-splice"

    def config_text(self, f: Backends, be: Backends) -> str:
        cfg = [
            "global",
            "    maxconn 4000",
            f"    nbthread {self.threads}",
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
        info = {"peak_rss_mib": proc_peak_rss_mib(self.proc.pid)}
        rc = procs.stop(self.proc, grace=5)
        info["exit_code"] = rc
        text = self.proc.log_path.read_text(errors="replace")
        for line in text.splitlines():
            if "ALERT" in line or "WARNING" in line:
                self.problems.append(line.strip())
        return info


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
        f = Backends(free_port(), free_port(), free_port())
        cfg = self.workdir / f"{self.name}.toml"
        cfg.write_text(standalone_config(f, be, self.listen_host, self.drain, self.log_level))
        t0 = time.monotonic()
        self.proc = procs.spawn(self.name, self.argv + ["--config", str(cfg)],
                                env=splice_env(self.splice), cwd=str(REPO))
        wait_ready([f.iperf, f.http], [f.udp], self.proc, timeout=30)
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
        self.problems += scan_json_log(p.log_path)
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
        f = Backends(free_port(), free_port(), free_port())
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
            # the 201 means the client activated the rule; check the sockets anyway
            wait_ready([f.iperf, f.http], [f.udp], self.proc, timeout=5)
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
        self.problems += ["client: " + x for x in scan_json_log(p.log_path)]
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
