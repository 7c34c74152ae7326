"""`python3 bench/run.py`: options, the run from start to JSON, exit code.

Exit codes: 0 ok, 1 --compare found a regression, 2 incomplete run (or the
baseline could not be read), 130 interrupted (partial JSON is still written).
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import BENCH_DIR, BenchError, log
from .machine import host_busy_pct, machine_info
from .origins import Backends, serve_http_origin, serve_udp_echo, spawn_nginx_origin
from .paths import (NGINX_STREAM_MODULE, ClientPath, DirectPath, HaproxyPath, NginxPath, PathBase,
                    PortunusPath, RinetdPath, SocatPath)
from .procs import Procs, free_fixed_port, free_port, wait_ready
from .product import portunus_commands, probe_portunus, resolve_bin
from .report import (ALL_GROUPS, ALL_PATHS, DEFAULT_PATHS, NOT_APPLICABLE, PORTUNUS_PATHS,
                     compare, cpu_split, format_compare, format_cpu_split, format_header,
                     format_issues, format_ratios, format_table,
                     derive, gate_exit_code, issue_tables, option_mismatch, ratios, summarize)
from .runner import Runner

RUN_PY = BENCH_DIR / "run.py"     # also starts the helper servers: run.py _http-origin PORT

PROCS: Procs | None = None


def _cleanup() -> None:
    if PROCS is not None:
        PROCS.stop_all()


def _build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Portunus benchmark: direct vs portunus (standalone and client mode, "
                    "splice/userspace) vs haproxy, nginx stream, rinetd and socat, side by side.")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 s tests, repeat 1 (unless --repeat given), one iperf3 UDP "
                         "probe per search; about 1 min")
    ap.add_argument("--only", default="tcp,http,udp", help="comma list of tcp,http,udp")
    ap.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                    help=f"comma list of {','.join(ALL_PATHS)} (default: all but haproxy-splice)")
    ap.add_argument("--origin", choices=["nginx", "python"], default=None,
                    help="HTTP origin: nginx `return 200` (default when nginx is installed) or "
                         "the bench's own Python epoll responder (more CPU per request, "
                         "which on a small machine leaves less for the proxy)")
    ap.add_argument("--bin", default="dist/portunus",
                    help="the portunus command, taking the role as its first argument "
                         "(standalone paths: BIN standalone --config F; client paths: "
                         "BIN server ... / BIN client ...); may contain args, e.g. "
                         "'python3 -m portunus'; default %(default)s")
    ap.add_argument("--repeat", type=int, default=None, help="repetitions per measurement "
                    "(median is reported); default 3, 1 with --quick")
    ap.add_argument("--compare", metavar="BASELINE_JSON",
                    help="compare medians with a baseline; exit 1 if a metric is worse by more "
                         "than --threshold percent")
    ap.add_argument("--threshold", type=float, default=25.0, help="regression threshold %% (25)")
    ap.add_argument("--write-baseline", action="store_true",
                    help="store this run as bench/baseline.json (record it on a quiet machine)")
    ap.add_argument("--machine-note", default=None,
                    help="free text stored as meta.machine.note (e.g. 'quiet' or 'loaded: "
                         "other benches running'); say so when a baseline is not from a quiet run")
    ap.add_argument("--render", metavar="RESULT_JSON",
                    help="print the side-by-side table, ratios and goals of a saved run; "
                         "runs nothing")
    ap.add_argument("--out", default=str(BENCH_DIR / "results" / "latest.json"))
    ap.add_argument("--tcp-secs", type=int, default=None, help="iperf3 -t (default 3; quick 1)")
    ap.add_argument("--reverse", dest="reverse", action="store_true", default=False,
                    help="also run iperf3 -R (reverse bulk; off by default)")
    ap.add_argument("--no-reverse", dest="reverse", action="store_false",
                    help="skip the iperf3 -R run (the default)")
    ap.add_argument("--wrk-secs", type=int, default=None, help="wrk -d (default 3; quick 1)")
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk -t (default 1)")
    ap.add_argument("--wrk-conns", type=int, default=50, help="wrk -c (default 50)")
    ap.add_argument("--rtt-count", type=int, default=None, help="idle RTT samples (2000; quick 300)")
    ap.add_argument("--udp-count", type=int, default=None,
                    help="datagrams per UDP run (default 1000000, i.e. the time cap decides; "
                         "quick 20000)")
    ap.add_argument("--udp-secs", type=float, default=None,
                    help="time cap per UDP run (default 3; quick 1)")
    ap.add_argument("--udp-flows", type=int, default=256, help="source sockets for the N-flow run")
    ap.add_argument("--udp-window", type=int, default=128, help="datagrams in flight (all flows)")
    ap.add_argument("--udp-tools", default="echo,iperf3",
                    help="comma list of the UDP tests: echo (the bench's closed-loop round "
                         "trip) and iperf3 (iperf3 -u -l 64, one way, the 0 %%-loss rate)")
    ap.add_argument("--udp-iperf-secs", type=int, default=None,
                    help="iperf3 -t of one probe of the 0 %%-loss search (default 2; quick 1)")
    ap.add_argument("--udp-iperf-probes", type=int, default=None,
                    help="most probes per 0 %%-loss search (default 7; quick 1)")
    ap.add_argument("--udp-iperf-start", type=float, default=50000.0,
                    help="first offered rate of the search, datagrams/s (later repeats start "
                         "at 0.9x the path's last 0 %%-loss offer, unless --udp-iperf-probes "
                         "is 1: then every probe runs at this rate); default %(default)g")
    ap.add_argument("--udp-iperf-window", default="2M",
                    help="iperf3 -w (socket buffers of iperf3's own sockets, both ends; the "
                         "proxy's are its own business); default %(default)s")
    ap.add_argument("--udp-loss-max-pct", type=float, default=0.0,
                    help="loss that still counts as clean in the iperf3 search (default 0: "
                         "not one datagram lost)")
    ap.add_argument("--haproxy-threads", type=int, default=None,
                    help="nbthread of the `haproxy` path (default: none, i.e. haproxy's own "
                         "default of one thread per CPU); haproxy-1t and haproxy-splice always "
                         "run nbthread 1")
    ap.add_argument("--portunus-log-level", default="info",
                    choices=["debug", "info", "warn", "error"],
                    help="log_level in the generated TOML (default info, so that the runner can "
                         "check proxy.splice_selected; nothing is logged per connection)")
    ap.add_argument("--max-total-secs", type=float, default=None,
                    help="overall time budget; remaining tests are skipped after it "
                         "(default 1800; 85 with --quick)")
    ap.add_argument("--keep-logs", action="store_true", help="keep child logs even on success")
    ap.add_argument("--syscalls", action="store_true",
                    help="also count the proxy's syscalls per request / connection / GB / "
                         "datagram (perf stat -e raw_syscalls:sys_enter attached to its "
                         "processes for each test's window). Off by default: counting adds a "
                         "little kernel time to every syscall, so take the other figures from "
                         "a run without it. Without perf (or when it is refused) the run goes "
                         "on and says so once")
    return ap


def parse_args(argv=None):
    ap = _build_parser()
    a = ap.parse_args(argv)
    q = a.quick
    a.repeat = a.repeat if a.repeat is not None else (1 if q else 3)
    a.tcp_secs = a.tcp_secs or (1 if q else 3)
    a.wrk_secs = a.wrk_secs or (1 if q else 3)
    a.rtt_count = a.rtt_count or (300 if q else 2000)
    a.udp_count = a.udp_count or (20000 if q else 1000000)
    a.udp_secs = a.udp_secs or (1.0 if q else 3.0)
    a.udp_iperf_secs = a.udp_iperf_secs or (1 if q else 2)
    a.udp_iperf_probes = a.udp_iperf_probes or (1 if q else 7)
    a.udp_tools = [x.strip() for x in a.udp_tools.split(",") if x.strip()]
    for x in a.udp_tools:
        if x not in ("echo", "iperf3"):
            ap.error(f"--udp-tools: unknown test {x!r} (echo, iperf3)")
    if a.udp_iperf_secs < 1 or a.udp_iperf_probes < 1:
        ap.error("--udp-iperf-secs and --udp-iperf-probes must be >= 1")
    if "iperf3" in a.udp_tools and not 2 <= a.udp_flows <= 2 * 128:
        ap.error("--udp-flows must be 2..256 with the iperf3 test (two iperf3 client/server "
                 "pairs of at most 128 streams each; or --udp-tools echo)")
    if a.max_total_secs is None:
        a.max_total_secs = 85 if q else 1800
    a.only = [x.strip() for x in a.only.split(",") if x.strip()]
    a.paths = [x.strip() for x in a.paths.split(",") if x.strip()]
    for x in a.only:
        if x not in ALL_GROUPS:
            ap.error(f"--only: unknown group {x!r}")
    for x in a.paths:
        if x not in ALL_PATHS:
            ap.error(f"--paths: unknown path {x!r}")
    if a.repeat < 1:
        ap.error("--repeat must be >= 1")
    return a


def _install_signal_handlers() -> None:
    def _on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGINT, signal.default_int_handler)   # even if inherited as ignored
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)


def _start_meta(argv: list[str], a, workdir: Path) -> dict:
    machine = machine_info()
    if a.machine_note:
        machine["note"] = a.machine_note
    meta = {"started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(["python3", "bench/run.py"] + list(argv)),
            "machine": machine,
            "options": {k: v for k, v in vars(a).items()}, "workdir": str(workdir),
            "loadavg_start": os.getloadavg()}
    busy = host_busy_pct(1.0)
    meta["host_busy_pct_before"] = busy
    if busy is not None and busy > 15:
        log(f"WARNING: the machine is {busy:.0f}% busy before the run (other workloads); "
            "results will be noisy")
    return meta


def _portunus_argvs(a, procs: Procs, workdir: Path, runner: Runner,
                    meta: dict) -> tuple[list[str] | None, list[str] | None]:
    """(standalone argv, base argv) of the product, or None for what cannot run;
    why not is recorded as an error of each wanted path."""
    wanted = [p for p in a.paths if p in PORTUNUS_PATHS]
    if not wanted:
        return None, None
    bin_argv = resolve_bin(a.bin)
    if bin_argv is None:
        msg = (f"portunus binary {a.bin!r} not found; portunus and client paths skipped "
               "(build with ./build.sh or pass --bin 'python3 -m portunus')")
        log("WARNING: " + msg)
        for p in wanted:
            runner.errors.setdefault(p, []).append(msg)
        return None, None
    standalone_argv, base_argv, why = portunus_commands(bin_argv)
    meta["portunus"] = {"argv": standalone_argv, "base_argv": base_argv}
    if base_argv is None:
        for p in wanted:
            if p.startswith("client"):
                runner.errors.setdefault(p, []).append(why)
    if standalone_argv is None:
        return None, base_argv
    try:
        lh, pinfo = probe_portunus(procs, standalone_argv, workdir)
    except BenchError as e:
        log(f"ERROR: {e}")
        meta["portunus"]["probe_error"] = str(e)
        for p in wanted:
            runner.errors.setdefault(p, []).append(str(e))
        return None, None
    meta["portunus"].update(pinfo)
    if lh is None:
        log("WARNING: this portunus build rejects listen_host in the TOML; "
            "its standalone listeners will bind 0.0.0.0 (product default) during the run")
    return standalone_argv, base_argv


# the system tools a peer path needs (besides iperf3 and wrk for the tests themselves)
PEER_TOOLS = {"haproxy": ["haproxy"], "haproxy-1t": ["haproxy"], "haproxy-splice": ["haproxy"],
              "nginx": ["nginx"], "rinetd": ["rinetd"], "socat": ["socat"]}


def missing_tools(path: str) -> list[str]:
    """What `path` needs and this machine lacks (nginx also needs its stream module)."""
    out = [t for t in PEER_TOOLS.get(path, []) if shutil.which(t) is None]
    if path == "nginx" and not out and not Path(NGINX_STREAM_MODULE).exists():
        out.append(f"{NGINX_STREAM_MODULE} (libnginx-mod-stream)")
    return out


def _build_paths(a, workdir: Path, runner: Runner, meta: dict, standalone_argv, base_argv,
                 paths: list[PathBase]) -> None:
    for p in a.paths:
        lack = missing_tools(p)
        if lack:
            runner.errors.setdefault(p, []).append(f"not installed: {', '.join(lack)}")
            continue
        if p == "direct":
            paths.append(DirectPath())
        elif p == "haproxy":
            paths.append(HaproxyPath(workdir, a.haproxy_threads))
        elif p == "haproxy-1t":
            paths.append(HaproxyPath(workdir, 1, name="haproxy-1t"))
        elif p == "haproxy-splice":
            paths.append(HaproxyPath(workdir, 1, splice=True))
        elif p == "nginx":
            paths.append(NginxPath(workdir))
        elif p == "rinetd":
            paths.append(RinetdPath(workdir))
        elif p == "socat":
            paths.append(SocatPath())
        elif p.startswith("client"):
            if base_argv is not None:
                paths.append(ClientPath(p, base_argv, p == "client-splice"))
        elif standalone_argv is not None:
            paths.append(PortunusPath(p, standalone_argv, workdir, p == "portunus-splice",
                                      meta["portunus"].get("listen_host"),
                                      log_level=a.portunus_log_level))


def _start_backends(a, procs: Procs, meta: dict, workdir: Path) -> Backends:
    """The backends, shared by every path (iperf3's is started per test)."""
    iperf_udp = "udp" in a.only and "iperf3" in a.udp_tools
    # the iperf3 servers come and go: their ports lie outside the ephemeral range
    be = Backends(free_fixed_port(), free_port(), free_port(),
                  free_fixed_port() if iperf_udp else 0)
    me = [sys.executable, str(RUN_PY)]
    if "http" in a.only or "tcp" in a.only:
        if a.origin == "nginx":
            spawn_nginx_origin(procs, be.http, workdir)
        else:
            origin = procs.spawn("http-origin", me + ["_http-origin", str(be.http)])
            wait_ready([be.http], [], origin, timeout=10)
    if "udp" in a.only and "echo" in a.udp_tools:
        echo = procs.spawn("udp-echo", me + ["_udp-echo", str(be.udp)])
        wait_ready([], [be.udp], echo, timeout=10)
    meta["backends"] = {"iperf": be.iperf, "http": be.http, "udp": be.udp,
                        "iperf_b": be.iperf_b, "http_origin": a.origin}
    return be


def _measure(a, runner: Runner, paths: list[PathBase], be: Backends) -> None:
    """Repeats outermost, so paths are interleaved in time, and the path order
    rotates from one repeat to the next (no path always runs first)."""
    for rep in range(1, a.repeat + 1):
        k = (rep - 1) % max(len(paths), 1)
        for path in paths[k:] + paths[:k]:
            if runner.out_of_time():
                break
            if not path.supports_udp and not ({"tcp", "http"} & set(a.only)):
                continue
            log(f"repeat {rep}/{a.repeat}: {path.name}")
            runner.run_path(path, be, rep)


def _compare_with_baseline(a, summary: dict, doc: dict) -> int | None:
    """Print the comparison; its exit code (1 regression, 2 unreadable baseline), or None."""
    try:
        baseline = json.loads(Path(a.compare).read_text())
    except (OSError, ValueError) as e:
        print(f"\ncannot read baseline {a.compare}: {e}")
        return 2
    if not isinstance(baseline, dict) or not isinstance(baseline.get("summary"), dict):
        print(f"\nbaseline {a.compare} has no summary (not a bench/run.py JSON)")
        return 2
    rows, missing = compare(summary, baseline, a.threshold)
    diff = option_mismatch(baseline.get("meta", {}).get("options", {}), vars(a))
    doc["compare"] = {"baseline": a.compare, "threshold_pct": a.threshold,
                      "rows": rows, "missing": missing, "option_mismatch": diff}
    if diff:
        print(f"\nWARNING: the baseline was recorded with other options ({'; '.join(diff)}); "
              "its figures are not comparable")
    print("\n".join(format_compare(a.compare, a.threshold, rows, missing)))
    return gate_exit_code(rows) or None


def _report(a, meta: dict, runner: Runner, paths: list[PathBase], interrupted: bool) -> dict:
    """Print the table, ratios, errors and problems; the JSON document of the run."""
    summary = summarize(runner.samples)
    shown = [p.name for p in paths] + [p for p in a.paths if p not in {x.name for x in paths}]
    print()
    print("\n".join(format_header(meta, a)))
    table = format_table(summary, shown, NOT_APPLICABLE, runner.errors)
    print(table)
    rat = ratios(summary)
    if rat:
        print()
        print("\n".join(format_ratios(rat)))
    sbs, goals, text = issue_tables(summary, shown, runner.errors, a.udp_flows)
    print("\n" + text)
    split = cpu_split(summary, shown)
    note = runner.syscalls_off if a.syscalls else None
    meta["syscalls"] = {"asked": a.syscalls, "counted": a.syscalls and note is None,
                        "why_not": note}
    split_lines = format_cpu_split(split, shown, a.udp_flows, note)
    if split_lines:
        print("\n" + "\n".join(split_lines))
    elif note:
        print(f"\nsyscalls not counted: {note}")
    issues = format_issues(runner.errors, runner.problems)
    if issues:
        print("\n".join(issues))
    return {"meta": meta, "summary": summary, "ratios": rat, "side_by_side": sbs,
            "goals": goals, "where_cpu_goes": split, "errors": runner.errors,
            "problems": runner.problems, "details": runner.details, "table": table,
            "issue_tables": text,
            "interrupted": interrupted}


def _write_outputs(a, doc: dict, workdir: Path, runner: Runner, interrupted: bool) -> None:
    out = Path(a.out)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nresults: {out}")
    if a.write_baseline and not interrupted:
        bl = BENCH_DIR / "baseline.json"
        bl.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"baseline written: {bl}")
    if not interrupted and not runner.errors and not runner.problems and not a.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"child logs kept in {workdir}")


def _make_workdir(a) -> Path:
    results_dir = Path(a.out).resolve().parent  # absolute: peers (nginx -p) resolve paths against their own prefix
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix=f"run-{stamp}-", dir=results_dir))
    (workdir / "logs").mkdir()
    return workdir


def render(path: str) -> int:
    """--render: the issue tables of a saved run (from its summary, not its printed text)."""
    try:
        doc = json.loads(Path(path).read_text())
        summary, meta = doc["summary"], doc.get("meta", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"cannot read {path}: {e}")
        return 2
    opts = meta.get("options", {})
    shown = opts.get("paths") or list(summary)
    flows = opts.get("udp_flows", 256)
    machine = meta.get("machine", {})
    print(f"run {meta.get('started', '?')}  {meta.get('command', '')}")
    print(f"machine: {machine.get('nproc', '?')} cpu {machine.get('cpu_model', '?')}, git "
          f"{machine.get('git', '?')}; loadavg start {meta.get('loadavg_start', ['?'])[0]} end "
          f"{meta.get('loadavg_end', ['?'])[0]}; host busy before "
          f"{meta.get('host_busy_pct_before', '?')} %"
          + (f"; note: {machine['note']}" if machine.get("note") else ""))
    summary = derive(summary)
    print("\n" + issue_tables(summary, shown, doc.get("errors", {}), flows)[2])
    note = (meta.get("syscalls") or {}).get("why_not") if opts.get("syscalls") else None
    split_lines = format_cpu_split(cpu_split(summary, shown), shown, flows, note)
    if split_lines:
        print("\n" + "\n".join(split_lines))
    return 0


def main(argv=None) -> int:
    global PROCS
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_http-origin":
        serve_http_origin(int(argv[1]))
        return 0
    if argv and argv[0] == "_udp-echo":
        serve_udp_echo(int(argv[1]))
        return 0
    a = parse_args(argv)
    if a.render:
        return render(a.render)
    for tool in ("iperf3", "wrk"):
        if shutil.which(tool) is None:
            log(f"WARNING: {tool} not found (apt-get install -y iperf3 wrk)")
    if a.origin is None:
        a.origin = "nginx" if shutil.which("nginx") else "python"
        if a.origin == "python" and ("http" in a.only or "tcp" in a.only):
            log("WARNING: nginx not found; the HTTP origin is the Python responder (not the "
                "issue's method: its CPU per request competes with the proxy's)")
    workdir = _make_workdir(a)
    PROCS = procs = Procs(workdir / "logs")
    atexit.register(_cleanup)
    _install_signal_handlers()
    t_start = time.monotonic()
    meta = _start_meta(argv, a, workdir)
    runner = Runner(a, procs, workdir)
    interrupted, rc = False, 0
    paths: list[PathBase] = []
    try:
        standalone_argv, base_argv = _portunus_argvs(a, procs, workdir, runner, meta)
        _build_paths(a, workdir, runner, meta, standalone_argv, base_argv, paths)
        _measure(a, runner, paths, _start_backends(a, procs, meta, workdir))
    except BenchError as e:      # a backend could not start: no figures to trust, no baseline
        interrupted, rc = True, 2
        log(f"error: {e}")
    except KeyboardInterrupt as e:
        interrupted, rc = True, 130
        log(f"interrupted ({str(e) or 'Ctrl-C'}); stopping children and writing partial results")
    finally:
        procs.stop_all()
        for path in paths:      # client-mode data dirs (keys, bundle) of an interrupted run
            if isinstance(path, ClientPath):
                path.discard_data_dir()
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    meta["loadavg_end"] = os.getloadavg()
    doc = _report(a, meta, runner, paths, interrupted)
    if a.compare and not interrupted:
        rc = _compare_with_baseline(a, doc["summary"], doc) or rc
    if rc == 0 and runner.errors:
        rc = 2          # incomplete run: some path or test could not be measured
    _write_outputs(a, doc, workdir, runner, interrupted)
    return rc
