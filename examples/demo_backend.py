#!/usr/bin/env python3
"""Tiny backends for the standalone example: HTTP on 127.0.0.1:8000-8002, UDP echo on 8053."""

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        port = self.server.server_address[1]
        body = (f"<!doctype html><title>Portunus example</title>"
                f"<h1>Hello from backend port {port}</h1>"
                f"<p>You reached this page through Portunus standalone "
                f"(you asked for {self.headers.get('Host')}).</p>\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def udp_echo(port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    while True:
        data, addr = s.recvfrom(65536)
        s.sendto(b"echo: " + data, addr)


def main() -> None:
    for port in (8000, 8001, 8002):
        try:
            srv = ThreadingHTTPServer(("127.0.0.1", port), Hello)
        except OSError as exc:
            sys.exit(f"demo backend: cannot listen on 127.0.0.1:{port}: {exc.strerror}")
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    threading.Thread(target=udp_echo, args=(8053,), daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
