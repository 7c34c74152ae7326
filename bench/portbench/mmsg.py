"""Batched UDP I/O for the bench's own UDP load generator and echo: recvmmsg(2) / sendmmsg(2)
through ctypes with preallocated buffers, so that the measuring side spends few syscalls per
datagram and the proxy, not the bench, is the limit. `Batch.available()` is False where libc
lacks the calls (then the callers use plain recv/send).

Nothing here is the product's: bench/ imports nothing from portunus.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os

MSG_DONTWAIT = 0x40
MSG_WAITFORONE = 0x10000
NAME_LEN = 28               # sizeof(struct sockaddr_in6): room for either family


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        rec, snd = lib.recvmmsg, lib.sendmmsg
    except (OSError, AttributeError):
        return None
    rec.argtypes = [ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int,
                    ctypes.c_void_p]
    rec.restype = ctypes.c_int
    snd.argtypes = [ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int]
    snd.restype = ctypes.c_int
    return lib


_LIBC = _libc() if os.environ.get("PORTBENCH_NO_MMSG") != "1" else None


class Batch:
    """`n` preallocated messages of `size` bytes (with source addresses) for one socket.

    recv(fd, flags) -> count received (lengths in .lens()); echo(fd, k) sends the first k
    received datagrams back to where they came from; send_copies(fd, payload, k) sends k
    copies of one payload on a connected socket. Errors: EAGAIN -> 0, others OSError."""

    def __init__(self, n: int = 64, size: int = 2048):
        self.n, self.size = n, size
        self.bufs = ctypes.create_string_buffer(n * size)
        self.names = ctypes.create_string_buffer(n * NAME_LEN)
        self.iov = (_Iovec * n)()
        self.msgs = (_Mmsghdr * n)()
        base, nbase = ctypes.addressof(self.bufs), ctypes.addressof(self.names)
        for i in range(n):
            self.iov[i].iov_base = base + i * size
            self.iov[i].iov_len = size
            h = self.msgs[i].msg_hdr
            h.msg_name = nbase + i * NAME_LEN
            h.msg_namelen = NAME_LEN
            h.msg_iov = ctypes.pointer(self.iov[i])
            h.msg_iovlen = 1
        self._payload: bytes | None = None

    @staticmethod
    def available() -> bool:
        return _LIBC is not None

    def _reset(self, k: int) -> None:
        for i in range(k):
            self.iov[i].iov_len = self.size
            self.msgs[i].msg_hdr.msg_namelen = NAME_LEN

    @staticmethod
    def _check(r: int) -> int:
        if r >= 0:
            return r
        e = ctypes.get_errno()
        if e in (_errno.EAGAIN, _errno.EWOULDBLOCK, _errno.EINTR):
            return 0
        raise OSError(e, os.strerror(e))

    def recv(self, fd: int, flags: int = MSG_DONTWAIT) -> int:
        if self._payload is not None:       # the buffers were set up for send_copies
            nbase = ctypes.addressof(self.names)
            for i in range(self.n):
                self.msgs[i].msg_hdr.msg_name = nbase + i * NAME_LEN
            self._reset(self.n)
            self._payload = None
        return self._check(_LIBC.recvmmsg(fd, self.msgs, self.n, flags, None))

    def lens(self, k: int) -> list[int]:
        return [self.msgs[i].msg_len for i in range(k)]

    def data(self, i: int) -> bytes:
        return self.bufs.raw[i * self.size: i * self.size + self.msgs[i].msg_len]

    def echo(self, fd: int, k: int) -> int:
        """Send the k datagrams just received back to their sources (blocking socket: all
        of them; non-blocking: as many as fit). Returns how many were sent."""
        for i in range(k):
            self.iov[i].iov_len = self.msgs[i].msg_len
        sent = 0
        try:
            while sent < k:
                r = self._check(_LIBC.sendmmsg(fd, ctypes.byref(self.msgs[sent]), k - sent, 0))
                if r == 0:
                    break
                sent += r
        finally:
            self._reset(k)
        return sent

    def send_copies(self, fd: int, payload: bytes, k: int) -> int:
        """Send k (<= n) copies of `payload` on a connected socket: how many went out."""
        k = min(k, self.n)
        if self._payload != payload:
            for i in range(self.n):
                ctypes.memmove(self.iov[i].iov_base, payload, len(payload))
                self.iov[i].iov_len = len(payload)
                self.msgs[i].msg_hdr.msg_name = None
                self.msgs[i].msg_hdr.msg_namelen = 0
            self._payload = payload
        return self._check(_LIBC.sendmmsg(fd, self.msgs, k, 0))
