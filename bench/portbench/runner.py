"""Measures one path: start it, check it forwards, run the tcp/http/udp groups,
stop it; collects samples, per-repeat details, errors and problems."""

from __future__ import annotations

import time
from pathlib import Path

from . import BenchError, log
from .machine import busy_pct_between, stat_snap, udp_drops, udp_snmp, wait_udp_drained
from .origins import BODY, Backends
from .paths import PathBase
from .procs import Procs
from .report import split_metric
from .syscount import SyscallCounter, perf_unavailable
from .tools import (http_get, idle_rtt, iperf_once, iperf_udp_once, udp_load, udp_probe, wrk_once,
                    zero_loss_search)


def _cpu_note(cpu: float | None) -> str:
    return f"  (proxy cpu {cpu:.0f}%)" if cpu is not None else ""


class Runner:
    def __init__(self, args, procs: Procs, workdir: Path):
        self.a, self.procs, self.workdir = args, procs, workdir
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.details: dict[str, list[dict]] = {}
        self.problems: dict[str, list[str]] = {}
        self.errors: dict[str, list[str]] = {}
        self.started = time.monotonic()
        self.skipped_for_time = False
        self.last_host_busy: float | None = None
        self.last_cpu_secs: float | None = None
        self.last_cpu_split: tuple[float, float] | None = None     # (user, kernel) seconds
        self.last_syscalls: int | None = None
        # --syscalls: None = counting; else why not (said once, in the log and the report)
        self.syscalls_off: str | None = None if args.syscalls else "not asked (--syscalls)"
        self.syscalls_checked = False
        self.n_windows = 0
        self.udp_seed: dict[tuple[str, str], float] = {}    # (path, key) -> last 0 %-loss offer

    def add(self, path: str, metric: str, value) -> None:
        if value is None:
            return
        self.samples.setdefault(path, {}).setdefault(metric, []).append(float(value))

    def note_error(self, path: str, msg: str) -> None:
        log(f"  ERROR [{path}] {msg}")
        self.errors.setdefault(path, []).append(msg)

    def out_of_time(self) -> bool:
        if time.monotonic() - self.started > self.a.max_total_secs:
            if not self.skipped_for_time:
                log(f"total time budget ({self.a.max_total_secs}s) exhausted; skipping the rest")
            self.skipped_for_time = True
            return True
        return False

    def syscalls_disabled(self, why: str) -> None:
        """Stop counting syscalls for the rest of the run; say why once (never an error)."""
        if self.syscalls_off is None:
            self.syscalls_off = why
            log(f"  --syscalls: syscalls not counted from here on: {why}")

    def _syscall_counter(self, path: PathBase) -> SyscallCounter | None:
        """A started perf counter on the proxy's processes, or None (not asked, perf
        unavailable, or it failed: then counting is off for the rest of the run)."""
        if not self.syscalls_checked and self.syscalls_off is None:
            self.syscalls_checked = True
            why = perf_unavailable(self.procs)
            if why is not None:
                self.syscalls_disabled(why)
        if self.syscalls_off is not None:
            return None
        for attempt in (1, 2):      # again with fresh pids: one may have exited meanwhile
            self.n_windows += 1     # (socat's per-connection children come and go)
            counter = SyscallCounter(self.procs, self.workdir, path.pids(),
                                     f"{path.name}-{self.n_windows}")
            try:
                counter.start()
                return counter
            except (BenchError, OSError) as e:
                counter.close()
                if attempt == 2:
                    self.syscalls_disabled(f"perf stat on {path.name}: {e}")
        return None

    def cpu_pct(self, path: PathBase, fn):
        """Run fn(); return (result, proxy CPU %). The proxy's CPU seconds of the window are
        left in self.last_cpu_secs, split (user, kernel) in self.last_cpu_split, and with
        --syscalls the syscalls it entered in self.last_syscalls (else None). Whole-host
        busy % during fn() is left in self.last_host_busy (100 % = every core busy)."""
        self.last_cpu_secs = self.last_cpu_split = self.last_syscalls = None
        counter = self._syscall_counter(path) if path.proc is not None else None
        try:
            c0 = path.cpu_split()
            h0 = stat_snap()
            t0 = time.monotonic()
            r = fn()
            self.last_host_busy = busy_pct_between(h0, stat_snap())
            c1 = path.cpu_split() if c0 is not None else None
            elapsed = time.monotonic() - t0
            if counter is not None:
                try:
                    self.last_syscalls = counter.stop()
                except (BenchError, OSError) as e:
                    self.syscalls_disabled(f"perf stat on {path.name}: {e}")
        finally:
            if counter is not None:
                counter.close()
        if c0 is None or c1 is None:
            return r, None
        self.last_cpu_split = (c1[0] - c0[0], c1[1] - c0[1])
        self.last_cpu_secs = sum(self.last_cpu_split)
        return r, 100.0 * self.last_cpu_secs / max(elapsed, 1e-6)

    def add_per_unit(self, n: str, prefix: str, suffix: str, units: float | None,
                     scale: float, window: dict | None = None) -> None:
        """Record a window's proxy CPU per unit of work: `{prefix}_proxy_cpu_{suffix}`
        (total), `_user_` and `_sys_` (its utime and stime parts) and, with --syscalls,
        `{prefix}_proxy_syscalls_per_...` (a count, not scaled; split_metric). `scale` turns
        CPU seconds per unit into the figure's unit (1e6: µs). The window is the last cpu_pct one, or a probe's
        result (`window`: proxy_cpu_secs, proxy_cpu_split_secs, proxy_syscalls)."""
        if window is None:
            cpu_secs, split, syscalls = (self.last_cpu_secs, self.last_cpu_split,
                                         self.last_syscalls)
        else:
            cpu_secs, split, syscalls = (window.get("proxy_cpu_secs"),
                                         window.get("proxy_cpu_split_secs"),
                                         window.get("proxy_syscalls"))
        if not units:
            return
        if cpu_secs is not None:
            self.add(n, split_metric(prefix, "cpu", suffix), cpu_secs * scale / units)
        if split is not None:
            self.add(n, split_metric(prefix, "user", suffix), split[0] * scale / units)
            self.add(n, split_metric(prefix, "sys", suffix), split[1] * scale / units)
        if syscalls is not None:
            self.add(n, split_metric(prefix, "syscalls", suffix), syscalls / units)

    def _window_detail(self) -> dict:
        """The last window's raw figures for details[path][i]: proxy CPU seconds (user,
        kernel) and, with --syscalls, the syscall count."""
        out: dict = {"proxy_cpu_split_secs": self.last_cpu_split}
        if self.last_syscalls is not None:
            out["proxy_syscalls"] = self.last_syscalls
        return out

    def run_path(self, path: PathBase, be: Backends, rep: int) -> None:
        a, n = self.a, path.name
        if not path.supports_udp and not ({"tcp", "http"} & set(a.only)):
            return                      # nothing this path can be measured on
        detail: dict = {"repeat": rep}
        self.details.setdefault(n, []).append(detail)
        path.tcp_used = "tcp" in a.only or "http" in a.only
        try:
            fronts, startup = path.start(be, self.procs)
        except BenchError as e:
            self.note_error(n, f"start failed: {e}")
            info = path.release(self.procs)
            if info is not None:
                detail["stop"] = info
            self._collect_problems(path)
            return
        self.add(n, "proxy_startup_s", startup)
        try:
            self._sanity(path, fronts)
            if "tcp" in a.only:
                self._tcp(path, fronts, be, detail)
            if "http" in a.only:
                self._http(path, fronts, detail)
            if "udp" in a.only and path.supports_udp:
                if "echo" in a.udp_tools:
                    self._udp(path, fronts, detail)
                if "iperf3" in a.udp_tools:
                    self._udp_iperf(path, fronts, be, detail)
        except (BenchError, OSError) as e:
            self.note_error(n, f"{type(e).__name__}: {e}")
        finally:
            self._finish(path, detail)

    def _sanity(self, path: PathBase, fronts: Backends) -> None:
        """The path must actually forward before we measure it."""
        a, n = self.a, path.name
        if "http" in a.only or "tcp" in a.only:
            resp = http_get(fronts.http)
            if not resp.startswith(b"HTTP/1.1 200") or not resp.endswith(BODY):
                raise BenchError(f"sanity GET through {n} returned {resp[:120]!r}")
        if ("udp" in a.only and path.supports_udp and "echo" in a.udp_tools
                and not udp_probe(fronts.udp)):
            raise BenchError(f"sanity UDP echo through {n} got no reply")

    def _finish(self, path: PathBase, detail: dict) -> None:
        n = path.name
        if path.proc is None:       # e.g. a client path whose client never started
            info = path.release(self.procs)
            if info is not None:
                detail["stop"] = info
                self._collect_problems(path)
            return
        if path.proc.poll() is not None:
            self.note_error(n, f"proxy process died during the run (code {path.proc.returncode})")
        info = path.stop(self.procs)
        detail["stop"] = info
        self.add(n, "proxy_peak_rss_mib", info.get("peak_rss_mib"))
        self._collect_problems(path)

    def _collect_problems(self, path: PathBase) -> None:
        if path.problems:
            lst = self.problems.setdefault(path.name, [])
            for p in path.problems:
                if p not in lst:
                    lst.append(p)
                    log(f"  problem [{path.name}] {p[:300]}")
            path.problems = []

    def _tcp(self, path, f, be, detail):
        a, n = self.a, path.name
        for metric, rev in (("tcp_bulk_gbps", False), ("tcp_bulk_rev_gbps", True)):
            if rev and not a.reverse:
                continue
            if self.out_of_time():
                return
            try:
                r, cpu = self.cpu_pct(path, lambda: iperf_once(self.procs, f.iperf, be.iperf,
                                                               a.tcp_secs, rev))
            except BenchError as e:
                self.note_error(n, f"{metric}: {e}")
                continue
            self.add(n, metric, r["gbps"])
            if not rev:
                self.add(n, "tcp_bulk_proxy_cpu_pct", cpu)
                self.add(n, "tcp_bulk_host_busy_pct", self.last_host_busy)
                if r.get("bytes"):
                    self.add_per_unit(n, "tcp_bulk", "ms_per_gb", r["bytes"] / 1e9, 1e3)
            detail[metric] = {**r, "proxy_cpu_pct": cpu, "host_busy_pct": self.last_host_busy,
                              **self._window_detail()}
            log(f"  {n:<19} {metric:<22} {r['gbps']:.2f} Gbit/s" + _cpu_note(cpu))

    def _http(self, path, f, detail):
        a, n = self.a, path.name
        for kind, close in (("keepalive", False), ("close", True)):
            if self.out_of_time():
                return
            try:
                r, cpu = self.cpu_pct(path, lambda: wrk_once(self.procs, f.http, a.wrk_secs,
                                                             a.wrk_threads, a.wrk_conns, close))
            except BenchError as e:
                self.note_error(n, f"http_{kind}: {e}")
                continue
            self._record_wrk(n, kind, r, cpu, detail)
        if self.out_of_time():
            return
        try:
            r = idle_rtt(f.http, a.rtt_count, timeout=a.wrk_secs + 5)
        except (BenchError, OSError) as e:
            self.note_error(n, f"idle rtt: {e}")
            return
        self.add(n, "http_idle_rtt_p50_us", r["p50_us"])
        self.add(n, "http_idle_rtt_p99_us", r["p99_us"])
        detail["http_idle_rtt"] = r
        log(f"  {n:<19} idle rtt               p50 {r['p50_us']:.0f} us p99 {r['p99_us']:.0f} us")

    def _record_wrk(self, n: str, kind: str, r: dict, cpu: float | None, detail: dict) -> None:
        self.add(n, f"http_{kind}_rps", r["rps"])
        self.add(n, f"http_{kind}_p50_ms", r.get("p50_ms"))
        self.add(n, f"http_{kind}_p99_ms", r.get("p99_ms"))
        self.add(n, f"http_{kind}_proxy_cpu_pct", cpu)
        self.add_per_unit(n, f"http_{kind}", "us_per_req", r.get("requests"), 1e6)
        detail[f"http_{kind}"] = {**r, "proxy_cpu_pct": cpu, "host_busy_pct": self.last_host_busy,
                                  **self._window_detail()}
        errs = sum(r["socket_errors"].values()) if r["socket_errors"] else 0
        if errs or r["non_2xx"]:
            self.problems.setdefault(n, []).append(
                f"wrk {kind}: socket errors {r['socket_errors']}, non-2xx {r['non_2xx']}")
        log(f"  {n:<19} http_{kind:<17} {r['rps']:.0f} req/s p50 {r.get('p50_ms', 0):.3f} ms "
            f"p99 {r.get('p99_ms', 0):.3f} ms  errors {errs}" + _cpu_note(cpu))

    def _udp(self, path, f, detail):
        a, n = self.a, path.name
        for key, flows in (("1flow", 1), ("manyflow", a.udp_flows)):
            if self.out_of_time():
                return
            r, cpu = self.cpu_pct(path, lambda: udp_load(f.udp, flows, a.udp_count,
                                                         a.udp_window, a.udp_secs))
            self.add(n, f"udp_{key}_pps", r["pps"])
            self.add(n, f"udp_{key}_loss_pct", r["loss_pct"])
            self.add(n, f"udp_{key}_proxy_cpu_pct", cpu)
            self.add_per_unit(n, f"udp_{key}", "us_per_dgram", r.get("received"), 1e6)
            detail[f"udp_{key}"] = {**r, "flows": flows, "proxy_cpu_pct": cpu,
                                    "host_busy_pct": self.last_host_busy,
                                    **self._window_detail()}
            log(f"  {n:<19} udp_{key:<18} {r['pps']:.0f} pkt/s  sent {r['sent']} recv "
                f"{r['received']} loss {r['loss_pct']:.2f}%  stalls {r['stalls']}" + _cpu_note(cpu))

    def _iperf_udp_probe(self, path: PathBase, pairs, flows: int):
        """probe(pps) for zero_loss_search: one iperf3 -u test, with the proxy's CPU over it
        and where the kernel dropped datagrams (host-wide RcvbufErrors; the drops of the
        path's front UDP sockets)."""
        a = self.a
        fronts = {fp for fp, bp in pairs if fp != bp}

        def probe(pps: float) -> dict:
            waited = wait_udp_drained(fronts) if fronts else 0.0
            s0, d0 = udp_snmp(), udp_drops(fronts)
            r, cpu = self.cpu_pct(path, lambda: iperf_udp_once(
                self.procs, pairs, flows, pps, a.udp_iperf_secs, 64, a.udp_iperf_window))
            s1, d1 = udp_snmp(), udp_drops(fronts)
            r["proxy_cpu_pct"], r["proxy_cpu_secs"] = cpu, self.last_cpu_secs
            r["proxy_cpu_split_secs"], r["proxy_syscalls"] = self.last_cpu_split, self.last_syscalls
            if self.last_cpu_secs is not None and r["received"]:
                r["proxy_cpu_us_per_dgram"] = self.last_cpu_secs * 1e6 / r["received"]
            if self.last_syscalls is not None and r["received"]:
                r["proxy_syscalls_per_dgram"] = self.last_syscalls / r["received"]
            r["host_busy_pct"] = self.last_host_busy
            r["drain_wait_s"] = round(waited, 3)
            if "RcvbufErrors" in s0 and "RcvbufErrors" in s1:
                r["host_rcvbuf_errors"] = s1["RcvbufErrors"] - s0["RcvbufErrors"]
            if fronts:
                r["front_socket_drops"] = sum(d1.values()) - sum(d0.get(p, 0) for p in d1)
            log(f"    {path.name:<17} iperf3 -u {flows:>3} flow(s) offered {pps:,.0f}/s: recv "
                f"{r['pps']:,.0f}/s lost {r['lost']} ({r['loss_pct']:.3f}%) sent "
                f"{r['sent_pps']:,.0f}/s" + _cpu_note(cpu))
            return r
        return probe

    def _udp_iperf(self, path, f, be, detail):
        """UDP 64 B with iperf3 (a C generator, one way): per flow count, the highest
        received rate at 0 % loss (iperf3's lost_packets), by zero_loss_search."""
        a, n = self.a, path.name
        pairs_all = f.iperf_pairs(be)
        for key, flows, pairs in (("1flow", 1, pairs_all[:1]),
                                  ("manyflow", a.udp_flows, pairs_all)):
            if self.out_of_time():
                return
            seed = self.udp_seed.get((n, key))
            # a later repeat searches from near the last result; one probe is a fixed rate
            start = 0.9 * seed if seed and a.udp_iperf_probes > 1 else a.udp_iperf_start
            try:
                res = zero_loss_search(self._iperf_udp_probe(path, pairs, flows), start,
                                       a.udp_iperf_probes, max_loss_pct=a.udp_loss_max_pct)
            except BenchError as e:
                self.note_error(n, f"udp_iperf_{key}: {e}")
                continue
            b = res["best"]
            m = f"udp_iperf_{key}"
            self.add(n, f"{m}_pps", res["pps"])
            self.add(n, f"{m}_loss_pct", res["loss_pct"])
            self.add(n, f"{m}_probes", res["probes"])
            self.add(n, f"{m}_max_pps", res["max_pps"])
            self.add(n, f"{m}_proxy_cpu_pct", b.get("proxy_cpu_pct"))
            self.add_per_unit(n, m, "us_per_dgram", b.get("received"), 1e6, window=b)
            if res["loss_pct"] <= a.udp_loss_max_pct:
                self.udp_seed[(n, key)] = res["offered_pps"]
            detail[m] = {"flows": flows, "pairs": len(pairs), **res}
            log(f"  {n:<19} {m:<22} {res['pps']:,.0f} pkt/s at {res['loss_pct']:.3f}% loss "
                f"({res['probes']} probes, ended by {res['limit']})"
                + _cpu_note(b.get("proxy_cpu_pct")))
