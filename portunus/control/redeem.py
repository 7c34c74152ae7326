"""``portunus-client enroll``: redeem a one-time enrollment URI over pinned TLS and write the bundle.

Blocking, before any loop exists, and apart from ``agent`` so that enrolling imports neither the
relay nor the agent's loop machinery (issue 15, startup): the URI, a TLS client context, one frame
out and one back.
"""

from __future__ import annotations

import socket
import ssl

from .. import __version__
from ..errors import PortunusError
from ..log import log
from . import messages as m
from .enrollment import parse_uri, write_bundle
from .frames import FrameDecoder, FrameError, encode
from .tls import client_context, fingerprint_der, pins_match


def enroll(uri_text: str, out_path: str, timeout: float = 15.0) -> dict:
    """Redeem an enrollment URI (blocking) and write the bundle (0600) to ``out_path``."""
    uri = parse_uri(uri_text)
    ctx = client_context()
    try:
        raw = socket.create_connection((uri.host, uri.port), timeout=timeout)
    except OSError as exc:
        raise PortunusError("server_unreachable",
                            f"cannot reach {uri.host}:{uri.port}: {exc.strerror or exc}") from None
    with raw:
        # No Nagle: the enroll frame follows the client's TLS Finished at once, and the server (no
        # session tickets) has nothing to send in between to carry its ACK; with Nagle on, the frame
        # waited for the server's delayed ACK, ~40 ms of every enrollment.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = ctx.wrap_socket(raw, server_hostname=None)
        except (ssl.SSLError, OSError) as exc:
            raise PortunusError("server_unreachable", f"TLS handshake with {uri.host}:{uri.port} failed: {exc}") from None
        with tls:
            der = tls.getpeercert(binary_form=True)
            if not der or not pins_match(uri.fingerprint, der):
                log.error("control.tls_pinned_mismatch", expected=uri.fingerprint,
                          got=fingerprint_der(der) if der else None)
                raise PortunusError("tls_pinned_mismatch",
                                    "the server's certificate does not match the pin in the enrollment URI")
            tls.sendall(encode(m.enroll(uri.code, __version__)))
            decoder = FrameDecoder()
            while True:
                try:
                    data = tls.recv(65536)
                except OSError as exc:
                    raise PortunusError("server_unreachable", f"connection failed: {exc}") from None
                if not data:
                    raise PortunusError("server_unreachable", "server closed the connection without answering")
                try:
                    msgs = decoder.feed(data)
                except FrameError as exc:
                    raise PortunusError("protocol_error", exc.message) from None
                if msgs:
                    break
    reply = msgs[0]
    if reply.get("type") == "error":
        raise PortunusError(reply.get("code") or "enrollment_invalid", reply.get("message") or "refused")
    if reply.get("type") != "enrolled":
        raise PortunusError("protocol_error", f"unexpected reply {reply.get('type')!r}")
    bundle = {
        "version": 1,
        "client_id": reply["client_id"],
        "client_name": reply["client_name"],
        "server_endpoint": f"{uri.host}:{uri.port}",
        "server_cert_sha256": uri.fingerprint,
        "token": reply["token"],
    }
    write_bundle(out_path, bundle)
    return bundle
