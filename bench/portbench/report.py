"""The metrics, their summary, and everything the run prints: table, ratios,
errors/problems, baseline comparison. Pure: data in, lines out."""

from __future__ import annotations

import shlex
import statistics

ALL_PATHS = ["direct", "portunus-splice", "portunus-userspace", "client-splice", "client-userspace",
             "haproxy", "haproxy-1t", "nginx", "rinetd", "socat", "haproxy-splice"]
DEFAULT_PATHS = [p for p in ALL_PATHS if p != "haproxy-splice"]
PORTUNUS_PATHS = {"portunus-splice", "portunus-userspace", "client-splice", "client-userspace"}
# the peers: every path that is neither portunus nor direct ("best peer" is the best of these)
PEER_PATHS = [p for p in ALL_PATHS if p != "direct" and p not in PORTUNUS_PATHS]
HAPROXY_PATHS = ["haproxy", "haproxy-1t", "haproxy-splice"]
ALL_GROUPS = ["tcp", "http", "udp"]
# groups a path cannot carry: shown as "n/a", not as missing
NOT_APPLICABLE: dict[str, set] = {"haproxy": {"udp"}, "haproxy-1t": {"udp"},
                                  "haproxy-splice": {"udp"}, "rinetd": {"udp"}, "socat": {"udp"}}

# name -> (group, unit, better, compared, label)
#   better: "higher" | "lower";  compared: take part in --compare (p99 latencies do not: on
#   a shared VM a scheduling hiccup moves them by 50-2000 % between identical runs)
METRICS: dict[str, tuple[str, str, str, bool, str]] = {
    "tcp_bulk_gbps":          ("tcp", "Gbit/s", "higher", True,  "TCP bulk, 1 stream"),
    "tcp_bulk_rev_gbps":      ("tcp", "Gbit/s", "higher", True,  "TCP bulk, 1 stream, reverse (-R)"),
    "http_keepalive_rps":     ("http", "req/s", "higher", True,  "HTTP keep-alive"),
    "http_keepalive_p50_ms":  ("http", "ms",    "lower",  True,  "  latency p50"),
    "http_keepalive_p99_ms":  ("http", "ms",    "lower",  False,  "  latency p99"),
    "http_close_rps":         ("http", "conn/s", "higher", True, "HTTP new conn (Connection: close)"),
    "http_close_p50_ms":      ("http", "ms",    "lower",  True,  "  latency p50"),
    "http_close_p99_ms":      ("http", "ms",    "lower",  False,  "  latency p99"),
    "http_idle_rtt_p50_us":   ("http", "us",    "lower",  True,  "Idle request RTT p50 (1 conn)"),
    "http_idle_rtt_p99_us":   ("http", "us",    "lower",  False,  "Idle request RTT p99 (1 conn)"),
    "udp_iperf_1flow_pps":    ("udp", "pkt/s",  "higher", True,  "UDP 64 B, 1 flow (iperf3)"),
    "udp_iperf_1flow_loss_pct": ("udp", "%",    "lower",  True,  "  loss at that rate"),
    "udp_iperf_manyflow_pps": ("udp", "pkt/s",  "higher", True,  "UDP 64 B, N flows (iperf3)"),
    "udp_iperf_manyflow_loss_pct": ("udp", "%", "lower",  True,  "  loss at that rate"),
    "udp_1flow_pps":          ("udp", "pkt/s",  "higher", True,  "UDP echo, round trip, 1 flow"),
    "udp_1flow_loss_pct":     ("udp", "%",      "lower",  True,  "  loss"),
    "udp_manyflow_pps":       ("udp", "pkt/s",  "higher", True,  "UDP echo, round trip, N flows"),
    "udp_manyflow_loss_pct":  ("udp", "%",      "lower",  True,  "  loss"),
    # informational only (never compared), except CPU per unit of work (compared: it is
    # what the hot-path work changes, and less sensitive to other load than the rates)
    "proxy_startup_s":        ("meta", "s",     "lower",  False, "Proxy start -> listening"),
    "proxy_peak_rss_mib":     ("meta", "MiB",   "lower",  False, "Proxy peak RSS (VmHWM)"),
    "tcp_bulk_proxy_cpu_pct": ("tcp", "%",      "lower",  False, "Proxy CPU during TCP bulk"),
    "tcp_bulk_host_busy_pct": ("tcp", "%",      "lower",  False, "Host busy during TCP bulk"),
    "tcp_bulk_proxy_cpu_ms_per_gb": ("tcp", "ms/GB", "lower", True, "Proxy CPU per GB, TCP bulk"),
    "http_keepalive_proxy_cpu_pct": ("http", "%", "lower", False, "Proxy CPU during keep-alive"),
    "http_keepalive_proxy_cpu_us_per_req": ("http", "us", "lower", True, "Proxy CPU per keep-alive req"),
    "http_close_proxy_cpu_pct": ("http", "%",   "lower",  False, "Proxy CPU during new-conn"),
    "http_close_proxy_cpu_us_per_req": ("http", "us", "lower", True, "Proxy CPU per new connection"),
    "udp_1flow_proxy_cpu_pct": ("udp", "%",     "lower",  False, "Proxy CPU during UDP echo 1 flow"),
    "udp_manyflow_proxy_cpu_pct": ("udp", "%",  "lower",  False, "Proxy CPU during UDP echo N flows"),
    "udp_1flow_proxy_cpu_us_per_dgram": ("udp", "us", "lower", True,
                                         "Proxy CPU per dgram, echo 1 flow"),
    "udp_manyflow_proxy_cpu_us_per_dgram": ("udp", "us", "lower", True,
                                            "Proxy CPU per dgram, echo N flows"),
    # iperf3: at the 0 %-loss probe of the search (one way: each datagram crosses once)
    "udp_iperf_1flow_proxy_cpu_pct": ("udp", "%", "lower", False, "Proxy CPU, UDP iperf3 1 flow"),
    "udp_iperf_manyflow_proxy_cpu_pct": ("udp", "%", "lower", False,
                                         "Proxy CPU, UDP iperf3 N flows"),
    "udp_iperf_1flow_proxy_cpu_us_per_dgram": ("udp", "us", "lower", True,
                                               "Proxy CPU per dgram, iperf3 1 flow"),
    "udp_iperf_manyflow_proxy_cpu_us_per_dgram": ("udp", "us", "lower", True,
                                                  "Proxy CPU per dgram, iperf3 N flows"),
    "udp_iperf_1flow_max_pps": ("udp", "pkt/s", "higher", False, "  most received, any loss, 1 flow"),
    "udp_iperf_manyflow_max_pps": ("udp", "pkt/s", "higher", False,
                                   "  most received, any loss, N flows"),
    "udp_iperf_1flow_probes": ("udp", "n",      "lower",  False, "  iperf3 probes, 1 flow search"),
    "udp_iperf_manyflow_probes": ("udp", "n",   "lower",  False, "  iperf3 probes, N flows search"),
    # derived from the medians by derive(): path p50 - direct p50
    "http_idle_rtt_added_p50_us": ("http", "us", "lower", False, "Idle RTT p50 added over direct"),
}

# "where the CPU goes": every CPU-per-unit figure split into the proxy's user time (utime)
# and kernel time (stime), and with --syscalls the syscalls it entered per unit
# (perf stat -e raw_syscalls:sys_enter). Informational (compared: False): the split moves
# with the kernel's tick sampling, and perf's counting perturbs the run it is taken in.
# key, label, metric prefix, suffix, unit, decimals (the syscall row: one more)
CPU_SPLIT: list[tuple[str, str, str, str, str, int]] = [
    ("keepalive", "keep-alive, per request", "http_keepalive", "us_per_req", "us", 1),
    ("newconn", "new connection, per connection", "http_close", "us_per_req", "us", 1),
    ("udp1_iperf", "UDP 1 flow (iperf3), per datagram", "udp_iperf_1flow", "us_per_dgram",
     "us", 2),
    ("udpn_iperf", "UDP {flows} flows (iperf3), per datagram", "udp_iperf_manyflow",
     "us_per_dgram", "us", 2),
    ("udp1", "UDP echo 1 flow, per datagram", "udp_1flow", "us_per_dgram", "us", 2),
    ("udpn", "UDP echo {flows} flows, per datagram", "udp_manyflow", "us_per_dgram", "us", 2),
    ("bulk", "TCP bulk, per GB", "tcp_bulk", "ms_per_gb", "ms/GB", 0),
]
_SPLIT_PARTS = (("user", "user (utime)"), ("sys", "kernel (stime)"))


def split_metric(prefix: str, part: str, suffix: str) -> str:
    """`part` = cpu (the total) | user | sys | syscalls (a count: the suffix loses its unit,
    http_close_proxy_syscalls_per_req beside http_close_proxy_user_us_per_req)."""
    if part == "syscalls":
        suffix = suffix[suffix.index("per_"):]
    return f"{prefix}_proxy_{part}_{suffix}"


SPLIT_METRICS: set[str] = set()
for _key, _label, _prefix, _suffix, _unit, _dec in CPU_SPLIT:
    _group = _prefix.split("_")[0]
    for _part, _what in _SPLIT_PARTS:
        SPLIT_METRICS.add(split_metric(_prefix, _part, _suffix))
        METRICS[split_metric(_prefix, _part, _suffix)] = (
            _group, _unit, "lower", False, f"  proxy {_what}, {_label.format(flows='N')}")
    SPLIT_METRICS.add(split_metric(_prefix, "syscalls", _suffix))
    METRICS[split_metric(_prefix, "syscalls", _suffix)] = (
        _group, "n", "lower", False, f"  proxy syscalls, {_label.format(flows='N')}")

# Loss is a percentage that is often 0 in the baseline; a relative threshold
# alone would flag 0.0 -> 0.01. It must also be this many points worse.
ABS_SLACK = {"udp_1flow_loss_pct": 1.0, "udp_manyflow_loss_pct": 1.0,
             "udp_iperf_1flow_loss_pct": 1.0, "udp_iperf_manyflow_loss_pct": 1.0}
# rates shown as path/direct ratios
RATIO_METRICS = ("tcp_bulk_gbps", "tcp_bulk_rev_gbps", "http_keepalive_rps", "http_close_rps",
                 "udp_iperf_1flow_pps", "udp_iperf_manyflow_pps", "udp_1flow_pps",
                 "udp_manyflow_pps")
# SPEC §11: TCP bulk through portunus >= 60 % of direct
SPEC_TARGETS = {"portunus-splice/direct:tcp_bulk_gbps": 0.60,
                "client-splice/direct:tcp_bulk_gbps": 0.60}


def summarize(samples: dict) -> dict:
    """path -> metric -> samples  =>  path -> metric -> median, min, max, samples, unit, …

    Also the derived metrics (derive())."""
    out: dict = {}
    for path, metrics in samples.items():
        for m, vals in metrics.items():
            group, unit, better, compared, label = METRICS[m]
            out.setdefault(path, {})[m] = {
                "median": statistics.median(vals), "min": min(vals), "max": max(vals),
                "samples": vals, "unit": unit, "better": better, "compared": compared,
            }
    return derive(out)


def derive(summary: dict) -> dict:
    """Add `http_idle_rtt_added_p50_us` (path's idle RTT p50 median minus direct's) to every
    path that has an idle RTT, when direct has one. In place; returns `summary`."""
    d = summary.get("direct", {}).get("http_idle_rtt_p50_us")
    if d is None:
        return summary
    group, unit, better, compared, label = METRICS["http_idle_rtt_added_p50_us"]
    for path, metrics in summary.items():
        if path == "direct" or "http_idle_rtt_p50_us" not in metrics:
            continue
        v = metrics["http_idle_rtt_p50_us"]["median"] - d["median"]
        metrics["http_idle_rtt_added_p50_us"] = {
            "median": v, "min": v, "max": v, "samples": [v], "unit": unit, "better": better,
            "compared": compared}
    return summary


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "Gbit/s":
        return f"{v:.2f}"
    if unit in ("req/s", "conn/s", "pkt/s"):
        return f"{v:,.0f}"
    if unit == "ms":
        return f"{v:.3f}"
    if unit in ("us",):
        return f"{v:.0f}"
    if unit == "%":
        return f"{v:.1f}"
    if unit == "n":
        return f"{v:.1f}"
    return f"{v:.2f}"


def _cell(s: dict | None, unit: str, missing: str) -> str:
    if s is None:
        return missing
    cell = fmt(s["median"], unit)
    if len(s["samples"]) > 1 and s["median"]:
        spread = (s["max"] - s["min"]) / 2 / abs(s["median"]) * 100
        cell += f" ±{spread:.0f}%"
    return cell


def format_table(summary: dict, paths: list[str], na: dict[str, set], errors: dict) -> str:
    """One row per metric any path has, one column per path: median ±half-range %.

    A missing value reads "n/a" (the path cannot carry the group), "error" (the
    path had errors) or "-"."""
    colw = 20
    head = f"{'metric':<36}{'unit':<8}" + "".join(f"{p:>{colw}}" for p in paths)
    lines = [head, "-" * len(head)]
    for m, (group, unit, better, compared, label) in METRICS.items():
        if m in SPLIT_METRICS or not any(m in summary.get(p, {}) for p in paths):
            continue            # the split rows have their own table (format_cpu_split)
        row = f"{label:<36}{unit:<8}"
        for p in paths:
            missing = "n/a" if group in na.get(p, set()) else ("error" if p in errors else "-")
            row += f"{_cell(summary.get(p, {}).get(m), unit, missing):>{colw}}"
        lines.append(row)
    return "\n".join(lines)


def ratios(summary: dict) -> dict:
    out = {}
    d = summary.get("direct", {})
    for m in RATIO_METRICS:
        if m not in d or not d[m]["median"]:
            continue
        for p in ALL_PATHS:
            if p == "direct" or m not in summary.get(p, {}):
                continue
            out[f"{p}/direct:{m}"] = summary[p][m]["median"] / d[m]["median"]
    return out


def format_ratios(rat: dict) -> list[str]:
    lines = []
    for k, v in rat.items():
        extra = ""
        if k in SPEC_TARGETS:
            target = SPEC_TARGETS[k]
            extra = f"   (§11 target >= {target:.2f}: {'PASS' if v >= target else 'FAIL'})"
        lines.append(f"ratio {k:<48} {v:6.3f}{extra}")
    return lines


def _regressed(better: str, bv: float, cv: float, threshold_pct: float,
               slack: float) -> tuple[bool, float]:
    """(worse than the baseline beyond the threshold, change in % of the baseline)."""
    if better == "higher":
        worse = cv < bv * (1 - threshold_pct / 100) - slack
        change = (cv - bv) / bv * 100 if bv else 0.0
    else:
        worse = cv > bv * (1 + threshold_pct / 100) + slack
        change = (cv - bv) / bv * 100 if bv else (0.0 if cv == bv else float("inf"))
    return worse, change


def compare(current: dict, baseline: dict, threshold_pct: float) -> tuple[list[dict], list[str]]:
    """Compared metrics of the baseline's summary against this run's: (rows, "path/metric"
    of baseline metrics this run did not measure)."""
    rows, missing = [], []
    base = baseline.get("summary", {})
    for path, metrics in base.items():
        for m, b in metrics.items():
            if not b.get("compared", True) or m not in METRICS or not METRICS[m][3]:
                continue
            c = current.get(path, {}).get(m)
            if c is None:
                missing.append(f"{path}/{m}")
                continue
            bv, cv, better = b["median"], c["median"], METRICS[m][2]
            worse, change = _regressed(better, bv, cv, threshold_pct, ABS_SLACK.get(m, 0.0))
            rows.append({"path": path, "metric": m, "baseline": bv, "current": cv,
                         "change_pct": change, "better": better, "regressed": worse})
    return rows, missing


# options that change what a figure means: a baseline recorded with other values is not
# comparable (compare still runs; the differences are printed as a warning)
COMPARABLE_OPTIONS = ("quick", "repeat", "tcp_secs", "wrk_secs", "wrk_threads", "wrk_conns",
                      "udp_flows", "udp_window", "udp_secs", "origin", "portunus_log_level",
                      "udp_iperf_secs", "udp_iperf_probes", "udp_iperf_window",
                      "udp_loss_max_pct", "syscalls")


def option_mismatch(baseline_options: dict, current_options: dict) -> list[str]:
    """COMPARABLE_OPTIONS whose value differs between the baseline's run and this one
    ("name: baseline -> current"); options the baseline did not record are skipped."""
    out = []
    for k in COMPARABLE_OPTIONS:
        if k in baseline_options and baseline_options[k] != current_options.get(k):
            out.append(f"{k}: {baseline_options[k]!r} -> {current_options.get(k)!r}")
    return out


def gate_exit_code(rows: list[dict]) -> int:
    """The regression gate: 1 if any compared median regressed beyond the threshold, else 0."""
    return 1 if any(r["regressed"] for r in rows) else 0


def format_compare(baseline_name: str, threshold_pct: float, rows: list[dict],
                   missing: list[str]) -> list[str]:
    lines = ["", f"compare with {baseline_name} (medians; fail if > {threshold_pct:.0f}% worse):"]
    for r in rows:
        flag = "REGRESSED" if r["regressed"] else "ok"
        lines.append(f"  {r['path']:<20}{r['metric']:<26}{r['baseline']:>14.4g}{r['current']:>14.4g}"
                     f"{r['change_pct']:>+9.1f}%  {flag}")
    if missing:
        by_path: dict[str, int] = {}
        for x in missing:
            by_path[x.split("/")[0]] = by_path.get(x.split("/")[0], 0) + 1
        lines.append("  in baseline but not measured this run (not a failure): "
                     + ", ".join(f"{p} ({n} metrics)" for p, n in by_path.items()))
    if any(r["regressed"] for r in rows):
        lines.append("RESULT: regression beyond threshold")
    else:
        lines.append("RESULT: no regression beyond threshold")
    return lines


def format_header(meta: dict, a) -> list[str]:
    """The run's options, the machine and the product build, above the table."""
    lines = [f"Portunus bench  {meta['started']}  repeat={a.repeat}  "
             f"{'quick ' if a.quick else ''}tcp={a.tcp_secs}s wrk={a.wrk_secs}s "
             f"(-t{a.wrk_threads} -c{a.wrk_conns}) udp={a.udp_count}x64B/{a.udp_flows} flows; "
             f"median{' ±half-range' if a.repeat > 1 else ''}"]
    m = meta["machine"]
    origin = getattr(a, "origin", None)
    if origin:
        lines[0] += f"; http origin {origin}"
    busy = meta.get("host_busy_pct_before")
    lines.append(f"machine: {m['nproc']} cpu {m['cpu_model']}, kernel {m['kernel']}, "
                 f"python {m['python']}, git {m['git']}; loadavg start "
                 f"{meta['loadavg_start'][0]:.2f} end {meta['loadavg_end'][0]:.2f}"
                 + (f"; host busy before {busy:.0f} %" if busy is not None else "")
                 + (f"; note: {m['note']}" if m.get("note") else ""))
    pm = meta.get("portunus")
    if pm and (pm.get("base_argv") or pm.get("argv")):
        lines.append(f"portunus: {shlex.join(pm.get('base_argv') or pm['argv'])}  "
                     f"sha256 {pm.get('bin_sha256', '-')} built {pm.get('bin_mtime', '-')}  "
                     f"listen_host {pm.get('listen_host') or '(default)'}")
    return lines


def format_issues(errors: dict[str, list[str]], problems: dict[str, list[str]]) -> list[str]:
    """Per path: what could not be measured, then what looked wrong."""
    lines = []
    if errors:
        lines += ["", "errors:"]
        lines += [f"  [{p}] {e}" for p, lst in errors.items() for e in lst]
    if problems:
        lines += ["", "problems seen (logs, exit codes, wrk errors):"]
        lines += [f"  [{p}] {e[:500]}" for p, lst in problems.items() for e in lst]
    return lines


# --------------------------------------------------------------------------
# the side-by-side table of issue 15: figures x paths, best peer, ratios, goals
# --------------------------------------------------------------------------

# key, label, metric, scale, decimals, loss metric (printed beside a lossy rate)
FIGURES: list[tuple[str, str, str, float, int, str | None]] = [
    ("bulk", "TCP bulk, Gbit/s", "tcp_bulk_gbps", 1.0, 1, None),
    ("keepalive", "keep-alive, k req/s", "http_keepalive_rps", 1e-3, 1, None),
    ("newconn", "new connections, k/s", "http_close_rps", 1e-3, 2, None),
    ("udp1_iperf", "UDP 64 B, 1 flow (iperf3), k datagrams/s", "udp_iperf_1flow_pps", 1e-3, 1,
     "udp_iperf_1flow_loss_pct"),
    ("udpn_iperf", "UDP 64 B, {flows} flows (iperf3), k datagrams/s", "udp_iperf_manyflow_pps",
     1e-3, 1, "udp_iperf_manyflow_loss_pct"),
    ("udp1", "UDP 64 B echo, round trip, 1 flow, k datagrams/s", "udp_1flow_pps", 1e-3, 1,
     "udp_1flow_loss_pct"),
    ("udpn", "UDP 64 B echo, round trip, {flows} flows, k datagrams/s", "udp_manyflow_pps", 1e-3,
     1, "udp_manyflow_loss_pct"),
    ("rtt50", "idle RTT p50, µs", "http_idle_rtt_p50_us", 1.0, 0, None),
    ("rtt99", "idle RTT p99, µs", "http_idle_rtt_p99_us", 1.0, 0, None),
    ("rttadd", "added idle RTT p50 over direct, µs", "http_idle_rtt_added_p50_us", 1.0, 0, None),
    ("cpu_req", "CPU per keep-alive request, µs", "http_keepalive_proxy_cpu_us_per_req", 1.0, 1,
     None),
    ("cpu_conn", "CPU per new connection, µs", "http_close_proxy_cpu_us_per_req", 1.0, 0, None),
    ("cpu_gb", "CPU per GB bulk, ms", "tcp_bulk_proxy_cpu_ms_per_gb", 1.0, 0, None),
    ("cpu_udp1_iperf", "CPU per UDP datagram, 1 flow (iperf3), µs",
     "udp_iperf_1flow_proxy_cpu_us_per_dgram", 1.0, 2, None),
    ("cpu_udpn_iperf", "CPU per UDP datagram, {flows} flows (iperf3), µs",
     "udp_iperf_manyflow_proxy_cpu_us_per_dgram", 1.0, 2, None),
    ("cpu_udp1", "CPU per UDP datagram, echo 1 flow, µs", "udp_1flow_proxy_cpu_us_per_dgram",
     1.0, 1, None),
    ("cpu_udpn", "CPU per UDP datagram, echo {flows} flows, µs",
     "udp_manyflow_proxy_cpu_us_per_dgram", 1.0, 1, None),
]
ZERO_LOSS_PCT = 0.005       # shows as 0.00 %: "0 % loss"


def median_of(summary: dict, path: str, metric: str) -> float | None:
    cell = summary.get(path, {}).get(metric)
    return None if cell is None else cell["median"]


def best_of(summary: dict, metric: str, paths: list[str]) -> tuple[str, float] | None:
    """(path, median) of the best of `paths` on `metric` (METRICS' better), or None."""
    better = METRICS[metric][2]
    have = [(p, v) for p in paths if (v := median_of(summary, p, metric)) is not None]
    if not have:
        return None
    pick = max if better == "higher" else min
    return pick(have, key=lambda pv: pv[1])


def best_peer(summary: dict, metric: str) -> tuple[str, float] | None:
    """The best non-portunus, non-direct path on `metric`."""
    return best_of(summary, metric, PEER_PATHS)


def _ratio(v: float | None, ref: float | None) -> float | None:
    if v is None or ref is None or ref == 0:
        return None
    return v / ref


def side_by_side(summary: dict, paths: list[str]) -> dict:
    """figure key -> {"metric", "values": {path: median}, "loss": {path: %}, "best_peer":
    [path, median] | None, "x_direct": {path: ratio}, "x_best_peer": {path: ratio}}.

    Ratios are value / reference for every figure (for a CPU or latency figure below 1.0
    is better); x_best_peer is given for the portunus paths only."""
    out = {}
    for key, label, metric, scale, dec, loss_m in FIGURES:
        vals = {p: v for p in paths if (v := median_of(summary, p, metric)) is not None}
        bp = best_peer(summary, metric)
        d = median_of(summary, "direct", metric)
        row = {"metric": metric, "values": vals, "best_peer": list(bp) if bp else None,
               "x_direct": {}, "x_best_peer": {}, "loss": {}}
        if loss_m:
            row["loss"] = {p: v for p in paths if (v := median_of(summary, p, loss_m)) is not None}
        for p, v in vals.items():
            if p != "direct" and metric != "http_idle_rtt_added_p50_us":
                if (r := _ratio(v, d)) is not None:
                    row["x_direct"][p] = r
            if p in PORTUNUS_PATHS and bp is not None and (r := _ratio(v, bp[1])) is not None:
                row["x_best_peer"][p] = r
        out[key] = row
    return out


def _fig_cell(row: dict, p: str, scale: float, dec: int, missing: str) -> str:
    v = row["values"].get(p)
    if v is None:
        return missing
    text = f"{v * scale:,.{dec}f}"
    loss = row["loss"].get(p)
    if loss is not None and loss >= ZERO_LOSS_PCT:
        text += f" ({loss:.2f}% loss)"
    return text


def format_side_by_side(sbs: dict, paths: list[str], na: dict[str, set], errors: dict,
                        flows: int) -> list[str]:
    """The issue's table (markdown): rows = figures, columns = paths, then the best peer."""
    head = ["figure"] + paths + ["best peer"]
    lines = ["| " + " | ".join(head) + " |",
             "| --- |" + " ---: |" * (len(paths) + 1)]
    for key, label, metric, scale, dec, loss_m in FIGURES:
        row = sbs.get(key)
        if row is None or not row["values"]:
            continue
        group = METRICS[metric][0]
        cells = [label.format(flows=flows)]
        for p in paths:
            missing = "n/a" if group in na.get(p, set()) else ("error" if p in errors else "–")
            if p == "direct" and metric == "http_idle_rtt_added_p50_us":
                missing = "0"
            if metric.endswith(("_per_req", "_per_gb", "_per_dgram")) and p == "direct":
                missing = "–"
            cells.append(_fig_cell(row, p, scale, dec, missing))
        bp = row["best_peer"]
        cells.append(f"{bp[0]} {bp[1] * scale:,.{dec}f}" if bp else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_ratio_table(sbs: dict, paths: list[str], flows: int) -> list[str]:
    """Per figure: each path × direct, and each portunus path × the best peer."""
    port = [p for p in paths if p in PORTUNUS_PATHS]
    others = [p for p in paths if p != "direct"]
    head = ["figure"] + [f"{p} ×direct" for p in others] + [f"{p} ×best peer" for p in port]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for key, label, metric, scale, dec, loss_m in FIGURES:
        row = sbs.get(key)
        if row is None or not (row["x_direct"] or row["x_best_peer"]):
            continue
        cells = [label.format(flows=flows)]
        cells += [f"{row['x_direct'][p]:.2f}" if p in row["x_direct"] else "–" for p in others]
        cells += [f"{row['x_best_peer'][p]:.2f}" if p in row["x_best_peer"] else "–" for p in port]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# goal, metric, reference ("best-peer", "haproxy": the better of the haproxy paths, a path
# name, or None for an absolute bound), op (">=" ratio, "<=" ratio, "abs<=" value), target,
# loss metric that must read 0 %
GOALS: list[tuple[str, str, str | None, str, float, str | None]] = [
    ("keep-alive req/s ≥ 1.0× best peer", "http_keepalive_rps", "best-peer", ">=", 1.0, None),
    ("CPU per keep-alive request ≤ haproxy's", "http_keepalive_proxy_cpu_us_per_req", "haproxy",
     "<=", 1.0, None),
    ("new connections/s ≥ 1.0× haproxy-1t", "http_close_rps", "haproxy-1t", ">=", 1.0, None),
    ("CPU per new connection ≤ haproxy's", "http_close_proxy_cpu_us_per_req", "haproxy", "<=",
     1.0, None),
    ("UDP 1 flow (iperf3) ≥ 2× nginx, 0 % loss", "udp_iperf_1flow_pps", "nginx", ">=", 2.0,
     "udp_iperf_1flow_loss_pct"),
    ("UDP N flows (iperf3) ≥ 1.5× nginx, 0 % loss", "udp_iperf_manyflow_pps", "nginx", ">=",
     1.5, "udp_iperf_manyflow_loss_pct"),
    ("TCP bulk ≥ 1.3× best peer", "tcp_bulk_gbps", "best-peer", ">=", 1.3, None),
    ("added idle RTT p50 ≤ 30 µs", "http_idle_rtt_added_p50_us", None, "abs<=", 30.0, None),
]


def _reference(summary: dict, metric: str, ref: str | None) -> tuple[str, float] | None:
    if ref == "best-peer":
        return best_peer(summary, metric)
    if ref == "haproxy":
        return best_of(summary, metric, HAPROXY_PATHS)
    if ref is None:
        return None
    v = median_of(summary, ref, metric)
    return (ref, v) if v is not None else None


def goal_marks(summary: dict, paths: list[str]) -> list[dict]:
    """Every goal of issue 15 for every portunus path in `paths`: value, reference, ratio,
    met (True/False, None when a figure is missing). A rate goal with a loss metric is met
    only at 0 % loss (< 0.005 %)."""
    out = []
    for goal, metric, ref, op, target, loss_m in GOALS:
        for p in paths:
            if p not in PORTUNUS_PATHS:
                continue
            v = median_of(summary, p, metric)
            r = _reference(summary, metric, ref)
            row = {"goal": goal, "path": p, "metric": metric, "value": v,
                   "reference": r[0] if r else None, "reference_value": r[1] if r else None,
                   "ratio": None, "target": target, "op": op, "met": None}
            if op == "abs<=":
                if v is not None:
                    row["met"] = v <= target
            elif v is not None and r is not None and (ratio := _ratio(v, r[1])) is not None:
                row["ratio"] = ratio
                row["met"] = ratio >= target if op == ">=" else ratio <= target
            if loss_m and row["met"] is not None:
                loss = median_of(summary, p, loss_m)
                row["loss_pct"] = loss
                if loss is None or loss >= ZERO_LOSS_PCT:
                    row["met"] = False
            out.append(row)
    return out


def format_goals(marks: list[dict], flows: int) -> list[str]:
    """One line per goal and portunus path: MET / MISSED / ? (a figure is missing)."""
    lines = []
    for m in marks:
        verdict = {True: "MET", False: "MISSED", None: "?"}[m["met"]]
        goal = m["goal"].replace("N flows", f"{flows} flows")
        if m["op"] == "abs<=":
            detail = "-" if m["value"] is None else f"{m['value']:.0f}"
        elif m["ratio"] is not None:
            detail = f"{m['ratio']:.2f}× {m['reference']}"
        else:
            detail = "no figure" if m["value"] is None else "no reference"
        if m.get("loss_pct") is not None and m["loss_pct"] >= ZERO_LOSS_PCT:
            detail += f", {m['loss_pct']:.2f}% loss"
        lines.append(f"  {verdict:<7}{m['path']:<20}{goal:<48}{detail}")
    return lines


def issue_tables(summary: dict, shown: list[str], errors: dict,
                 flows: int) -> tuple[dict, list[dict], str]:
    """(side-by-side data, goal marks, the printed text: side-by-side table, ratios, goals)."""
    sbs = side_by_side(summary, shown)
    text = ["side by side (medians; best peer = best path that is neither portunus nor direct):"]
    text += format_side_by_side(sbs, shown, NOT_APPLICABLE, errors, flows)
    text += ["", "ratios (value / reference; for CPU and RTT rows below 1.00 is better):"]
    text += format_ratio_table(sbs, shown, flows)
    goals = goal_marks(summary, shown)
    goal_lines = format_goals(goals, flows)
    if goal_lines:
        text += ["", "goals of issue 15 (haproxy's = the better of the haproxy paths):"]
        text += goal_lines
    return sbs, goals, "\n".join(text)


# --------------------------------------------------------------------------
# where the CPU goes: user vs kernel time and syscalls per unit of work
# --------------------------------------------------------------------------

def cpu_split(summary: dict, paths: list[str]) -> dict:
    """figure key -> {"unit", "total", "user", "kernel", "syscalls"}: each {path: median},
    for the CPU_SPLIT figures some path has a split of (direct has no proxy)."""
    out = {}
    for key, label, prefix, suffix, unit, dec in CPU_SPLIT:
        row = {"unit": unit}
        for name, part in (("total", "cpu"), ("user", "user"), ("kernel", "sys"),
                           ("syscalls", "syscalls")):
            m = split_metric(prefix, part, suffix)
            row[name] = {p: v for p in paths if p != "direct"
                         and (v := median_of(summary, p, m)) is not None}
        if row["user"] or row["syscalls"]:
            out[key] = row
    return out


def format_cpu_split(split: dict, paths: list[str], flows: int,
                     syscalls_note: str | None = None) -> list[str]:
    """The "where the CPU goes" table (markdown): per figure, rows user µs, kernel µs (and
    the kernel's share), syscalls per unit; columns = the proxy paths."""
    cols = [p for p in paths if p != "direct"
            and any(p in row[k] for row in split.values() for k in ("user", "syscalls"))]
    if not split or not cols:
        return []
    lines = ["where the CPU goes (medians; proxy user time = utime, kernel time = stime of "
             "its processes, /proc/PID/stat; syscalls = perf raw_syscalls:sys_enter):",
             "| figure | " + " | ".join(cols) + " |",
             "| --- |" + " ---: |" * len(cols)]
    dec_of = {key: dec for key, _, _, _, _, dec in CPU_SPLIT}
    label_of = {key: label for key, label, *_ in CPU_SPLIT}
    for key, row in split.items():
        label, dec = label_of[key].format(flows=flows), dec_of[key]
        unit = "µs" if row["unit"] == "us" else "ms"

        def cells(part: str, d: int, share: bool = False) -> list[str]:
            out = []
            for p in cols:
                v = row[part].get(p)
                if v is None:
                    out.append("–")
                    continue
                text = f"{v:,.{d}f}"
                tot = row["user"].get(p, 0.0) + row["kernel"].get(p, 0.0)
                if share and tot > 0:
                    text += f" ({100 * v / tot:.0f} %)"
                out.append(text)
            return out
        if row["user"]:
            lines.append(f"| {label}: user {unit} | " + " | ".join(cells("user", dec)) + " |")
            lines.append(f"| {label}: kernel {unit} | "
                         + " | ".join(cells("kernel", dec, share=True)) + " |")
        if row["syscalls"]:
            lines.append(f"| {label}: syscalls | "
                         + " | ".join(cells("syscalls", dec + 1 if dec else 0)) + " |")
    if syscalls_note:
        lines.append(f"syscalls not counted: {syscalls_note}")
    return lines
