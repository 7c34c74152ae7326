"""The reactor: epoll via ``selectors``, a timer heap, call_soon(_threadsafe), signals.

Everything on the data plane and the control channel is a callback on one Loop,
run by one thread. Other threads talk to it only through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import heapq
import os
import selectors
import signal
import threading
import time
import traceback
from collections import deque
from typing import Callable

from .log import log

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE


class Timer:
    """A scheduled callback; ``cancel()`` is O(1) (the heap entry is skipped later)."""

    __slots__ = ("when", "callback", "args", "cancelled", "_seq")

    def __init__(self, when: float, seq: int, callback: Callable, args: tuple):
        self.when = when
        self._seq = seq
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.callback = None
        self.args = ()

    def __lt__(self, other: "Timer") -> bool:
        return (self.when, self._seq) < (other.when, other._seq)


class _FdHandlers:
    __slots__ = ("reader", "writer", "registered")

    def __init__(self):
        self.reader: Callable | None = None
        self.writer: Callable | None = None
        self.registered = False  # whether the selector holds this fd (saves a map lookup per change)

    def mask(self) -> int:
        return (EVENT_READ if self.reader else 0) | (EVENT_WRITE if self.writer else 0)


class Loop:
    def __init__(self):
        self._selector = selectors.EpollSelector()
        self._handlers: dict[int, _FdHandlers] = {}
        self._timers: list[Timer] = []
        self._timer_seq = 0
        self._ready: deque = deque()
        self._threadsafe: deque = deque()
        self._running = False
        self._stopping = False
        self._thread_id: int | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_pending = False
        self.add_reader(self._wake_r, self._drain_wakeup)
        self._signals: dict[int, tuple] = {}

    # ---- time -------------------------------------------------------------
    @staticmethod
    def time() -> float:
        return time.monotonic()

    # ---- fd interest ------------------------------------------------------
    def _update(self, fd: int, handlers: _FdHandlers) -> None:
        mask = handlers.mask()
        if mask == 0:
            if handlers.registered:
                handlers.registered = False
                self._selector.unregister(fd)
            del self._handlers[fd]
        elif handlers.registered:
            self._selector.modify(fd, mask, handlers)
        else:
            self._selector.register(fd, mask, handlers)
            handlers.registered = True

    def add_reader(self, fd, callback: Callable) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        h = self._handlers.get(fd)
        if h is None:
            h = self._handlers[fd] = _FdHandlers()
        if h.reader is callback:
            return
        had = h.reader is not None
        h.reader = callback
        if had:
            return  # same mask, new callback: no syscall needed
        try:
            self._update(fd, h)
        except BaseException:
            self._rollback(fd, h, "reader")  # a stale entry would swallow a later add on a reused fd
            raise

    def remove_reader(self, fd) -> bool:
        fd = fd if isinstance(fd, int) else fd.fileno()
        h = self._handlers.get(fd)
        if h is None or h.reader is None:
            return False
        h.reader = None
        self._update(fd, h)
        return True

    def add_writer(self, fd, callback: Callable) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        h = self._handlers.get(fd)
        if h is None:
            h = self._handlers[fd] = _FdHandlers()
        if h.writer is callback:
            return
        had = h.writer is not None
        h.writer = callback
        if had:
            return
        try:
            self._update(fd, h)
        except BaseException:
            self._rollback(fd, h, "writer")
            raise

    def _rollback(self, fd: int, h: _FdHandlers, which: str) -> None:
        setattr(h, which, None)
        if h.mask() == 0 and not h.registered:
            self._handlers.pop(fd, None)

    def remove_writer(self, fd) -> bool:
        fd = fd if isinstance(fd, int) else fd.fileno()
        h = self._handlers.get(fd)
        if h is None or h.writer is None:
            return False
        h.writer = None
        self._update(fd, h)
        return True

    def forget(self, fd) -> None:
        """Drop every interest in ``fd`` (call before closing it)."""
        fd = fd if isinstance(fd, int) else fd.fileno()
        if fd < 0:
            return
        h = self._handlers.pop(fd, None)
        if h is not None:
            h.reader = h.writer = None  # an event already fetched for fd is now a no-op
            if h.registered:
                h.registered = False
                try:
                    self._selector.unregister(fd)
                except (KeyError, ValueError):
                    pass

    def watched_fds(self) -> int:
        return len(self._handlers)

    # ---- callbacks and timers --------------------------------------------
    def call_soon(self, callback: Callable, *args) -> None:
        self._ready.append((callback, args))

    def call_soon_threadsafe(self, callback: Callable, *args) -> None:
        self._threadsafe.append((callback, args))  # deque.append is atomic
        if not self._wake_pending:
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass
            except OSError:
                pass  # loop closed

    def call_later(self, delay: float, callback: Callable, *args) -> Timer:
        return self.call_at(self.time() + max(0.0, delay), callback, *args)

    def call_at(self, when: float, callback: Callable, *args) -> Timer:
        self._timer_seq += 1
        t = Timer(when, self._timer_seq, callback, args)
        heapq.heappush(self._timers, t)
        return t

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._wake_pending = False
        while self._threadsafe:
            self._ready.append(self._threadsafe.popleft())

    # ---- signals ----------------------------------------------------------
    def add_signal_handler(self, signum: int, callback: Callable, *args) -> None:
        """Deliver ``signum`` onto the loop as a normal callback (main thread only)."""
        previous = self._signals[signum][2] if signum in self._signals else signal.getsignal(signum)
        self._signals[signum] = (callback, args, previous)
        signal.signal(signum, self._on_signal)

    def remove_signal_handler(self, signum: int) -> None:
        entry = self._signals.pop(signum, None)
        if entry is not None:
            # put back what was there before (SIG_DFL would make e.g. SIGUSR1 fatal)
            previous = entry[2] if entry[2] is not None else signal.SIG_DFL
            signal.signal(signum, previous)

    def add_shutdown_handlers(self, drain: Callable[[str], None], force: Callable[[str], None]) -> None:
        """SIGTERM/SIGINT, the one two-signal shutdown of every role: the first signal calls
        ``drain(signame)`` (stop accepting, let live work finish); any later one ``force(signame)``."""
        stopping = []

        def on_signal(signame: str) -> None:
            if stopping:
                force(signame)
                return
            stopping.append(signame)
            drain(signame)
        self.add_signal_handler(signal.SIGTERM, on_signal, "SIGTERM")
        self.add_signal_handler(signal.SIGINT, on_signal, "SIGINT")

    def _on_signal(self, signum, _frame) -> None:
        entry = self._signals.get(signum)
        if entry is not None:
            self.call_soon_threadsafe(entry[0], *entry[1])

    # ---- running ----------------------------------------------------------
    def stop(self) -> None:
        """Stop after the current iteration; safe from any callback on the loop."""
        self._stopping = True

    def stop_threadsafe(self) -> None:
        self.call_soon_threadsafe(self.stop)

    def run(self) -> None:
        self._running = True
        self._stopping = False
        self._thread_id = threading.get_ident()
        try:
            while not self._stopping:
                self._run_once()
        finally:
            self._running = False

    def run_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Run until ``predicate()`` is true or ``timeout`` elapses (tests and drains)."""
        deadline = self.time() + timeout
        self._thread_id = threading.get_ident()
        while not predicate():
            if self.time() >= deadline:
                return False
            self._run_once(max_wait=min(0.05, deadline - self.time()))
        return True

    def _run_once(self, max_wait: float | None = None) -> None:
        timeout = None
        if self._ready or self._threadsafe:
            timeout = 0
        elif self._timers:
            timeout = max(0.0, self._timers[0].when - self.time())
        if max_wait is not None:
            timeout = max_wait if timeout is None else min(timeout, max_wait)
        try:
            events = self._selector.select(timeout)
        except InterruptedError:
            events = []
        for key, mask in events:
            h = key.data
            ok = True
            if mask & EVENT_READ and h.reader is not None:
                ok = self._invoke(h.reader)
            if mask & EVENT_WRITE and h.writer is not None:
                ok = self._invoke(h.writer) and ok
            if not ok and self._handlers.get(key.fd) is h:
                self.forget(key.fd)  # a level-triggered fd whose handler raises would spin forever
        now = self.time()
        timers = self._timers
        while timers and timers[0].when <= now:
            t = heapq.heappop(timers)
            if not t.cancelled:
                cb, args = t.callback, t.args
                t.cancel()
                self._invoke(cb, *args)
        # Only the callbacks queued before this point run now; new ones wait a turn.
        for _ in range(len(self._ready)):
            cb, args = self._ready.popleft()
            self._invoke(cb, *args)

    @staticmethod
    def _invoke(cb: Callable, *args) -> bool:
        try:
            cb(*args)
            return True
        except Exception as exc:  # a bad callback must not kill the reactor
            tb = traceback.extract_tb(exc.__traceback__)
            where = f"{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else "?"
            log.error("loop.callback_error", callback=getattr(cb, "__qualname__", repr(cb)),
                      error=f"{type(exc).__name__}: {exc}", where=where)
            return False

    def close(self) -> None:
        for signum in list(self._signals):
            self.remove_signal_handler(signum)
        for fd in list(self._handlers):
            self.forget(fd)
        self._selector.close()
        wake_fds = (self._wake_r, self._wake_w)
        # a late call_soon_threadsafe must not write into whatever reuses these numbers
        self._wake_r = self._wake_w = -1
        self._wake_pending = True
        for fd in wake_fds:
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
