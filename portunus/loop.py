"""The reactor: ``select.epoll`` driven directly, a timer heap, call_soon(_threadsafe), signals.

Everything on the data plane and the control channel is a callback on one Loop,
run by one thread. Other threads talk to it only through ``call_soon_threadsafe``.

The loop keeps one ``_FdHandlers`` per watched fd (its reader, its writer and the mask the
kernel holds), so a change of interest is at most one ``epoll_ctl`` and none when the mask
stays the same; ``epoll.poll`` hands back ``(fd, events)`` and the fd picks the handlers.
Dropping the last interest of an fd is deferred to just before the next poll: an fd that gets
a new interest meanwhile (a connected socket handed from its dialer to its pumps) costs one
``EPOLL_CTL_MOD`` instead of a DEL and an ADD, and ``forget(fd, closing=True)`` right before
``close`` costs none (closing the descriptor removes it from the epoll set).
"""

from __future__ import annotations

import heapq
import os
import select
import signal
import threading
import time
import traceback
from collections import deque
from typing import Callable

from .log import log

EVENT_READ = select.EPOLLIN
EVENT_WRITE = select.EPOLLOUT
_STALE = 1 << 30  # in a kmask: what epoll holds is only known for the fd number (it may name a new file)
# what wakes a reader / a writer (as ``selectors`` maps them): a hang-up or an error wakes both
_READ_EVENTS = ~select.EPOLLOUT
_WRITE_EVENTS = ~select.EPOLLIN


COARSE_TICK = 0.1  # resolution of call_coarse: a coarse timer fires up to this late, never early


class Timer:
    """A scheduled callback; ``cancel()`` is O(1) (the heap entry is skipped later). The heap
    orders ``(when, seq, timer)`` tuples, so timers themselves are never compared."""

    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when: float, callback: Callable, args: tuple):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.callback = None
        self.args = ()


class _FdHandlers:
    __slots__ = ("reader", "writer", "kmask")

    def __init__(self, reader: Callable | None = None, writer: Callable | None = None, kmask: int = 0):
        self.reader = reader
        self.writer = writer
        self.kmask = kmask  # the mask epoll holds for this fd (0: not registered)

    def mask(self) -> int:
        return (EVENT_READ if self.reader else 0) | (EVENT_WRITE if self.writer else 0)


class Loop:
    def __init__(self):
        self._epoll = select.epoll()
        self._handlers: dict[int, _FdHandlers] = {}
        # fds dropped while a batch of events is dispatched: their later events in it are stale
        # (the number may already name a new socket)
        self._dropped: set[int] = set()
        self._dispatching = False
        # fd -> the mask epoll still holds for an fd with no interest left: removed before the next poll
        self._pending_del: dict[int, int] = {}
        self._timers: list[tuple[float, int, Timer]] = []  # (when, seq, timer): compared in C
        self._timer_seq = 0
        self._coarse: dict[int, list[Timer]] = {}  # tick -> timers due by the end of it
        self._ready: deque = deque()
        self._threadsafe: deque = deque()
        self._running = False
        self._stopping = False
        self._thread_id: int | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_pending = False
        self.add_reader(self._wake_r, self._drain_wakeup)
        self._signals: dict[int, tuple] = {}
        # the epoll mask that woke the writer callback now running (read it only from inside a
        # writer callback: a dialer learns "connected" from a plain EPOLLOUT without asking SO_ERROR)
        self.write_events = 0
        self._now = time.monotonic()  # the clock after the last turn's poll (timeouts of the next poll)

    # ---- time -------------------------------------------------------------
    time = staticmethod(time.monotonic)  # loop.time() is the C call itself (read several times per event)

    # ---- fd interest ------------------------------------------------------
    def _drop(self, fd: int, h: _FdHandlers) -> None:
        """``h`` has no interest left: forget it; the EPOLL_CTL_DEL (if the kernel holds a mask)
        waits for the next poll, where a new interest in the same fd meanwhile turns it into a MOD."""
        del self._handlers[fd]
        kmask = h.kmask
        if kmask:
            h.kmask = 0
            if self._dispatching:
                self._dropped.add(fd)
            self._pending_del[fd] = kmask & ~_STALE

    def _update(self, fd: int, h: _FdHandlers) -> None:
        mask = (EVENT_READ if h.reader else 0) | (EVENT_WRITE if h.writer else 0)
        kmask = h.kmask
        if mask == 0:
            self._drop(fd, h)
            return
        if mask == kmask:
            return
        if kmask:
            try:
                self._epoll.modify(fd, mask)
            except FileNotFoundError:
                if not kmask & _STALE:
                    raise
                self._epoll.register(fd, mask)  # the number was closed and reused: a new file
            h.kmask = mask
        else:
            self._epoll.register(fd, mask)
            h.kmask = mask

    def _new_handlers(self, fd: int) -> _FdHandlers:
        h = self._handlers[fd] = _FdHandlers()
        pending = self._pending_del
        if pending and fd in pending:
            h.kmask = pending.pop(fd) | _STALE  # still in the epoll set, unless closed meanwhile
        return h

    def add_reader(self, fd, callback: Callable) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        h = self._handlers.get(fd)
        if h is None:
            pending = self._pending_del
            if not pending or fd not in pending:  # a new fd (once per socket): straight to the kernel
                self._epoll.register(fd, EVENT_READ)  # raises before anything is recorded
                self._handlers[fd] = _FdHandlers(callback, None, EVENT_READ)
                return
            h = self._new_handlers(fd)
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
        if h.writer is None:
            self._drop(fd, h)  # the last interest (an EOF, a handed-over dialer): _update's mask-0 case
        else:
            self._update(fd, h)
        return True

    def add_writer(self, fd, callback: Callable) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        h = self._handlers.get(fd)
        if h is None:
            pending = self._pending_del
            if not pending or fd not in pending:  # a new fd: straight to the kernel (see add_reader)
                self._epoll.register(fd, EVENT_WRITE)
                self._handlers[fd] = _FdHandlers(None, callback, EVENT_WRITE)
                return
            h = self._new_handlers(fd)
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

    def set_reader(self, fd, callback: Callable) -> None:
        """Make reading with ``callback`` the only interest in ``fd``: a writer it had is dropped in
        the same update (one ``EPOLL_CTL_MOD`` for a dialed socket whose dialer's writer hands over
        to a reader, where ``remove_writer`` + ``add_reader`` cost a drop and a new registration)."""
        fd = fd if isinstance(fd, int) else fd.fileno()
        h = self._handlers.get(fd)
        if h is None:
            self.add_reader(fd, callback)  # nothing to drop: plain add_reader
            return
        had = h.reader is not None
        h.reader = callback
        if had and h.writer is None:
            return  # already reading only: a new callback needs no syscall
        h.writer = None
        try:
            self._update(fd, h)
        except BaseException:
            self._rollback(fd, h, "reader")
            raise

    def _rollback(self, fd: int, h: _FdHandlers, which: str) -> None:
        setattr(h, which, None)
        if h.mask() == 0 and self._handlers.get(fd) is h:
            del self._handlers[fd]
            if h.kmask:
                self._pending_del[fd] = h.kmask & ~_STALE
                h.kmask = 0

    def remove_writer(self, fd) -> bool:
        fd = fd if isinstance(fd, int) else fd.fileno()
        h = self._handlers.get(fd)
        if h is None or h.writer is None:
            return False
        h.writer = None
        if h.reader is None:
            self._drop(fd, h)
        else:
            self._update(fd, h)
        return True

    def forget(self, fd, closing: bool = False) -> None:
        """Drop every interest in ``fd`` (call before closing it). ``closing=True`` promises
        that ``fd`` is closed right after and never shared (dup'd): closing removes it from the
        epoll set, so no ``epoll_ctl`` is spent on it."""
        fd = fd if isinstance(fd, int) else fd.fileno()
        if fd < 0:
            return
        pending = self._pending_del
        kmask = pending.pop(fd, 0) if pending else 0
        h = self._handlers.pop(fd, None)
        if h is not None:
            h.reader = h.writer = None
            if self._dispatching:
                self._dropped.add(fd)  # an event already fetched for fd is now a no-op
            kmask |= h.kmask & ~_STALE
            h.kmask = 0
        if kmask and not closing:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass

    def _flush_pending_del(self) -> None:
        pending = self._pending_del
        unregister = self._epoll.unregister
        for fd in pending:
            try:
                unregister(fd)
            except OSError:
                pass  # closed (or closed and reused) since: the kernel dropped it already
        pending.clear()

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
        self._timer_seq = seq = self._timer_seq + 1
        t = Timer(when, callback, args)
        heapq.heappush(self._timers, (when, seq, t))
        return t

    def call_coarse(self, delay: float, callback: Callable, *args) -> Timer:
        """Like ``call_later`` for deadlines that are rarely reached (a connect timeout): the
        timer lands in a bucket of ``COARSE_TICK`` and fires with it, up to one tick late, never
        early. Thousands of them share one heap entry per tick; ``cancel()`` is O(1)."""
        when = self.time() + (delay if delay > 0.0 else 0.0)
        tick = int(when / COARSE_TICK) + 1
        t = Timer(when, callback, args)
        bucket = self._coarse.get(tick)
        if bucket is None:
            bucket = self._coarse[tick] = []
            self.call_at(tick * COARSE_TICK, self._fire_coarse, tick)
        bucket.append(t)
        return t

    def _fire_coarse(self, tick: int) -> None:
        for t in self._coarse.pop(tick, ()):
            if not t.cancelled:
                cb, args = t.callback, t.args
                t.cancel()
                self._invoke(cb, *args)

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
            self._turns(None, 0.0, None)
        finally:
            self._running = False

    def run_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Run until ``predicate()`` is true or ``timeout`` elapses (tests and drains)."""
        self._thread_id = threading.get_ident()
        return self._turns(predicate, self.time() + timeout, None)

    def _run_once(self, max_wait: float | None = None) -> None:
        """One turn: poll (at most ``max_wait`` seconds), dispatch, due timers, ready callbacks."""
        self._turns(None, 0.0, max_wait, once=True)

    def _turns(self, predicate: Callable[[], bool] | None, deadline: float, max_wait: float | None,
               once: bool = False) -> bool:
        """The loop's turns. ``predicate`` None: until ``stop()`` (or one turn with ``once``); else
        until ``predicate()`` holds (True) or ``deadline`` passes (False), polling at most 50 ms.

        Everything a turn touches is bound to a local once, here, not per turn: the per-turn cost
        is the poll, the dispatch and a clock read."""
        poll = self._epoll.poll
        get = self._handlers.get
        timers, ready, dropped, threadsafe = self._timers, self._ready, self._dropped, self._threadsafe
        clock = self.time
        heappop = heapq.heappop
        self._now = clock()
        while True:
            if predicate is None:
                if self._stopping and not once:
                    return True
            else:
                if predicate():
                    return True
                now = clock()
                if now >= deadline:
                    return False
                max_wait = min(0.05, deadline - now)
            if ready or threadsafe:
                timeout = 0
            elif timers:
                # the clock as of the end of the previous turn (read after its events, and again
                # after its timers and callbacks if any ran): no clock read of its own per poll
                timeout = timers[0][0] - self._now
                if timeout < 0:
                    timeout = 0
            else:
                timeout = -1
            if max_wait is not None:
                timeout = max_wait if timeout < 0 else min(timeout, max_wait)
            if self._pending_del:
                self._flush_pending_del()
            try:
                events = poll(timeout)
            except InterruptedError:
                events = ()
            if events:
                self._dispatching = True
                try:
                    for fd, ev in events:
                        h = get(fd)
                        if h is None or (dropped and fd in dropped):
                            continue
                        failed = None
                        if ev & _READ_EVENTS:
                            cb = h.reader
                            if cb is not None:
                                try:
                                    cb()
                                except Exception as exc:
                                    self._report(cb, exc)
                                    failed = cb
                        if ev & _WRITE_EVENTS:
                            cb = h.writer
                            if cb is not None:
                                self.write_events = ev  # what woke this writer (see write_events)
                                try:
                                    cb()
                                except Exception as exc:
                                    self._report(cb, exc)
                                    failed = cb
                        if failed is not None and get(fd) is h:
                            self.forget(fd)  # a level-triggered fd whose handler raises would spin forever
                finally:
                    self._dispatching = False
                    if dropped:
                        dropped.clear()
            self._now = now = clock()
            ran = False
            if timers and timers[0][0] <= now:
                ran = True
                while timers and timers[0][0] <= now:
                    t = heappop(timers)[2]
                    if not t.cancelled:
                        cb, args = t.callback, t.args
                        t.cancel()
                        self._invoke(cb, *args)
            # Only the callbacks queued before this point run now; new ones wait a turn.
            if ready:
                ran = True
                for _ in range(len(ready)):
                    cb, args = ready.popleft()
                    self._invoke(cb, *args)
            if ran:
                self._now = clock()  # the next timeout counts from after these callbacks
            if once:
                return True

    @staticmethod
    def _invoke(cb: Callable, *args) -> bool:
        try:
            cb(*args)
            return True
        except Exception as exc:  # a bad callback must not kill the reactor
            Loop._report(cb, exc)
            return False

    @staticmethod
    def _report(cb: Callable, exc: BaseException) -> None:
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else "?"
        log.error("loop.callback_error", callback=getattr(cb, "__qualname__", repr(cb)),
                  error=f"{type(exc).__name__}: {exc}", where=where)

    def close(self) -> None:
        for signum in list(self._signals):
            self.remove_signal_handler(signum)
        for fd in list(self._handlers):
            self.forget(fd)
        self._flush_pending_del()
        self._epoll.close()
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
