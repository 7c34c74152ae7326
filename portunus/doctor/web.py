"""`portunus-server doctor`, offline: the Web UI's origin settings and files (docs/access.md, docs/webui.md).

Two ways the Web UI breaks with a healthy API: ``operator_http_public_origin``
does not match how browsers reach ``operator_http_listen`` (every cookie write
then answers ``403 csrf_origin_mismatch``, or the session cookie is ``Secure``
on a plain-HTTP origin and the browser never sends it back), and a build that
lost the UI's package data (every page is a 404). Both are read from
server.toml and this binary's own files; nothing is fetched.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import re
import urllib.parse

from . import report as r

UI_PACKAGE = "portunus.http"
UI_DIR = "webui"
LOOPBACK_NAMES = ("localhost",)
ORIGIN_FIX = ("set operator_http_public_origin in server.toml to the exact origin browsers type (scheme, host, "
              "port), e.g. \"https://portunus.example.com\" behind a TLS reverse proxy, then restart serve")


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "[::]")


def split_origin(origin: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a configured origin; the port defaults by scheme."""
    parts = urllib.parse.urlsplit(origin)
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, (parts.hostname or ""), parts.port or default


def listen_address(configured: tuple[str, int], running_url: str | None) -> tuple[str, int]:
    """``operator_http_listen``, with the port the running serve took when it is configured as 0."""
    if configured[1] == 0 and running_url:
        port = urllib.parse.urlsplit(running_url).port
        if port:
            return configured[0], port
    return configured


def check_public_origin(origin: str | None, listen: tuple[str, int]) -> r.Check:
    """``operator_http_public_origin`` against ``operator_http_listen`` (serve speaks plain HTTP there)."""
    listen_host, listen_port = listen
    listen_text = f"{listen_host}:{listen_port}"
    details = {"operator_http_public_origin": origin, "operator_http_listen": listen_text}
    if origin is None:
        if _is_loopback(listen_host):
            return r.ok("http.public_origin", f"no public origin: the Web UI is at http://{listen_text}, and CSRF "
                                              "compares Origin with the Host the browser used", details)
        return r.warn("http.public_origin", f"no public origin and the API listens on {listen_text}: browsers on "
                                            "the network log in over plain HTTP and the session cookie is not "
                                            "Secure", ORIGIN_FIX, details)
    scheme, host, port = split_origin(origin)
    details.update(secure_cookie=scheme == "https")
    same_socket = port == listen_port and (host == listen_host or (_is_loopback(host) and _is_loopback(listen_host))
                                           or (_is_wildcard(listen_host) and _is_loopback(host)))
    if scheme == "https" and same_socket:
        return r.fail("http.public_origin", f"{origin} is operator_http_listen itself, which speaks plain HTTP: "
                                            "browsers cannot load the Web UI over https there",
                      "put a TLS reverse proxy in front (its own port) and name it in operator_http_public_origin, "
                      "or use http:// for a loopback-only console (the cookie is then not Secure)", details)
    if scheme == "https":
        return r.ok("http.public_origin", f"public origin {origin}: the session cookie is Secure; browsers must "
                                          "come through it (another Origin gets 403 csrf_origin_mismatch)", details)
    if _is_loopback(host) and not _is_loopback(listen_host):
        return r.warn("http.public_origin", f"public origin {origin} is loopback but the API listens on "
                                            f"{listen_text}: a browser on another host sends its own Origin and "
                                            "every login and write answers 403 csrf_origin_mismatch",
                      ORIGIN_FIX, details)
    if (host == listen_host or _is_wildcard(listen_host)) and port != listen_port:
        return r.warn("http.public_origin", f"public origin {origin} has port {port}, but the API listens on "
                                            f"{listen_port}: a browser that opens port {listen_port} gets 403 "
                                            "csrf_origin_mismatch on every write", ORIGIN_FIX, details)
    if not _is_loopback(host):
        return r.warn("http.public_origin", f"public origin {origin} is plain HTTP off this host: passwords and "
                                            "the session cookie (not Secure) cross the network unencrypted",
                      "serve the Web UI through a TLS reverse proxy and set an https:// "
                      "operator_http_public_origin", details)
    return r.ok("http.public_origin", f"public origin {origin} matches operator_http_listen {listen_text}", details)


def check_webui_files(package: str = UI_PACKAGE) -> r.Check:
    """index.html readable through importlib.resources (as the static handler reads it), with every asset it names."""
    try:
        root = importlib.resources.files(package).joinpath(UI_DIR)
        index = root.joinpath("index.html").read_bytes()
    except (OSError, ModuleNotFoundError) as exc:
        return r.fail("http.webui_files", f"this build has no Web UI: {package}/{UI_DIR}/index.html is not readable "
                                          f"({type(exc).__name__}); every Web UI page answers 404",
                      "reinstall the release zipapp (or rebuild with ./build.sh) so the package data under "
                      "portunus/http/webui/ is included; the API itself is unaffected", {"package": package})
    named = sorted(set(re.findall(rb"__ASSETS__/([A-Za-z0-9_./-]+)", index)))
    missing = [n.decode() for n in named if ".." in n.decode() or not root.joinpath(n.decode()).is_file()]
    details = {"index_bytes": len(index), "assets_named": len(named)}
    if missing:
        return r.fail("http.webui_files", f"index.html names {len(missing)} file(s) this build lacks: the Web UI "
                                          "loads broken", "reinstall the release zipapp (or rebuild with "
                                                          "./build.sh) with the whole portunus/http/webui/ tree",
                      {**details, "missing": missing[:20]})
    return r.ok("http.webui_files", f"the Web UI files are in this build (index.html and the {len(named)} "
                                    "file(s) it names)", details)
