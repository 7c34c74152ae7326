"""portbench: the Portunus benchmark (SPEC §11), behind `bench/run.py`.

Standard library only (Python >= 3.11); imports nothing from `portunus` (it runs the
product as a child process, like a user would). Single-threaded except the thread-per-
connection echo servers that `bench/control_plane.py` uses.

Modules, lowest first (each imports only the ones above it):
  procs       child processes in their own session, free ports, readiness via /proc/net
  machine     /proc/stat host load, machine and tool versions
  logscan     JSON-lines log scanning (warn/error events, tracebacks, event counts)
  mmsg        batched UDP I/O (recvmmsg/sendmmsg via ctypes) for the generator and echo
  syscount    --syscalls: perf stat -e raw_syscalls:sys_enter on the proxy over a window
  origins     the backends: nginx / Python HTTP origin, UDP echo, iperf3 server, TCP echo
  tools       iperf3 / wrk / UDP load runners and their pure output parsers
  deployment  a real server plus one enrolled client (client paths, control_plane.py)
  product     the --bin command: resolve it, derive role commands, probe --check
  paths       the forwarding paths under test (direct, portunus, client, haproxy,
              nginx, rinetd, socat) and their generated configs
  report      metric table, summary, side-by-side table, best peer, ratios, goals,
              where the CPU goes (user/kernel/syscalls), baseline comparison and gate
              (pure formatting)
  runner      measures one path: sanity check, then tcp/http/udp groups
  cli         argparse and `main` (entry point: bench/run.py)

This file holds the names every module shares.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO = BENCH_DIR.parent
LOOPBACK = "127.0.0.1"          # the only address the benchmarks ever use


class BenchError(Exception):
    """A measurement or a path could not be run; reported per path, never a traceback."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
