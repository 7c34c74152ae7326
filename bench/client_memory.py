#!/usr/bin/env python3
"""Client memory (issue 15, SPEC §11): one client with a 1024-port range and N idle connections.

A real server and a real enrolled client (bench/portbench/deployment.py), or a standalone
with the same rule (`--mode standalone`), forwarding a `--ports`-wide listen range to ONE
echo origin that holds every connection open (a child process of this script, so its
descriptors are not the harness's). The harness opens the connections spread over every
port of the range, checks each echoes its own token (so every one is really forwarded),
then leaves them idle and reads the proxy's VmRSS / VmHWM and /proc/<pid>/smaps_rollup.

Each forwarded connection costs the proxy 2 descriptors (client side + origin side), so
the connections that fit are (RLIMIT_NOFILE - ports - 200) / 2; the run says how many it
opened and why. Reports RSS with no rules, with the range idle, with the N connections,
and the bytes per listener and per connection.

Prints a table and writes JSON (bench/results/client_memory.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

from portbench import REPO as ROOT               # bench/ is sys.path[0] when this file is run
from portbench.deployment import Deployment
from portbench.machine import print_machine_load
from portbench.procs import ChildProcess, free_block, proc_mem_kib
from portbench.product import script_command

TARGET_CONNS = 10_000
HEADROOM = 200  # descriptors a proxy holds besides listeners and connections (logs, epoll, control, ...)


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------- the origin (child process)

def serve_holding_echo(base: int, width: int) -> None:
    """On ports base..base+width-1: echo every byte back and keep the connection open until the
    peer closes it (a listen range needs a target range of the same width)."""
    raise_nofile()
    ep = select.epoll()
    listeners: dict[int, socket.socket] = {}
    for port in range(base, base + width):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        ls.listen(4096)
        ls.setblocking(False)
        listeners[ls.fileno()] = ls
        ep.register(ls.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    parent = os.getppid()
    print("ready", flush=True)
    while True:
        if os.getppid() != parent:
            return  # the harness is gone (killed, crashed): do not hold 1024 ports for ever
        for fd, _ev in ep.poll(1.0):
            ls = listeners.get(fd)
            if ls is not None:
                while True:
                    try:
                        c, _ = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    c.setblocking(False)
                    conns[c.fileno()] = c
                    ep.register(c.fileno(), select.EPOLLIN)
                continue
            c = conns.get(fd)
            if c is None:
                continue
            try:
                data = c.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                try:
                    c.send(data)
                except OSError:
                    pass
            else:
                ep.unregister(fd)
                conns.pop(fd).close()


def start_origin_block(width: int, log_path: Path) -> tuple[int, ChildProcess]:
    """A free block of `width` ports and the origin on it (another process may take one of the
    ports between the probe and the bind: then try another block)."""
    for _ in range(5):
        base = free_block(width)
        try:
            return base, start_origin(base, width, log_path)
        except RuntimeError:
            continue
    raise RuntimeError(f"origin did not start on 5 port blocks; see {log_path}")


def start_origin(base: int, width: int, log_path: Path) -> ChildProcess:
    with open(log_path, "a") as fh:
        p = ChildProcess("origin", log_path, [sys.executable, __file__, "--_origin", str(base), "--ports", str(width)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=fh, start_new_session=True)
    if p.stdout.readline().strip() != b"ready":
        p.kill()
        p.wait()
        raise RuntimeError(f"origin did not start; see {log_path}")
    return p


# ---------------------------------------------------------------- /proc readings

def mem(pid: int) -> dict:
    out = proc_mem_kib(pid)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("Pss", "Private_Dirty", "Anonymous"):
                    out["smaps_" + key] = int(val.split()[0])
    except OSError:
        pass
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def nofile_of(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise RuntimeError("no Max open files line")


def wait_listening(first: int, last: int, proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    for port in (first, last):
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"port {port} is not listening")
                time.sleep(0.02)
    time.sleep(0.3)  # those probe connections are closed and counted down


# ---------------------------------------------------------------- connections

def open_idle(base: int, width: int, n: int) -> list[socket.socket]:
    """n connections spread over the range; each echoes its own token before it goes idle."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", base + i % width), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    for i, s in enumerate(socks):
        s.sendall(b"%08d" % i)
    for i, s in enumerate(socks):
        got = b""
        while len(got) < 8:
            chunk = s.recv(8 - len(got))
            if not chunk:
                raise RuntimeError(f"connection {i} closed before its echo")
            got += chunk
        if got != b"%08d" % i:
            raise RuntimeError(f"connection {i} echoed {got!r}")
    return socks


def measure(pid: int, base: int, width: int, conns_wanted: int, out: dict) -> list[socket.socket]:
    out["proxy_nofile"] = limit = nofile_of(pid)
    fit = (limit - width - HEADROOM) // 2
    n = min(conns_wanted, fit)
    out["connections"] = n
    out["connections_note"] = (f"{n} of {conns_wanted}: RLIMIT_NOFILE {limit} - {width} listeners - {HEADROOM} "
                               f"headroom, 2 descriptors per connection" if n < conns_wanted else "")
    out["mem_range_idle"] = mem(pid)
    t0 = time.perf_counter()
    socks = open_idle(base, width, n)
    out["open_and_echo_s"] = time.perf_counter() - t0
    time.sleep(1.0)
    out["mem_with_conns"] = mem(pid)
    a, b = out["mem_range_idle"], out["mem_with_conns"]
    out["bytes_per_connection"] = (b["VmRSS"] - a["VmRSS"]) * 1024 / max(n, 1)
    if "mem_no_rules" in out:
        out["bytes_per_listener"] = (a["VmRSS"] - out["mem_no_rules"]["VmRSS"]) * 1024 / width
    return socks


def run_client(cmd: list[str], width: int, conns: int, tmp: Path) -> dict:
    out: dict = {"mode": "client", "ports": width}
    origin_port, origin = start_origin_block(width, tmp / "origin.log")
    (tmp / "dep").mkdir()
    d = Deployment(cmd, str(tmp / "dep"))
    socks: list[socket.socket] = []
    try:
        d.start_server()
        d.enroll_and_start_client()
        pid = d.client_proc.pid
        time.sleep(1.0)
        out["mem_no_rules"] = mem(pid)
        for attempt in range(3):  # a port of the block may be taken between the probe and the bind
            base = free_block(width)
            t0 = time.perf_counter()
            try:
                status, rule = d.call("POST", "/v1/rules", {
                    "client": d.CLIENT_NAME, "listen": f"{base}-{base + width - 1}",
                    "target": f"127.0.0.1:{origin_port}-{origin_port + width - 1}"})
            except urllib.error.HTTPError as exc:
                if attempt == 2:
                    raise RuntimeError(f"push: {exc.code} {exc.read()[:300]!r}") from None
                continue
            out["push_range_ms"] = (time.perf_counter() - t0) * 1000
            if status == 201:
                break
            raise RuntimeError(f"push: {status} {rule}")
        wait_listening(base, base + width - 1, d.client_proc)
        time.sleep(1.0)
        socks = measure(pid, base, width, conns, out)
        _, stats = d.call("GET", f"/v1/rules/{rule['rule_id']}/stats")
        out["reported_active_connections"] = stats.get("active_connections")
    finally:
        for s in socks:
            s.close()
        d.close()
        origin.kill()
        origin.wait()
    return out


def run_standalone(cmd: list[str], width: int, conns: int, tmp: Path) -> dict:
    out: dict = {"mode": "standalone", "ports": width}
    origin_port, origin = start_origin_block(width, tmp / "origin.log")
    socks: list[socket.socket] = []
    base = free_block(width)
    cfg = tmp / "standalone.toml"
    cfg.write_text('[global]\nlog_level = "info"\nlog_format = "json"\nshutdown_drain_secs = 1\n\n'
                   f'[[rule]]\nname = "wide"\nlisten_ports = "{base}-{base + width - 1}"\n'
                   f'target = "127.0.0.1:{origin_port}-{origin_port + width - 1}"\n')
    log_path = tmp / "standalone.log"
    with open(log_path, "a") as fh:
        p = ChildProcess("standalone", log_path, cmd + ["standalone", "--config", str(cfg)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True)
    try:
        wait_listening(base, base + width - 1, p)
        time.sleep(1.0)
        socks = measure(p.pid, base, width, conns, out)
    finally:
        for s in socks:
            s.close()
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        origin.kill()
        origin.wait()
    return out


def print_table(results: list[dict]) -> None:
    mib = lambda kib: f"{kib / 1024:.1f} MiB"  # noqa: E731
    for r in results:
        print(f"-- {r['mode']}: {r['ports']} ports, {r['connections']} idle connections "
              f"(fd limit {r['proxy_nofile']}) {r['connections_note']}")
        if "mem_no_rules" in r:
            print(f"   RSS no rules             {mib(r['mem_no_rules']['VmRSS'])}")
        print(f"   RSS range idle           {mib(r['mem_range_idle']['VmRSS'])}")
        print(f"   RSS + connections        {mib(r['mem_with_conns']['VmRSS'])}  (HWM {mib(r['mem_with_conns']['VmHWM'])}"
              f", anon {mib(r['mem_with_conns'].get('RssAnon', 0))})")
        if "bytes_per_listener" in r:
            print(f"   per listener             {r['bytes_per_listener']:.0f} B")
        print(f"   per connection           {r['bytes_per_connection']:.0f} B")
        print(f"   open + echo all          {r['open_and_echo_s']:.2f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "dist" / "portunus"), help="the zipapp (default dist/portunus)")
    ap.add_argument("--source", action="store_true", help="run the source tree (python -m portunus) instead")
    ap.add_argument("--mode", choices=("client", "standalone", "both"), default="both")
    ap.add_argument("--ports", type=int, default=1024)
    ap.add_argument("--connections", type=int, default=TARGET_CONNS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "client_memory.json"))
    ap.add_argument("--_origin", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._origin:
        serve_holding_echo(args._origin, args.ports)
        return 0
    raise_nofile()
    load = print_machine_load()
    cmd = script_command(args.bin, args.source)
    results = []
    with tempfile.TemporaryDirectory(prefix="portunus-mem-") as tmp:
        for mode in (("client", "standalone") if args.mode == "both" else (args.mode,)):
            d = Path(tmp) / mode
            d.mkdir()
            fn = run_client if mode == "client" else run_standalone
            results.append(fn(cmd, args.ports, args.connections, d))
    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine_load": load, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
