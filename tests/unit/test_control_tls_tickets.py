"""The control listener mints no TLS session tickets (issue 15: a reconnect storm pays every handshake's
server CPU; no client ever resumes, so tickets were pure cost). A real in-memory handshake, both versions."""

from __future__ import annotations

import ssl

import pytest

from portunus.control.tls import client_context, ensure_server_cert, server_context


def _handshake(sctx: ssl.SSLContext, cctx: ssl.SSLContext) -> ssl.SSLObject:
    si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = sctx.wrap_bio(si, so, server_side=True)
    c = cctx.wrap_bio(ci, co, server_side=False)
    for _ in range(10):
        for obj in (c, s):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        si.write(co.read())
        ci.write(so.read())
    s.write(b"after the handshake")  # TLS 1.3 tickets would arrive before the first application data
    ci.write(so.read())
    assert c.read(100) == b"after the handshake"
    return c


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_no_session_ticket_is_issued(tmp_path, version):
    info = ensure_server_cert(str(tmp_path / "server.crt"), str(tmp_path / "server.key"))
    sctx = server_context(info)
    assert sctx.num_tickets == 0
    cctx = client_context()
    cctx.maximum_version = version
    c = _handshake(sctx, cctx)
    assert c.version() == ("TLSv1.3" if version == ssl.TLSVersion.TLSv1_3 else "TLSv1.2")
    assert c.session is None or not c.session.has_ticket
    # and a server that does mint them shows the check can see one (TLS 1.3)
    if version == ssl.TLSVersion.TLSv1_3:
        plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        plain.load_cert_chain(info.cert_path, info.key_path)
        assert _handshake(plain, client_context()).session.has_ticket
