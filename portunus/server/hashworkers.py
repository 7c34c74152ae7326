"""Argon2id in child processes, so a login flood cannot stall the server's other threads.

``cryptography``'s ``Argon2id.derive`` holds the GIL for the whole derivation (~35 ms at
m=19 MiB, t=2). Run in the server process, every hash froze the HTTP threads, the
control-plane loop and the store writers for that long; under 50 concurrent logins a
rule push took seconds and store writes hit the busy timeout. In a child the parent only
waits on a pipe, which releases the GIL.

    workers = HashWorkers(count=2)       # serve; ``stop()`` at exit
    digest = workers.derive(secret, memory_kib, iterations, lanes, salt, length)   # None: do it here

One request per line, both ways, base64 fields: ``m t p length salt secret`` → ``digest``
(``!`` for a bad request). A child reads until its stdin closes, so it ends with the server
even after a ``kill -9``. A child that dies is started again at the next hash; when none
can be started the caller hashes in-process (correct, only slower for the others).
The password crosses a pipe to our own child and nothing else: never argv, env or a log.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading

from ..log import log

_CHILD_CODE = "from portunus.server.hashworkers import child_main; child_main()"
CHILD_NICENESS = 10


def _b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


class _Child:
    def __init__(self, argv: list[str], env: dict):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     close_fds=True)

    def derive(self, request: bytes) -> bytes | None:
        try:
            self.proc.stdin.write(request)
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()  # blocks in C with the GIL released
        except (OSError, ValueError):
            return None
        if not answer.endswith(b"\n") or answer.startswith(b"!"):
            return None
        try:
            return base64.b64decode(answer.strip(), validate=True)
        except ValueError:
            return None

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(2)


class HashWorkers:
    """A fixed number of hashing children, each used by one thread at a time."""

    def __init__(self, count: int, argv: list[str] | None = None):
        self.count = count
        self.argv = argv or [sys.executable, "-c", _CHILD_CODE]
        # the child imports portunus from wherever this process did (source tree, zipapp, shiv dir)
        self.env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
                    "PYTHONDONTWRITEBYTECODE": "1"}
        self._lock = threading.Lock()
        self._idle: list[_Child] = []
        self._started = 0
        self._closed = False
        self._failed_once = False

    def derive(self, secret: bytes, memory_kib: int, iterations: int, lanes: int, salt: bytes,
               length: int) -> bytes | None:
        """The Argon2id digest computed in a child; None when no child could do it."""
        child = self._take()
        if child is None:
            return None
        request = b"%d %d %d %d %s %s\n" % (memory_kib, iterations, lanes, length, _b64(salt), _b64(secret))
        digest = child.derive(request)
        if digest is None or len(digest) != length:
            self._drop(child)
            return None
        self._give_back(child)
        return digest

    def _take(self) -> _Child | None:
        with self._lock:
            if self._closed:
                return None
            while self._idle:
                child = self._idle.pop()
                if child.proc.poll() is None:
                    return child
                self._started -= 1  # died while idle
            if self._started >= self.count:
                return None  # more callers than children: the caller's slot limit should prevent this
            self._started += 1
        try:
            return _Child(self.argv, self.env)
        except OSError as exc:
            with self._lock:
                self._started -= 1
                first = not self._failed_once
                self._failed_once = True
            if first:
                log.warn("passwords.hash_worker_unavailable", error=f"{type(exc).__name__}: {exc.strerror or exc}",
                         effect="password hashes run in the server process")
            return None

    def _give_back(self, child: _Child) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(child)
                return
        child.close()

    def _drop(self, child: _Child) -> None:
        with self._lock:
            self._started -= 1
        log.warn("passwords.hash_worker_failed", pid=child.proc.pid, code=child.proc.poll(),
                 effect="started again at the next hash; this one ran in the server process")
        child.close()

    def stop(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for child in idle:
            child.close()


def child_main() -> None:
    """The child's loop: one request line in, one digest line out, until stdin closes."""
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    try:
        os.nice(CHILD_NICENESS)  # hashes yield the CPU to the server itself (API, control loop, relays)
    except OSError:
        pass
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        try:
            memory, iterations, lanes, length, salt, secret = line.split()
            digest = Argon2id(salt=base64.b64decode(salt, validate=True), length=int(length),
                              iterations=int(iterations), lanes=int(lanes),
                              memory_cost=int(memory)).derive(base64.b64decode(secret, validate=True))
            out.write(_b64(digest) + b"\n")
        except Exception:  # a bad request gets "!", and the child keeps serving
            out.write(b"!\n")
        out.flush()
