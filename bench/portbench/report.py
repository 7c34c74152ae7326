"""The metrics, their summary, and everything the run prints: table, ratios,
errors/problems, baseline comparison. Pure: data in, lines out."""

from __future__ import annotations

import shlex
import statistics

ALL_PATHS = ["direct", "portunus-splice", "portunus-userspace", "client-splice", "client-userspace",
             "haproxy", "haproxy-splice"]
DEFAULT_PATHS = ["direct", "portunus-splice", "portunus-userspace", "client-splice",
                 "client-userspace", "haproxy"]
PORTUNUS_PATHS = {"portunus-splice", "portunus-userspace", "client-splice", "client-userspace"}
ALL_GROUPS = ["tcp", "http", "udp"]
# groups a path cannot carry: shown as "n/a", not as missing
NOT_APPLICABLE: dict[str, set] = {"haproxy": {"udp"}, "haproxy-splice": {"udp"}}

# name -> (group, unit, better, compared, label)
#   better: "higher" | "lower";  compared: take part in --compare
METRICS: dict[str, tuple[str, str, str, bool, str]] = {
    "tcp_bulk_gbps":          ("tcp", "Gbit/s", "higher", True,  "TCP bulk, 1 stream"),
    "tcp_bulk_rev_gbps":      ("tcp", "Gbit/s", "higher", True,  "TCP bulk, 1 stream, reverse (-R)"),
    "http_keepalive_rps":     ("http", "req/s", "higher", True,  "HTTP keep-alive"),
    "http_keepalive_p50_ms":  ("http", "ms",    "lower",  True,  "  latency p50"),
    "http_keepalive_p99_ms":  ("http", "ms",    "lower",  True,  "  latency p99"),
    "http_close_rps":         ("http", "conn/s", "higher", True, "HTTP new conn (Connection: close)"),
    "http_close_p50_ms":      ("http", "ms",    "lower",  True,  "  latency p50"),
    "http_close_p99_ms":      ("http", "ms",    "lower",  True,  "  latency p99"),
    "http_idle_rtt_p50_us":   ("http", "us",    "lower",  True,  "Idle request RTT p50 (1 conn)"),
    "http_idle_rtt_p99_us":   ("http", "us",    "lower",  True,  "Idle request RTT p99 (1 conn)"),
    "udp_1flow_pps":          ("udp", "pkt/s",  "higher", True,  "UDP echo, 1 flow"),
    "udp_1flow_loss_pct":     ("udp", "%",      "lower",  True,  "  loss"),
    "udp_manyflow_pps":       ("udp", "pkt/s",  "higher", True,  "UDP echo, N flows"),
    "udp_manyflow_loss_pct":  ("udp", "%",      "lower",  True,  "  loss"),
    # informational only (never compared)
    "proxy_startup_s":        ("meta", "s",     "lower",  False, "Proxy start -> listening"),
    "proxy_peak_rss_mib":     ("meta", "MiB",   "lower",  False, "Proxy peak RSS (VmHWM)"),
    "tcp_bulk_proxy_cpu_pct": ("tcp", "%",      "lower",  False, "Proxy CPU during TCP bulk"),
    "tcp_bulk_host_busy_pct": ("tcp", "%",      "lower",  False, "Host busy during TCP bulk"),
    "tcp_bulk_proxy_cpu_ms_per_gb": ("tcp", "ms/GB", "lower", False, "Proxy CPU per GB, TCP bulk"),
    "http_keepalive_proxy_cpu_pct": ("http", "%", "lower", False, "Proxy CPU during keep-alive"),
    "http_keepalive_proxy_cpu_us_per_req": ("http", "us", "lower", False, "Proxy CPU per keep-alive req"),
    "http_close_proxy_cpu_pct": ("http", "%",   "lower",  False, "Proxy CPU during new-conn"),
    "http_close_proxy_cpu_us_per_req": ("http", "us", "lower", False, "Proxy CPU per new connection"),
    "udp_manyflow_proxy_cpu_pct": ("udp", "%",  "lower",  False, "Proxy CPU during UDP N flows"),
}
# Loss is a percentage that is often 0 in the baseline; a relative threshold
# alone would flag 0.0 -> 0.01. It must also be this many points worse.
ABS_SLACK = {"udp_1flow_loss_pct": 1.0, "udp_manyflow_loss_pct": 1.0}
# rates shown as path/direct ratios
RATIO_METRICS = ("tcp_bulk_gbps", "tcp_bulk_rev_gbps", "http_keepalive_rps", "http_close_rps",
                 "udp_1flow_pps", "udp_manyflow_pps")
# SPEC §11: TCP bulk through portunus >= 60 % of direct
SPEC_TARGETS = {"portunus-splice/direct:tcp_bulk_gbps": 0.60,
                "client-splice/direct:tcp_bulk_gbps": 0.60}


def summarize(samples: dict) -> dict:
    """path -> metric -> samples  =>  path -> metric -> median, min, max, samples, unit, …"""
    out: dict = {}
    for path, metrics in samples.items():
        for m, vals in metrics.items():
            group, unit, better, compared, label = METRICS[m]
            out.setdefault(path, {})[m] = {
                "median": statistics.median(vals), "min": min(vals), "max": max(vals),
                "samples": vals, "unit": unit, "better": better, "compared": compared,
            }
    return out


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
        if not any(m in summary.get(p, {}) for p in paths):
            continue
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
    lines.append(f"machine: {m['nproc']} cpu {m['cpu_model']}, kernel {m['kernel']}, "
                 f"python {m['python']}, git {m['git']}; loadavg start "
                 f"{meta['loadavg_start'][0]:.2f} end {meta['loadavg_end'][0]:.2f}")
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
