"""The Linux splice fast path: availability, the pipe pool and its one-time warnings.

The splice predicate itself is ``limits.splice_allowed`` (one place).
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys

from ..log import log

PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
# errnos meaning "this kernel/sandbox will not splice here": fall back to userspace
UNSUPPORTED_ERRNOS = {errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP}


def splice_available() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "splice")


# Read per new connection (a change of the variable reaches the next one): os.environ.get costs
# ~0.8 µs (a Python-level Mapping.get, a KeyError when unset); os.environ's own store (``_data``,
# what os.environ[...] = / del / monkeypatch update) is one dict lookup with the same answer.
# A Python without it takes os.environ.get.
_ENV_STORE = getattr(os.environ, "_data", None)
try:
    _DISABLE_KEY, _ONE = os.environ.encodekey("PORTUNUS_DISABLE_SPLICE"), os.environ.encodevalue("1")
except AttributeError:
    _ENV_STORE = None


def splice_disabled_by_env() -> bool:
    store = _ENV_STORE
    if store is not None:
        return store.get(_DISABLE_KEY) == _ONE
    return os.environ.get("PORTUNUS_DISABLE_SPLICE") == "1"


class Pipe:
    __slots__ = ("r", "w")

    def __init__(self, r: int, w: int):
        self.r = r
        self.w = w

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


class PipePool:
    """Pipes for splice, sized to 1 MiB. Only empty (clean) pipes come back to the pool.

    A pump holds a pipe only while bytes sit in it, so idle connections hold none.
    """

    def __init__(self, max_pooled: int = 256):
        self.max_pooled = max_pooled
        self.free: list[Pipe] = []
        self._size_warned = False
        self.created = 0

    def acquire(self) -> Pipe:
        if self.free:
            return self.free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError as exc:
            if not self._size_warned:
                self._size_warned = True
                try:
                    actual = fcntl.fcntl(w, F_GETPIPE_SZ)
                except OSError:
                    actual = 65536
                log.warn("proxy.splice_pipe_size_failed", requested_bytes=PIPE_SIZE,
                         actual_default_bytes=actual, errno_name=errno.errorcode.get(exc.errno, str(exc.errno)))
        self.created += 1
        return Pipe(r, w)

    def release(self, pipe: Pipe, clean: bool) -> None:
        if clean and len(self.free) < self.max_pooled:
            self.free.append(pipe)
        else:
            pipe.close()

    def close(self) -> None:
        while self.free:
            self.free.pop().close()
