"""The Web UI's static files, packed inside the zipapp under ``portunus/http/webui/``.

Served for GET/HEAD on every non-/v1 path of the operator listener. Paths without a
file extension get ``index.html`` (the UI routes on the client side). Every response
carries the strict security headers of the Web UI.

``index.html`` names every other file under ``/assets/<version>/`` (its ``__ASSETS__``
placeholder is filled in here), where ``<version>`` is a hash of all the UI's files: those
answers may be cached for good, so a reload asks only for index.html and the API. Modules
import each other by relative path, so they all stay under the versioned prefix.
"""

from __future__ import annotations

import functools
import hashlib
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


ASSETS = "assets"
PLACEHOLDER = b"__ASSETS__"
NO_CACHE = "no-cache"  # index.html is small and must never be stale
IMMUTABLE = "public, max-age=31536000, immutable"


def _root():
    import importlib.resources  # first UI request only: ~6 ms of every serve start otherwise
    return importlib.resources.files("portunus.http").joinpath("webui")


@functools.cache
def asset_version() -> str:
    """A short hash of every UI file: a new build gets new asset URLs, so caches never serve old files."""
    digest = hashlib.sha256()
    stack = [("", _root())]
    while stack:
        prefix, node = stack.pop()
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            name = f"{prefix}/{child.name}"
            if child.is_dir():
                if child.name != "__pycache__":
                    stack.append((name, child))
            else:
                digest.update(name.encode() + b"\0" + child.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def resolve(target: str) -> tuple[str, bytes, str] | None:
    """(content type, bytes, Cache-Control) for a request target, or None when there is no such file."""
    try:
        path = unquote(urlsplit(target).path)
    except ValueError:
        return None
    clean = posixpath.normpath("/" + path.lstrip("/"))
    parts = [p for p in clean.split("/") if p]
    if any(p.startswith(".") for p in parts):
        return None
    cache = NO_CACHE
    if len(parts) > 2 and parts[0] == ASSETS:
        # an older page may still ask for an older version: it gets today's file, uncached
        cache = IMMUTABLE if parts[1] == asset_version() else NO_CACHE
        parts = parts[2:]
    elif not parts or "." not in parts[-1]:
        parts = ["index.html"]
    node = _root()
    for p in parts:
        node = node.joinpath(p)
    try:
        data = node.read_bytes()
    except (OSError, ValueError):  # no such file, a directory, a name too long, or a NUL in the name
        return None
    if parts == ["index.html"]:
        data = data.replace(PLACEHOLDER, f"/{ASSETS}/{asset_version()}".encode())
        cache = NO_CACHE
    ext = posixpath.splitext(parts[-1])[1].lower()
    return TYPES.get(ext) or mimetypes.guess_type(parts[-1])[0] or "application/octet-stream", data, cache


def serve(handler) -> bool:
    """Answer a GET/HEAD for a Web UI file on ``handler``; False when there is no such file."""
    if handler.command not in ("GET", "HEAD"):
        return False
    found = resolve(handler.path)
    if found is None:
        return False
    ctype, data, cache = found
    try:
        handler.send_response(200)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Cache-Control", cache)
        for name, value in SECURITY_HEADERS.items():
            handler.send_header(name, value)
        buffered = getattr(handler, "_headers_buffer", None)
        if buffered is not None and handler.command != "HEAD":
            # one write for head and body: two small writes on a keep-alive connection meet Nagle's
            # algorithm and the browser's delayed ACK, ~40 ms per file on loopback
            buffered.extend((b"\r\n", data))
            handler.flush_headers()
        else:
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(data)
    except OSError:
        handler.close_connection = True
    return True
