"""Target name resolution on the loop: a DNS stub client with a bounded TTL cache.

IP literals never touch the resolver; ``/etc/hosts`` names answer at once. Other
names are asked of the configured DNS servers (default: ``/etc/resolv.conf``)
with non-blocking UDP sockets on the loop (TCP when an answer is truncated), A
and AAAA in parallel, so nothing blocks the reactor and no thread is needed.

SPEC §2.5: answers are cached for their TTL clamped to [5 s, 300 s]; one lookup
per name at a time (single-flight); after a failed refresh the last good answer
is served for a 30 s grace; a failing name is retried at most every 3 s; at
most 64 lookups are in flight (beyond that, fail fast); the cache holds at most
8192 names and evicts expired entries first, then those closest to expiry.
"""

from __future__ import annotations

import errno
import os
import random
import socket
from typing import Callable

from ..log import log
from ..model import is_ip_literal
from . import dns

TTL_FLOOR = 5.0
TTL_CEIL = 300.0
STALE_GRACE = 30.0
RETRY_SPACING = 3.0
MAX_IN_FLIGHT = 64
CACHE_MAX = 8192
QUERY_TIMEOUT = 2.0
HOSTS_RECHECK = 5.0

Callback = Callable[[list, "str | None"], None]  # (addresses [(family, ip)], error)


def parse_servers(values) -> list[tuple[str, int]]:
    """``["10.0.0.2", "127.0.0.1:5353", "[::1]:53"]`` -> [(host, port)], for config surfaces."""
    out = []
    for v in values:
        v = v.strip()
        if v.startswith("["):
            host, _, port = v[1:].partition("]")
            port = port.lstrip(":") or "53"
        elif v.count(":") == 1:
            host, port = v.split(":")
        else:
            host, port = v, "53"
        if not is_ip_literal(host) or not port.isdigit() or not 1 <= int(port) <= 65535:
            from ..errors import PortunusError
            raise PortunusError("validation.invalid_dns_server",
                                f"DNS server must be an IP address with an optional :port, got {v!r}")
        out.append((host, int(port)))
    return out


class _Entry:
    __slots__ = ("addrs", "expires", "stale_until", "failed_at", "error")

    def __init__(self):
        self.addrs: list[tuple[int, str]] = []
        self.expires = 0.0
        self.stale_until = 0.0
        self.failed_at = -1e9
        self.error: str | None = None


class _Lookup:
    """A and AAAA for one name, over UDP (TCP on truncation), walking the servers."""

    def __init__(self, resolver: "Resolver", name: str):
        self.r = resolver
        self.loop = resolver.loop
        self.name = name
        self.results: dict[int, tuple[list[str], int | None] | str] = {}
        self.server_index = 0
        self.sock: socket.socket | None = None
        self.txids: dict[int, int] = {}
        self.timer = None
        self.tcp: dict[int, socket.socket] = {}
        self.done = False

    def start(self) -> None:
        self._send_udp()

    def _server(self) -> tuple[str, int]:
        servers = self.r.servers()
        return servers[self.server_index % len(servers)]

    def _server_label(self) -> str:
        """``127.0.0.1:5399`` / ``[::1]:53``: a failure reason names the port too (it may not be 53)."""
        host, port = self._server()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _send_udp(self) -> None:
        self._close_udp()
        host, port = self._server()
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.socket(fam, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect((host, port))
        except OSError as exc:
            self._fail_all(f"cannot reach DNS server {self._server_label()}: {exc.strerror or exc}")
            return
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._on_udp)
        for qtype in (dns.QTYPE_A, dns.QTYPE_AAAA):
            if qtype in self.results:
                continue
            txid = random.getrandbits(16)
            self.txids[qtype] = txid
            try:
                sock.send(dns.build_query(self.name, qtype, txid))
            except dns.DnsError as exc:
                self._fail_all(exc.message)
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    # the ICMP error of the previous send surfaces here and is consumed, so
                    # recv will never see it: move on now rather than after a whole timeout
                    self._next_server(f"DNS server {self._server_label()} unreachable")
                    return
                # anything else shows up as a timeout
        self.timer = self.loop.call_later(QUERY_TIMEOUT, self._on_timeout)

    def _on_udp(self) -> None:
        while self.sock is not None:
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    self._next_server(f"DNS server {self._server_label()} unreachable")
                return
            for qtype, txid in list(self.txids.items()):
                if qtype in self.results:
                    continue
                try:
                    ans = dns.parse_response(data, txid, self.name, qtype)
                except dns.DnsError as exc:
                    if exc.code == "mismatch":
                        continue  # not the answer to this question
                    self.results[qtype] = f"{exc.code}: {exc.message} (DNS server {self._server_label()})"
                    break
                if ans.truncated:
                    self._query_tcp(qtype)
                else:
                    self.results[qtype] = (ans.addresses, ans.ttl)
                break
            self._maybe_finish()

    def _query_tcp(self, qtype: int) -> None:
        # the UDP timeout no longer applies: give the TCP exchange its own, longer budget
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(2 * QUERY_TIMEOUT, self._fail_all,
                                          f"DNS query over TCP to {self._server_label()} timed out")
        host, port = self._server()
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setblocking(False)
        self.tcp[qtype] = sock
        txid = random.getrandbits(16)
        self.txids[qtype] = txid
        query = dns.frame_tcp(dns.build_query(self.name, qtype, txid))
        reader = dns.TcpReader()
        rc = sock.connect_ex((host, port))
        if rc not in (0, errno.EINPROGRESS):
            self.results[qtype] = f"tcp connect to {self._server_label()} failed: {errno.errorcode.get(rc, rc)}"
            self._close_tcp(qtype)
            return

        def writable() -> None:
            self.loop.remove_writer(sock.fileno())
            try:
                sock.send(query)
            except OSError as exc:
                self.results[qtype] = f"tcp send failed: {exc.strerror}"
                self._close_tcp(qtype)
                self._maybe_finish()
                return
            self.loop.add_reader(sock.fileno(), readable)

        def readable() -> None:
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                return
            except OSError as exc:
                data, err = b"", exc.strerror
            else:
                err = "connection closed"
            msg = reader.feed(data) if data else None
            if msg is None and data:
                return
            if msg is None:
                self.results[qtype] = f"tcp: {err}"
            else:
                try:
                    ans = dns.parse_response(msg, txid, self.name, qtype)
                    self.results[qtype] = (ans.addresses, ans.ttl)
                except dns.DnsError as exc:
                    self.results[qtype] = f"{exc.code}: {exc.message} (DNS server {self._server_label()})"
            self._close_tcp(qtype)
            self._maybe_finish()
        self.loop.add_writer(sock.fileno(), writable)

    def _close_tcp(self, qtype: int) -> None:
        sock = self.tcp.pop(qtype, None)
        if sock is not None:
            self.loop.forget(sock.fileno())
            sock.close()

    def _on_timeout(self) -> None:
        self.timer = None
        self._next_server(f"DNS query to {self._server_label()} timed out")

    def _next_server(self, reason: str) -> None:
        self.server_index += 1
        if self.server_index >= max(2, len(self.r.servers())):
            for qtype in (dns.QTYPE_A, dns.QTYPE_AAAA):
                self.results.setdefault(qtype, reason)
            self._maybe_finish()
        else:
            self._send_udp()

    def _fail_all(self, reason: str) -> None:
        for qtype in (dns.QTYPE_A, dns.QTYPE_AAAA):
            self.results.setdefault(qtype, reason)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.done or len(self.results) < 2:
            return
        self.done = True
        self._close_udp()
        for qtype in list(self.tcp):
            self._close_tcp(qtype)
        addrs, ttls, errors = [], [], []
        for qtype, fam in ((dns.QTYPE_A, socket.AF_INET), (dns.QTYPE_AAAA, socket.AF_INET6)):
            res = self.results[qtype]
            if isinstance(res, str):
                errors.append(res)
                continue
            found, ttl = res
            addrs += [(fam, a) for a in found]
            if found and ttl is not None:
                ttls.append(ttl)
        if addrs:
            ttl = min(ttls) if ttls else TTL_FLOOR
            self.r._finished(self.name, addrs, None, ttl)
        else:
            self.r._finished(self.name, [], errors[0] if errors else "no such host", None)

    def abandon(self) -> None:
        self.done = True
        self._close_udp()
        for qtype in list(self.tcp):
            self._close_tcp(qtype)

    def _close_udp(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            self.loop.forget(self.sock.fileno())
            self.sock.close()
            self.sock = None


class Resolver:
    def __init__(self, loop, servers: list[tuple[str, int]] | None = None, *,
                 resolv_conf: str = "/etc/resolv.conf", hosts_path: str = "/etc/hosts"):
        self.loop = loop
        self._servers = servers
        self.resolv_conf = resolv_conf
        self.hosts_path = hosts_path
        self._hosts: dict[str, list[str]] = {}
        self._hosts_mtime = None
        self._hosts_checked = -1e9
        self._cache: dict[str, _Entry] = {}
        self._waiters: dict[str, list[Callback]] = {}
        self.lookups = 0  # real lookups started (observable in tests and benchmarks)
        self._active: set[_Lookup] = set()

    def servers(self) -> list[tuple[str, int]]:
        if not self._servers:
            self._servers = dns.read_resolv_conf(self.resolv_conf)
        return self._servers

    def _hosts_lookup(self, name: str) -> list[tuple[int, str]] | None:
        now = self.loop.time()
        if now - self._hosts_checked >= HOSTS_RECHECK:
            self._hosts_checked = now
            try:
                mtime = os.stat(self.hosts_path).st_mtime
            except OSError:
                mtime = None
            if mtime != self._hosts_mtime:
                self._hosts_mtime = mtime
                self._hosts = dns.read_hosts(self.hosts_path) if mtime is not None else {}
        found = self._hosts.get(name)
        if not found:
            return None
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, a) for a in found]

    def resolve(self, host: str, prefer_ipv6: bool, callback: Callback) -> None:
        """Call ``callback(addrs, error)`` on the loop (at once on a cache hit)."""
        if is_ip_literal(host):
            callback([(socket.AF_INET6 if ":" in host else socket.AF_INET, host)], None)
            return
        name = host.lower().rstrip(".")
        from_hosts = self._hosts_lookup(name)
        if from_hosts:
            callback(_order(from_hosts, prefer_ipv6), None)
            return
        now = self.loop.time()
        entry = self._cache.get(name)
        if entry is not None:
            if entry.addrs and now < entry.expires:
                callback(_order(entry.addrs, prefer_ipv6), None)
                return
            if now - entry.failed_at < RETRY_SPACING:
                if entry.addrs and now < entry.stale_until:
                    callback(_order(entry.addrs, prefer_ipv6), None)
                else:
                    callback([], entry.error)
                return

        def deliver(addrs, err) -> None:
            callback(_order(addrs, prefer_ipv6), err)
        waiters = self._waiters.get(name)
        if waiters is not None:
            waiters.append(deliver)
            return
        if len(self._waiters) >= MAX_IN_FLIGHT:
            if entry is not None and entry.addrs and now < entry.stale_until:
                callback(_order(entry.addrs, prefer_ipv6), None)
            else:
                callback([], "resolver busy: 64 lookups already in flight")
            return
        self._waiters[name] = [deliver]
        self.lookups += 1
        lookup = _Lookup(self, name)
        self._active.add(lookup)
        lookup.start()

    def _finished(self, name: str, addrs: list, err: str | None, ttl: int | None) -> None:
        self._active = {lk for lk in self._active if not lk.done}
        now = self.loop.time()
        entry = self._cache.get(name)
        if entry is None:
            self._evict_if_full(now)
            entry = self._cache[name] = _Entry()
        if addrs:
            ttl = min(max(float(ttl if ttl is not None else TTL_FLOOR), TTL_FLOOR), TTL_CEIL)
            entry.addrs = addrs
            entry.expires = now + ttl
            entry.stale_until = entry.expires + STALE_GRACE
            entry.error = None
            entry.failed_at = -1e9
        else:
            entry.error = err
            entry.failed_at = now
            if entry.addrs and now < entry.stale_until:
                log.info("dns.serving_stale", host=name, reason=err,
                         stale_for_secs=round(entry.stale_until - now, 1))
                addrs, err = entry.addrs, None
            else:
                entry.addrs = []
        for cb in self._waiters.pop(name, []):
            try:
                cb(addrs, err)
            except Exception as exc:  # one broken waiter must not strand the others
                log.error("dns.callback_error", host=name, error=f"{type(exc).__name__}: {exc}")

    def _evict_if_full(self, now: float) -> None:
        if len(self._cache) < CACHE_MAX:
            return
        for h in [h for h, e in self._cache.items() if e.stale_until <= now and e.failed_at < now - RETRY_SPACING]:
            del self._cache[h]
        while len(self._cache) >= CACHE_MAX:
            victim = min(self._cache, key=lambda h: self._cache[h].expires)
            del self._cache[victim]

    def cache_size(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        """Abandon lookups in flight: their sockets and timers go; waiters are not called."""
        for lookup in list(self._active):
            lookup.abandon()
        self._active.clear()
        self._waiters.clear()


def _order(addrs: list, prefer_ipv6: bool) -> list:
    first = socket.AF_INET6 if prefer_ipv6 else socket.AF_INET
    return [a for a in addrs if a[0] == first] + [a for a in addrs if a[0] != first]
