"""The Web UI's static files, packed inside the zipapp under ``portunus/http/webui/``.

Served for GET/HEAD on every non-/v1 path of the operator listener. Paths without a
file extension get ``index.html`` (the UI routes on the client side). Every response
carries the strict security headers of the Web UI.
"""

from __future__ import annotations

import importlib.resources
import mimetypes
import posixpath
from urllib.parse import unquote, urlsplit

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml", ".json": "application/json",
         ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2"}


def _root():
    return importlib.resources.files("portunus.http").joinpath("webui")


def resolve(target: str) -> tuple[str, bytes] | None:
    """(content type, bytes) for a request target, or None when there is no such file."""
    try:
        path = unquote(urlsplit(target).path)
    except ValueError:
        return None
    clean = posixpath.normpath("/" + path.lstrip("/"))
    parts = [p for p in clean.split("/") if p]
    if any(p.startswith(".") for p in parts):
        return None
    if not parts or "." not in parts[-1]:
        parts = ["index.html"]
    node = _root()
    for p in parts:
        node = node.joinpath(p)
    try:
        data = node.read_bytes()
    except (OSError, ValueError):  # no such file, a directory, a name too long, or a NUL in the name
        return None
    ext = posixpath.splitext(parts[-1])[1].lower()
    return TYPES.get(ext) or mimetypes.guess_type(parts[-1])[0] or "application/octet-stream", data


def serve(handler) -> bool:
    """Answer a GET/HEAD for a Web UI file on ``handler``; False when there is no such file."""
    if handler.command not in ("GET", "HEAD"):
        return False
    found = resolve(handler.path)
    if found is None:
        return False
    ctype, data = found
    try:
        handler.send_response(200)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(data)))
        # index.html is small and must never be stale; versioned assets could be cached, these are not versioned
        handler.send_header("Cache-Control", "no-cache")
        for name, value in SECURITY_HEADERS.items():
            handler.send_header(name, value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)
    except OSError:
        handler.close_connection = True
    return True
