"""The machine the run is on: whole-host CPU load (/proc/stat), CPU model, tool versions."""

from __future__ import annotations

import os
import platform
import subprocess
import time

from . import REPO


def stat_snap() -> tuple[int, int] | None:
    """(total jiffies, idle+iowait jiffies) over all CPUs, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(v[:8]), v[3] + (v[4] if len(v) > 4 else 0)


def busy_pct_between(a: tuple[int, int] | None, b: tuple[int, int] | None) -> float | None:
    """Whole-machine CPU busy % between two stat_snap() readings (100 % = every core)."""
    if not a or not b:
        return None
    return 100.0 * (1 - (b[1] - a[1]) / max(b[0] - a[0], 1))


def host_busy_pct(secs: float = 1.0) -> float | None:
    """Whole-machine CPU busy % over `secs`."""
    a = stat_snap()
    time.sleep(secs)
    return busy_pct_between(a, stat_snap())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _tool_version(argv: list[str]) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def machine_info() -> dict:
    return {
        "hostname": platform.node(), "nproc": os.cpu_count(), "cpu_model": _cpu_model(),
        "kernel": platform.release(), "python": platform.python_version(),
        "iperf3": _tool_version(["iperf3", "--version"]), "wrk": _tool_version(["wrk", "--version"]),
        "haproxy": _tool_version(["haproxy", "-v"]), "git": _git_revision(),
    }


def print_machine_load(secs: float = 1.0) -> dict:
    """Print and return the load average and the host busy % over `secs`: the feature benches
    (sni.py, ratelimit.py, quota.py) start with it, since figures taken under load are noisy."""
    load = {"loadavg": list(os.getloadavg()), "host_busy_pct": host_busy_pct(secs), "cores": os.cpu_count()}
    busy = load["host_busy_pct"]
    print(f"machine load: loadavg {' '.join(f'{x:.2f}' for x in load['loadavg'])}, host busy "
          f"{'?' if busy is None else f'{busy:.0f}'} % over {secs:g} s ({load['cores']} cores)", flush=True)
    return load


def parse_udp_snmp(text: str) -> dict[str, int]:
    """The `Udp:` counters of /proc/net/snmp (header line, then values) as a dict."""
    rows = [ln.split() for ln in text.splitlines() if ln.startswith("Udp:")]
    if len(rows) < 2:
        return {}
    try:
        return dict(zip(rows[0][1:], (int(x) for x in rows[1][1:])))
    except ValueError:
        return {}


def udp_snmp() -> dict[str, int]:
    """Host-wide UDP counters now (RcvbufErrors: datagrams dropped because a receiving
    socket's buffer was full), {} where /proc/net/snmp cannot be read."""
    try:
        with open("/proc/net/snmp") as f:
            return parse_udp_snmp(f.read())
    except OSError:
        return {}


def parse_udp_drops(text: str, ports: set[int], column: str = "drops") -> dict[int, int]:
    """Per local port in `ports`: the summed `drops` column of /proc/net/udp sockets bound to
    it (cumulative over each socket's life); column="rx_queue": the bytes queued to read."""
    out: dict[int, int] = {}
    for ln in text.splitlines()[1:]:
        f = ln.split()
        if len(f) < 13 or ":" not in f[1] or ":" not in f[4]:
            continue
        try:
            port = int(f[1].rsplit(":", 1)[1], 16)
            v = int(f[12]) if column == "drops" else int(f[4].split(":")[1], 16)
        except ValueError:
            continue
        if port in ports:
            out[port] = out.get(port, 0) + v
    return out


def udp_drops(ports: set[int], column: str = "drops") -> dict[int, int]:
    try:
        with open("/proc/net/udp") as f:
            return parse_udp_drops(f.read(), ports, column)
    except OSError:
        return {}


def wait_udp_drained(ports: set[int], timeout: float = 3.0, quiet: float = 0.1) -> float:
    """Wait until no datagram is queued on the UDP sockets of `ports` for `quiet` seconds
    (a proxy still forwarding the previous test's backlog would feed it to the next
    one-shot iperf3 server, which takes a stale datagram for a new stream); at most
    `timeout`. Returns seconds waited."""
    t0 = time.monotonic()
    calm_since = None
    while True:
        now = time.monotonic()
        if any(udp_drops(ports, "rx_queue").values()):
            calm_since = None
        elif calm_since is None:
            calm_since = now
        if (calm_since is not None and now - calm_since >= quiet) or now - t0 > timeout:
            return now - t0
        time.sleep(0.02)
