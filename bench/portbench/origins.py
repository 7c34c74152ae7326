"""The backends every path forwards to.

The HTTP origin and the UDP echo run as child processes (`run.py _http-origin PORT`,
`run.py _udp-echo PORT`) so that their CPU is never the runner's; the iperf3 server
is a fresh one-shot `iperf3 -s -1` per test. The thread-based TCP echo servers are
for bench/control_plane.py and bench/dns_targets.py, which measure setup, not rate.
"""

from __future__ import annotations

import select
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from . import LOOPBACK
from .mmsg import MSG_WAITFORONE, Batch
from .procs import ChildProcess, Procs, wait_ready


@dataclass
class Backends:
    """The TCP/UDP ports of a set of servers: the backends themselves, or the front ports
    a path listens on for them (0: the path has no such port).

    iperf: the iperf3 server (TCP bulk; with iperf_b set also UDP on the same port, since
    iperf3's control connection is TCP on its UDP data port); iperf_b: a second iperf3
    server, TCP and UDP, for the N-flow iperf3 UDP test (iperf3 3.12 caps -P at 128:
    256 flows are two client/server pairs at once); 0 when no iperf3 UDP test runs."""
    iperf: int
    http: int
    udp: int
    iperf_b: int = 0

    def iperf_pairs(self, be: "Backends") -> list[tuple[int, int]]:
        """(front, backend) of both iperf3 ports, these being the fronts of `be`."""
        return [(self.iperf, be.iperf), (self.iperf_b, be.iperf_b)]


BODY = b"hello, world\n"
RESP_KEEPALIVE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                  + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
RESP_CLOSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
              + str(len(BODY)).encode() + b"\r\nConnection: close\r\n\r\n" + BODY)


def responses_for(buf: bytearray) -> tuple[list[bytes], bool]:
    """Consume every complete request head in `buf`: (responses, close after them).

    Sans-IO part of the origin: a fixed 200 per head; `Connection: close` ends
    the connection after its response (later pipelined heads are not answered)."""
    out = []
    while True:
        i = buf.find(b"\r\n\r\n")
        if i < 0:
            return out, False
        head = bytes(buf[:i]).lower()
        del buf[:i + 4]
        if b"connection: close" in head:
            out.append(RESP_CLOSE)
            return out, True
        out.append(RESP_KEEPALIVE)


class _OriginConn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.inbuf = bytearray()
        self.pending = b""
        self.close_after = False


class HttpOrigin:
    """Tiny epoll HTTP/1.1 responder: a fixed 200 for every request head.

    Supports pipelining and `Connection: close`. Request bodies are not
    expected (wrk sends GETs)."""

    def __init__(self, port: int):
        self.ls = ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((LOOPBACK, port))
        ls.listen(4096)
        ls.setblocking(False)
        self.ep = select.epoll()
        self.ep.register(ls.fileno(), select.EPOLLIN)
        self.conns: dict[int, _OriginConn] = {}

    def serve_forever(self) -> None:
        lfd = self.ls.fileno()
        while True:
            for fd, ev in self.ep.poll():
                if fd == lfd:
                    self._accept_all()
                    continue
                conn = self.conns.get(fd)
                if conn is None:
                    continue
                if ev & select.EPOLLOUT:
                    self._flush(fd, conn)
                else:
                    self._read(fd, conn)

    def _accept_all(self) -> None:
        while True:
            try:
                c, _ = self.ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:   # EMFILE etc.: try again on next event
                return
            c.setblocking(False)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns[c.fileno()] = _OriginConn(c)
            self.ep.register(c.fileno(), select.EPOLLIN)

    def _read(self, fd: int, conn: _OriginConn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._close(fd)
            return
        if not data:
            self._close(fd)
            return
        conn.inbuf += data
        out, close = responses_for(conn.inbuf)
        if close:
            conn.close_after = True
        if out:
            conn.pending += b"".join(out)
            self._flush(fd, conn)

    def _flush(self, fd: int, conn: _OriginConn) -> None:
        try:
            n = conn.sock.send(conn.pending)
        except BlockingIOError:
            n = 0
        except OSError:
            self._close(fd)
            return
        conn.pending = conn.pending[n:]
        if conn.pending:
            self.ep.modify(fd, select.EPOLLOUT)
        elif conn.close_after:
            self._close(fd)
        else:
            self.ep.modify(fd, select.EPOLLIN)

    def _close(self, fd: int) -> None:
        conn = self.conns.pop(fd, None)
        if conn is None:
            return
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        conn.sock.close()


def nginx_origin_config(port: int, prefix: Path) -> str:
    """nginx.conf of the HTTP origin (`--origin nginx`, the default): `return 200` with the
    same 13-byte body, one worker, no access log, keep-alive without a request cap (nginx
    would close a kept-alive connection after 1000 requests by default)."""
    body = BODY.decode().replace("\n", "\\n")
    return "\n".join([
        "worker_processes 1;",
        "daemon off;",
        f"pid {prefix / 'nginx.pid'};",
        f"error_log {prefix / 'error.log'} warn;",
        "worker_rlimit_nofile 16384;",
        "events { worker_connections 8192; multi_accept on; }",
        "http {",
        "    access_log off;",
        "    keepalive_requests 100000000;",
        "    keepalive_timeout 120s;",
        f"    client_body_temp_path {prefix / 'tmp-body'};",
        f"    proxy_temp_path {prefix / 'tmp-proxy'};",
        f"    fastcgi_temp_path {prefix / 'tmp-fastcgi'};",
        f"    uwsgi_temp_path {prefix / 'tmp-uwsgi'};",
        f"    scgi_temp_path {prefix / 'tmp-scgi'};",
        "    server {",
        f"        listen {LOOPBACK}:{port} backlog=4096 reuseport;",
        "        default_type text/plain;",
        f'        location / {{ return 200 "{body}"; }}',
        "    }",
        "}",
    ]) + "\n"


def spawn_nginx_origin(procs: Procs, port: int, workdir: Path) -> ChildProcess:
    prefix = workdir / "nginx-origin"
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_origin_config(port, prefix))
    p = procs.spawn("http-origin-nginx", ["nginx", "-p", str(prefix) + "/", "-c", str(conf),
                                          "-e", str(prefix / "error.log")])
    wait_ready([port], [], p, timeout=10)
    return p


def serve_http_origin(port: int) -> None:
    HttpOrigin(port).serve_forever()


def serve_udp_echo(port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass
    s.bind((LOOPBACK, port))
    if Batch.available():       # recvmmsg/sendmmsg: up to 64 datagrams per syscall
        batch, fd = Batch(64), s.fileno()
        while True:
            try:
                k = batch.recv(fd, MSG_WAITFORONE)   # blocking: waits for the first one
                if k:
                    batch.echo(fd, k)
            except OSError:
                pass
    buf = bytearray(65536)
    mv = memoryview(buf)
    recvfrom_into, sendto = s.recvfrom_into, s.sendto
    while True:
        try:
            n, addr = recvfrom_into(buf)
            sendto(mv[:n], addr)
        except OSError:
            pass


def spawn_iperf_server(procs: Procs, port: int) -> ChildProcess:
    """A one-shot iperf3 server (exits after one test), ready to accept."""
    srv = procs.spawn("iperf3-server", ["iperf3", "-s", "-1", "-B", LOOPBACK, "-p", str(port)])
    try:
        wait_ready([port], [], srv, timeout=10)
    except BaseException:
        procs.stop(srv, grace=2)
        raise
    return srv


class TcpEcho:
    """Echo servers on the given ports, a thread per connection (bench/control_plane.py)."""

    def __init__(self, ports: list[int]):
        self.socks = []
        for p in ports:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((LOOPBACK, p))
            s.listen(128)
            self.socks.append(s)
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    @staticmethod
    def _serve(s):
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            threading.Thread(target=TcpEcho._echo, args=(c,), daemon=True).start()

    @staticmethod
    def _echo(c):
        with c:
            while True:
                b = c.recv(65536)
                if not b:
                    return
                c.sendall(b)

    def close(self):
        for s in self.socks:
            s.close()


def one_byte_echo(port: int) -> socket.socket:
    """Serially: accept, echo one byte, close (bench/dns_targets.py measures connection
    setup, so no thread start is in the measured time). Close the returned socket to stop."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((LOOPBACK, port))
    s.listen(1024)

    def serve():
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            try:
                b = c.recv(1)
                if b:
                    c.sendall(b)
            except OSError:
                pass
            c.close()
    threading.Thread(target=serve, daemon=True).start()
    return s
