"""Target name resolution off the loop thread, with a bounded single-flight cache.

IP literals never touch the resolver. Names are resolved by a small pool of worker
threads (``getaddrinfo``) that post results back with ``call_soon_threadsafe``.
The system resolver gives no TTL, so answers are cached for the floor (5 s);
after a failure the last good answer is served for a 30 s grace, and a failing
name is retried at most every 3 s.
"""

from __future__ import annotations

import queue
import socket
import threading
from typing import Callable

from ..model import is_ip_literal

TTL_FLOOR = 5.0
TTL_CEIL = 300.0
STALE_GRACE = 30.0
RETRY_SPACING = 3.0
MAX_IN_FLIGHT = 64
CACHE_MAX = 8192

Callback = Callable[[list, str | None], None]  # (addresses, error)


class _Entry:
    __slots__ = ("addrs", "expires", "stale_until", "failed_at", "error")

    def __init__(self):
        self.addrs: list[tuple[int, str]] = []  # (family, address)
        self.expires = 0.0
        self.stale_until = 0.0
        self.failed_at = 0.0
        self.error: str | None = None


class Resolver:
    def __init__(self, loop, workers: int = 4):
        self.loop = loop
        self._cache: dict[str, _Entry] = {}
        self._waiters: dict[str, list[Callback]] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self.lookups = 0  # how many real lookups were started (observable in tests)

    def _ensure_workers(self) -> None:
        if self._threads:
            return
        for i in range(self._workers):
            t = threading.Thread(target=self._work, name=f"portunus-resolver-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def resolve(self, host: str, prefer_ipv6: bool, callback: Callback) -> None:
        """Call ``callback(addrs, error)`` on the loop; addrs ordered by family preference."""
        if is_ip_literal(host):
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            callback([(fam, host)], None)
            return
        now = self.loop.time()
        entry = self._cache.get(host)
        if entry is not None:
            if entry.addrs and now < entry.expires:
                callback(_order(entry.addrs, prefer_ipv6), None)
                return
            if entry.error and not entry.addrs and now - entry.failed_at < RETRY_SPACING:
                callback([], entry.error)
                return
        waiters = self._waiters.get(host)
        if waiters is not None:
            waiters.append(lambda addrs, err: callback(_order(addrs, prefer_ipv6), err))
            return
        if len(self._waiters) >= MAX_IN_FLIGHT:
            if entry is not None and entry.addrs and now < entry.stale_until:
                callback(_order(entry.addrs, prefer_ipv6), None)
            else:
                callback([], "resolver busy (too many lookups in flight)")
            return
        self._waiters[host] = [lambda addrs, err: callback(_order(addrs, prefer_ipv6), err)]
        self.lookups += 1
        self._ensure_workers()
        self._jobs.put(host)

    def _work(self) -> None:
        while True:
            host = self._jobs.get()
            if host is None:
                return
            try:
                infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
                addrs, seen = [], set()
                for fam, _t, _p, _c, sa in infos:
                    if fam in (socket.AF_INET, socket.AF_INET6) and sa[0] not in seen:
                        seen.add(sa[0])
                        addrs.append((fam, sa[0]))
                err = None if addrs else "no addresses"
            except OSError as exc:
                addrs, err = [], str(exc) or type(exc).__name__
            self.loop.call_soon_threadsafe(self._done, host, addrs, err)

    def _done(self, host: str, addrs: list, err: str | None) -> None:
        now = self.loop.time()
        entry = self._cache.get(host)
        if entry is None:
            self._evict_if_full(now)
            entry = self._cache[host] = _Entry()
        if addrs:
            entry.addrs = addrs
            entry.expires = now + TTL_FLOOR
            entry.stale_until = entry.expires + STALE_GRACE
            entry.error = None
        else:
            entry.error = err
            entry.failed_at = now
            if entry.addrs and now < entry.stale_until:
                addrs, err = entry.addrs, None  # serve stale within the grace window
            else:
                entry.addrs = []
        for cb in self._waiters.pop(host, []):
            cb(addrs, err)

    def _evict_if_full(self, now: float) -> None:
        if len(self._cache) < CACHE_MAX:
            return
        expired = [h for h, e in self._cache.items() if e.stale_until <= now and h not in self._waiters]
        for h in expired:
            del self._cache[h]
        if len(self._cache) >= CACHE_MAX:
            victim = min(self._cache, key=lambda h: self._cache[h].expires)
            del self._cache[victim]

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


def _order(addrs: list, prefer_ipv6: bool) -> list:
    first = socket.AF_INET6 if prefer_ipv6 else socket.AF_INET
    return [a for a in addrs if a[0] == first] + [a for a in addrs if a[0] != first]
