"""Real network peers for tests: TCP echo/sink servers and UDP echo servers on 127.0.0.1.

They run on one selectors-driven thread each so thousands of connections cost little.
"""

from __future__ import annotations

import selectors
import socket
import threading


class TcpEchoServer:
    """Echoes every byte back on each of `ports`; half-closes after the peer's EOF."""

    def __init__(self, ports, host: str = "127.0.0.1", prefix_port: bool = False):
        self.ports = list(ports)
        self.sel = selectors.DefaultSelector()
        self.listeners = []
        self.conns = 0
        self.accepted_total = 0
        self.prefix_port = prefix_port
        self._stop = False
        for port in self.ports:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(4096)
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ, ("accept", port))
            self.listeners.append(s)
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        pending: dict[socket.socket, bytearray] = {}
        while not self._stop:
            for key, mask in self.sel.select(0.1):
                kind, port = key.data
                sock = key.fileobj
                if kind == "accept":
                    while True:
                        try:
                            c, _ = sock.accept()
                        except (BlockingIOError, OSError):
                            break
                        c.setblocking(False)
                        self.conns += 1
                        self.accepted_total += 1
                        pending[c] = bytearray(f"{port}:".encode() if self.prefix_port else b"")
                        self.sel.register(c, selectors.EVENT_READ | (selectors.EVENT_WRITE if pending[c] else 0),
                                          ("conn", port))
                    continue
                buf = pending[sock]
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(262144)
                    except BlockingIOError:
                        data = None
                    except OSError:
                        data = b""
                    if data == b"":
                        # flush what's left, then half-close and forget
                        try:
                            sock.setblocking(True)
                            sock.sendall(buf)
                            sock.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        self.sel.unregister(sock)
                        sock.close()
                        del pending[sock]
                        self.conns -= 1
                        continue
                    if data:
                        buf += data
                if buf:
                    try:
                        n = sock.send(buf)
                        del buf[:n]
                    except BlockingIOError:
                        pass
                    except OSError:
                        pass
                want = selectors.EVENT_WRITE if buf else 0
                # back-pressure: stop reading while a lot is queued
                want |= selectors.EVENT_READ if len(buf) < (4 << 20) else 0
                if want:
                    self.sel.modify(sock, want, key.data)
        for s in self.listeners:
            s.close()
        for c in list(pending):
            c.close()

    def close(self) -> None:
        self._stop = True
        self.t.join(5)


class UdpEchoServer:
    """Replies to each datagram with `prefix + datagram` (prefix tells which port answered)."""

    def __init__(self, ports, host: str = "127.0.0.1", prefix_port: bool = True):
        self.socks = []
        self.sel = selectors.DefaultSelector()
        self.received = 0
        self.sources: set = set()
        self.prefix_port = prefix_port
        for port in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((host, port))
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ, port)
            self.socks.append(s)
        self._stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self.sel.select(0.1):
                s = key.fileobj
                while True:
                    try:
                        data, addr = s.recvfrom(65536)
                    except (BlockingIOError, OSError):
                        break
                    self.received += 1
                    self.sources.add(addr)
                    prefix = f"{key.data}:".encode() if self.prefix_port else b""
                    try:
                        s.sendto(prefix + data, addr)
                    except OSError:
                        pass
        for s in self.socks:
            s.close()

    def close(self) -> None:
        self._stop = True
        self.t.join(5)
