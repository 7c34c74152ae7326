"""A framed JSON message channel over TLS, driven by the loop (both ends use it).

TLS runs through ``ssl.MemoryBIO`` so the loop owns the socket: bytes in from the
socket go to the TLS object, bytes out of it go to the socket, and decrypted
bytes go through the sans-IO frame codec. Writes are buffered with a bound; a
peer that stops reading is disconnected instead of growing memory.
"""

from __future__ import annotations

import errno
import socket
import ssl
from typing import Callable

from ..log import log
from .frames import FrameDecoder, FrameError, encode
from .messages import MessageError, validate

MAX_WRITE_BUFFER = 8 << 20
RECV_SIZE = 256 * 1024


class Channel:
    def __init__(self, loop, sock: socket.socket, ssl_ctx: ssl.SSLContext, *, server_side: bool,
                 peer_role: str, on_open: Callable, on_message: Callable, on_close: Callable,
                 server_hostname: str | None = None):
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.peer_role = peer_role  # whose messages we receive: "client" or "server"
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = ssl_ctx.wrap_bio(self._in, self._out, server_side=server_side,
                                    server_hostname=server_hostname)
        self.decoder = FrameDecoder()
        self.on_open = on_open
        self.on_message = on_message
        self.on_close = on_close
        self.open = False
        self.closed = False
        self.close_reason: str | None = None
        self.close_code: str | None = None  # stable reason of a protocol close (frame/message/TLS error)
        self._wbuf = bytearray()
        self.last_rx = loop.time()
        self.peer = _peername(sock)
        self.context: dict = {}  # owner's per-channel state (client id, caps, ...)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        loop.add_reader(self.fd, self._on_readable)
        self._handshake()

    # ---- TLS plumbing -----------------------------------------------------
    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_tls()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush_tls()
            self.close_code = "tls_handshake_failed"
            self.close(f"tls handshake failed: {_short(exc)}")
            return
        self._flush_tls()
        self.open = True
        self.on_open(self)
        if not self.closed:
            self._read_app_data()  # data may have arrived with the last handshake flight

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"read failed: {exc.strerror or exc}")
            return
        if not data:
            self.close("peer closed the connection")
            return
        self.last_rx = self.loop.time()
        self._in.write(data)
        if not self.open:
            self._handshake()
        else:
            self._read_app_data()

    def _read_app_data(self) -> None:
        chunks = []
        while True:
            try:
                chunk = self.tls.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.close("peer closed the TLS session")
                return
            except ssl.SSLError as exc:
                self.close_code = "tls_error"
                self.close(f"tls error: {_short(exc)}")
                return
            if not chunk:
                break
            chunks.append(chunk)
        self._flush_tls()  # reading may produce TLS records to send (key updates, tickets)
        if not chunks:
            return
        try:
            messages = self.decoder.feed(b"".join(chunks))
        except FrameError as exc:
            self.close_code = exc.code
            self.close(f"{exc.code}: {exc.message}")
            return
        for msg in messages:
            if self.closed:
                return
            try:
                msg = validate(msg, self.peer_role)
            except MessageError as exc:
                self.close_code = exc.code
                self.close(f"{exc.code}: {exc.message}")
                return
            self.on_message(self, msg)

    def _flush_tls(self) -> None:
        pending = self._out.read()
        if pending:
            self._wbuf += pending
        self._write_out()

    def _write_out(self) -> None:
        if self.closed:
            return
        while self._wbuf:
            try:
                n = self.sock.send(self._wbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._wbuf.clear()
                self.close(f"write failed: {exc.strerror or exc}", flush=False)
                return
            del self._wbuf[:n]
        if self._wbuf:
            if len(self._wbuf) > MAX_WRITE_BUFFER:
                self._wbuf.clear()
                self.close("peer is not reading (write buffer over limit)", flush=False)
                return
            self.loop.add_writer(self.fd, self._write_out)
        else:
            self.loop.remove_writer(self.fd)

    # ---- API --------------------------------------------------------------
    def send(self, msg: dict) -> bool:
        if self.closed or not self.open:
            return False
        try:
            data = encode(msg)
        except FrameError as exc:
            log.error("control.send_failed", reason=exc.message, type=msg.get("type"))
            return False
        try:
            self.tls.write(data)
        except ssl.SSLError as exc:
            self.close(f"tls error: {_short(exc)}")
            return False
        self._flush_tls()
        return not self.closed

    def peer_cert_der(self) -> bytes | None:
        try:
            return self.tls.getpeercert(binary_form=True)
        except (ValueError, ssl.SSLError):
            return None

    def close(self, reason: str = "closed", flush: bool = True) -> None:
        if self.closed:
            return
        if flush and self._wbuf:
            try:
                self.sock.send(self._wbuf)  # best effort: e.g. an error frame before close
            except OSError:
                pass
        self.closed = True
        self.close_reason = reason
        self.loop.forget(self.fd)
        try:
            self.sock.close()
        except OSError:
            pass
        self.on_close(self, reason)


def _peername(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def _short(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc))
    return str(exc) or type(exc).__name__

