"""Facts of this host that both roles check: fds, splice, capabilities, port ranges, sockets, locks, DNS.

The parsers (``parse_*``) are pure: text of a /proc file in, values out. The
readers wrap them with the real files; the probes (splice, DNS) touch only
objects they create and close again.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import random
import resource
import select
import socket
import time
from dataclasses import dataclass

from ..relay import dns
from ..relay import splice as relay_splice
from . import report as r

PROC = "/proc"
FD_BASELINE = 64  # the agent's own fds before any rule: log, loop, control channel, resolver sockets
CAP_NET_BIND_SERVICE = 10
# /proc/net/tcp "st" field (include/net/tcp_states.h)
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
SPLICE_FIX = ("relax the sandbox / seccomp / LSM policy that refuses splice(2), or accept the userspace "
              "fallback and silence proxy.splice_unsupported_fallback with PORTUNUS_DISABLE_SPLICE=1")
NOFILE_FIX = ("raise the limit: LimitNOFILE=131072 in the agent's systemd unit (deploy/systemd), or "
              "`ulimit -n` before starting it by hand; each listen port is one fd, each connection two")


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


# ------------------------------------------------------------------ RLIMIT_NOFILE

def effective_nofile(soft: int, hard: int) -> int:
    """The limit a starting agent ends up with: sysinfo.raise_nofile_limit lifts soft to hard."""
    if hard == resource.RLIM_INFINITY:
        return max(soft, 1 << 20)
    return max(soft, hard)


def parse_proc_limits(text: str) -> tuple[int, int] | None:
    """(soft, hard) "Max open files" of a /proc/PID/limits text."""
    for line in text.splitlines():
        if line.startswith("Max open files"):
            fields = line[len("Max open files"):].split()
            if len(fields) >= 2:
                def num(v: str) -> int:
                    return resource.RLIM_INFINITY if v == "unlimited" else int(v)
                try:
                    return num(fields[0]), num(fields[1])
                except ValueError:
                    return None
    return None


def check_nofile(limit: int, needs: dict[str, int], source: str, in_use: int | None = None) -> r.Check:
    """``needs``: what each rule (or the connections seen) takes in fds; ✗ above the limit, ⚠ above 80 %."""
    need = FD_BASELINE + sum(needs.values())
    details = {"limit": limit, "limit_source": source, "estimated_need": need,
               "need_breakdown": {"baseline": FD_BASELINE, **needs}}
    if in_use is not None:
        details["open_now"] = in_use
    if need > limit:
        return r.fail("limits.nofile", f"RLIMIT_NOFILE {limit} is below the estimated need of {need} fds",
                      NOFILE_FIX, details)
    if need > limit * 0.8:
        return r.warn("limits.nofile", f"RLIMIT_NOFILE {limit} leaves little room: estimated need {need} fds",
                      NOFILE_FIX, details)
    return r.ok("limits.nofile", f"RLIMIT_NOFILE {limit} covers the estimated need of {need} fds", details)


# ------------------------------------------------------------------ splice

def splice_probe() -> str | None:
    """Splice a few bytes from a socket pair into a pipe; None when it works, else the errno name."""
    if not relay_splice.splice_available():
        return "ENOSYS"
    a, b = socket.socketpair()
    rfd, wfd = os.pipe()
    try:
        a.sendall(b"portunus")
        n = os.splice(b.fileno(), wfd, 8, flags=relay_splice.SPLICE_FLAGS)
        if n != 8 or os.read(rfd, 8) != b"portunus":
            return "EIO"
        return None
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    finally:
        a.close()
        b.close()
        os.close(rfd)
        os.close(wfd)


def check_splice_kernel(errno_name: str | None) -> r.Check:
    if errno_name is None:
        return r.ok("splice.kernel", "the kernel accepts splice(2) from a socket into a pipe")
    return r.warn("splice.kernel", f"splice(2) refused ({errno_name}): connections fall back to the userspace "
                                   "path (proxy.splice_unsupported_fallback); forwarding works, peak throughput "
                                   "is lower", SPLICE_FIX, {"errno_name": errno_name})


def pipe_size_probe() -> tuple[bool, str | None]:
    """Whether this process may size a pipe to the 1 MiB the splice path asks for."""
    rfd, wfd = os.pipe()
    try:
        fcntl.fcntl(wfd, relay_splice.F_SETPIPE_SZ, relay_splice.PIPE_SIZE)
        return True, None
    except OSError as exc:
        return False, errno.errorcode.get(exc.errno, str(exc.errno))
    finally:
        os.close(rfd)
        os.close(wfd)


def check_pipe_max_size(sysctl_value: int | None, probe: tuple[bool, str | None]) -> r.Check:
    want = relay_splice.PIPE_SIZE
    details = {"pipe_max_size": sysctl_value, "requested_bytes": want}
    fix = (f"sysctl -w fs.pipe-max-size={want} (and persist it in /etc/sysctl.d/), or accept reduced "
           "peak throughput")
    if sysctl_value is not None and sysctl_value < want:
        if probe[0]:
            details["note"] = "this process may exceed it (privileged); an unprivileged agent may not"
        return r.warn("splice.pipe_size", f"/proc/sys/fs/pipe-max-size is {sysctl_value}, below the 1 MiB the "
                                          "splice path asks for (proxy.splice_pipe_size_failed)", fix, details)
    if not probe[0]:
        details["errno_name"] = probe[1]
        return r.warn("splice.pipe_size", f"sizing a pipe to 1 MiB failed ({probe[1]}); splice runs with the "
                                          "kernel default pipe size", fix, details)
    return r.ok("splice.pipe_size", f"pipes can be sized to 1 MiB (pipe-max-size {sysctl_value})", details)


def parse_environ(text: str) -> dict[str, str]:
    """A /proc/PID/environ text (NUL-separated NAME=value)."""
    return dict(item.partition("=")[::2] for item in text.split("\x00") if "=" in item)


def check_splice_env(env, whose: str = "this shell") -> r.Check:
    value = env.get("PORTUNUS_DISABLE_SPLICE")
    details = {"environment_of": whose, "PORTUNUS_DISABLE_SPLICE": value}
    if value is None:
        return r.ok("splice.env", "PORTUNUS_DISABLE_SPLICE is not set: eligible TCP rules use splice", details)
    if value == "1":
        return r.warn("splice.env", "PORTUNUS_DISABLE_SPLICE=1: every connection takes the userspace path",
                      "unset PORTUNUS_DISABLE_SPLICE in the agent's environment unless you are triaging", details)
    return r.warn("splice.env", f"PORTUNUS_DISABLE_SPLICE={value!r} has no effect (only 1 disables splice)",
                  "unset it, or set it to 1 to force the userspace path", details)


# ------------------------------------------------------------------ capabilities and port ranges

def parse_cap_eff(status_text: str) -> int | None:
    """The CapEff bit mask of a /proc/PID/status text."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            try:
                return int(line.split()[1], 16)
            except (IndexError, ValueError):
                return None
    return None


def check_privileged_ports(ports: list[int], cap_eff: int | None, unprivileged_start: int | None,
                           whose: str) -> r.Check:
    """Listen ports below ip_unprivileged_port_start need CAP_NET_BIND_SERVICE."""
    start = 1024 if unprivileged_start is None else unprivileged_start
    low = sorted({p for p in ports if p < start})
    has_cap = cap_eff is not None and bool(cap_eff >> CAP_NET_BIND_SERVICE & 1)
    details = {"ports_below_start": _ports_text(low) or "(none)", "ip_unprivileged_port_start": start,
               "cap_net_bind_service": has_cap, "checked_process": whose}
    if not low:
        return r.ok("ports.privileged", f"no listen port below {start}: no capability needed", details)
    if has_cap:
        return r.ok("ports.privileged", f"{len(low)} port(s) below {start}, and {whose} has "
                                        "CAP_NET_BIND_SERVICE", details)
    return r.fail("ports.privileged", f"port(s) {_ports_text(low)} are below {start} and {whose} lacks "
                                      "CAP_NET_BIND_SERVICE: activation fails with permission_denied",
                  "run the agent with AmbientCapabilities=CAP_NET_BIND_SERVICE (the shipped unit does), or "
                  "use ports >= 1024", details)


def parse_port_range(text: str | None) -> tuple[int, int] | None:
    try:
        lo, hi = (int(x) for x in (text or "").split())
        return lo, hi
    except ValueError:
        return None


def check_ephemeral_ports(ports: list[int], port_range: tuple[int, int] | None) -> r.Check:
    if port_range is None:
        return r.skip("ports.ephemeral", "net.ipv4.ip_local_port_range is not readable")
    lo, hi = port_range
    inside = sorted({p for p in ports if lo <= p <= hi})
    details = {"ip_local_port_range": f"{lo}-{hi}", "listen_ports_inside": _ports_text(inside) or "(none)"}
    if not inside:
        return r.ok("ports.ephemeral", f"no listen port inside the ephemeral range {lo}-{hi}", details)
    return r.warn("ports.ephemeral", f"listen port(s) {_ports_text(inside)} lie inside the ephemeral range "
                                     f"{lo}-{hi}: any outgoing connection may hold one and make a later bind "
                                     "fail with port_in_use",
                  f"move the rules below {lo}, or reserve the ports: sysctl -w "
                  f"net.ipv4.ip_local_reserved_ports={_ports_text(inside)}", details)


def _ports_text(ports: list[int], limit: int = 12) -> str:
    """Compact runs: 80, 443, 30000-30099."""
    runs: list[list[int]] = []
    for p in sorted(set(ports)):
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    return ",".join(parts[:limit]) + (f",… ({len(parts) - limit} more)" if len(parts) > limit else "")


# ------------------------------------------------------------------ sockets (/proc/net)

@dataclass(frozen=True)
class SocketEntry:
    proto: str  # tcp or udp
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    state: str
    inode: int


def _hex_addr(text: str) -> tuple[str, int]:
    addr, _, port = text.partition(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        ip = str(ipaddress.IPv4Address(raw[::-1]))
    else:  # four 32-bit words, each in host (little-endian) order
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        v6 = ipaddress.IPv6Address(words)
        ip = str(v6.ipv4_mapped) if v6.ipv4_mapped else str(v6)
    return ip, int(port, 16)


def parse_proc_net(text: str, proto: str) -> list[SocketEntry]:
    """Entries of /proc/net/{tcp,tcp6,udp,udp6}; unparsable lines are skipped."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        try:
            lip, lport = _hex_addr(f[1])
            rip, rport = _hex_addr(f[2])
            state = int(f[3], 16)
            inode = int(f[9])
        except ValueError:
            continue
        name = TCP_STATES.get(state, str(state)) if proto == "tcp" else ("UNCONN" if state == 7 else "ESTABLISHED")
        out.append(SocketEntry(proto, lip, lport, rip, rport, name, inode))
    return out


def read_sockets() -> list[SocketEntry]:
    out = []
    for name, proto in (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")):
        text = read_text(os.path.join(PROC, "net", name))
        if text:
            out += parse_proc_net(text, proto)
    return out


def socket_owners(inodes: set[int], cmdline_hint: str = "portunus") -> dict[int, int]:
    """socket inode -> pid of another process whose command line mentions ``cmdline_hint``."""
    found: dict[int, int] = {}
    try:
        pids = [int(p) for p in os.listdir(PROC) if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if pid == os.getpid():
            continue  # the doctor's own probe connection
        cmdline = read_text(os.path.join(PROC, str(pid), "cmdline")) or ""
        if cmdline_hint not in cmdline:
            continue
        fd_dir = os.path.join(PROC, str(pid), "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in inodes:
                    found[inode] = pid
    return found


def process_socket_inodes(pid: int) -> tuple[set[int], int]:
    """(socket inodes, number of open fds) of a process."""
    fd_dir = os.path.join(PROC, str(pid), "fd")
    inodes, count = set(), 0
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return inodes, 0
    for fd in fds:
        count += 1
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes, count


def count_fds(pid: int) -> int | None:
    """Open fds of a process (a new fd takes the lowest free number, so also about the next fd's number)."""
    try:
        return len(os.listdir(os.path.join(PROC, str(pid), "fd")))
    except OSError:
        return None


# ------------------------------------------------------------------ locks (/proc/locks)

@dataclass(frozen=True)
class LockEntry:
    kind: str  # FLOCK, POSIX, OFDLCK
    mode: str  # READ or WRITE
    pid: int
    major: int
    minor: int
    inode: int


def parse_proc_locks(text: str) -> list[LockEntry]:
    """``1: FLOCK  ADVISORY  WRITE 26120 fe:00:2150809 0 EOF`` lines; blocked waiters (``->``) skipped."""
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 6 or f[1] == "->":
            continue
        try:
            major, minor, inode = f[5].split(":")
            out.append(LockEntry(f[1], f[3], int(f[4]), int(major, 16), int(minor, 16), int(inode)))
        except ValueError:
            continue
    return out


def lock_holders(path: str, locks_text: str | None = None) -> list[int] | None:
    """Pids holding a lock on ``path``; None when /proc/locks cannot be read."""
    text = read_text(os.path.join(PROC, "locks")) if locks_text is None else locks_text
    if text is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return []
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    return [e.pid for e in parse_proc_locks(text) if e.inode == st.st_ino and (e.major, e.minor) == dev]


def pid_alive(pid) -> bool:
    from ..cli.api_client import _pid_alive
    return _pid_alive(pid)


def process_cmdline(pid: int) -> str:
    text = read_text(os.path.join(PROC, str(pid), "cmdline")) or ""
    return " ".join(text.split("\x00")).strip()


# ------------------------------------------------------------------ resolver servers

def classify_dns_reply(data: bytes, txid: int, name: str) -> str | None:
    """None when ``data`` is a usable answer (addresses or a clean NXDOMAIN), else why not."""
    try:
        dns.parse_response(data, txid, name, dns.QTYPE_A)
        return None
    except dns.DnsError as exc:
        return f"{exc.code}: {exc}"


def probe_dns_servers(servers: list[tuple[str, int]], name: str, timeout: float) -> dict[str, str | None]:
    """Ask every server for ``name`` (A) in parallel; "host:port" -> None (answers) or the failure."""
    results: dict[str, str | None] = {}
    pending: dict[int, tuple[socket.socket, str, int]] = {}
    for host, port in servers:
        label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        txid = random.randrange(0x10000)
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            s.connect((host, port))
            s.send(dns.build_query(name, dns.QTYPE_A, txid))
        except OSError as exc:
            results[label] = f"send failed: {exc.strerror or exc}"
            s.close()
            continue
        pending[s.fileno()] = (s, label, txid)
    deadline = time.monotonic() + timeout
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            readable, _, _ = select.select([p[0] for p in pending.values()], [], [], left)
            for s in readable:
                _, label, txid = pending.pop(s.fileno())
                try:
                    data = s.recv(4096)
                except OSError as exc:
                    results[label] = f"no answer: {exc.strerror or exc}"
                else:
                    results[label] = classify_dns_reply(data, txid, name)
                s.close()
        for s, label, _ in pending.values():
            results[label] = f"no answer within {timeout:g} s"
    finally:
        for s, _, _ in pending.values():
            s.close()
    return results


def check_dns_servers(results: dict[str, str | None], source: str, needed_for: list[str]) -> r.Check:
    """✗ only when a name the agent must resolve depends on servers that do not answer."""
    answering = [k for k, v in results.items() if v is None]
    failing = {k: v for k, v in results.items() if v is not None}
    details = {"servers": list(results), "source": source, "answering": answering, "failing": failing,
               "names_to_resolve": needed_for}
    fix = ("check the servers with `dig @SERVER NAME` from this host; point the agent at working ones with "
           "--dns-server / PORTUNUS_DNS_SERVERS, or fix /etc/resolv.conf")
    if not results:
        return r.skip("dns.servers", "no DNS server configured", details)
    if not failing:
        return r.ok("dns.servers", f"{len(answering)} DNS server(s) answer", details)
    if answering:
        return r.warn("dns.servers", f"{len(failing)} of {len(results)} DNS server(s) do not answer; lookups "
                                     "wait for them before trying the next", fix, details)
    if needed_for:
        return r.fail("dns.servers", "no DNS server answers, and the agent must resolve "
                                     f"{', '.join(needed_for[:3])}: rule.dns_failed on each new connection",
                      fix, details)
    return r.warn("dns.servers", "no DNS server answers (nothing needs one now: every name is an IP literal or "
                                 "in /etc/hosts)", fix, details)

