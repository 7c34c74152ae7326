"""DNS failure reasons name the server with its port: `127.0.0.1:5399 unreachable`, not just the host
(a resolver on a non-standard port is exactly the case where the port matters)."""

from __future__ import annotations

from test_resolver import Recorder, Resolver, closed_udp_port, env, run_real, srv  # noqa: F401  (fixtures)


def test_an_unreachable_server_is_named_with_its_port(env):  # noqa: F811
    host, port = closed_udp_port()
    r = Resolver(env.loop, servers=[(host, port)], hosts_path=str(env.hosts))
    env.clock.frozen = env.clock()
    rec = Recorder()
    r.resolve("web.test", False, rec)
    assert run_real(env.loop, lambda: rec.done, 5.0)
    addrs, err = rec.calls[0]
    assert addrs == []
    assert f"DNS server {host}:{port} unreachable" in err, err


def test_a_server_error_names_the_server_that_answered(env):  # noqa: F811
    env.srv.fail("bad.test", rcode=2)
    rec = Recorder()
    env.r.resolve("bad.test", False, rec)
    assert run_real(env.loop, lambda: rec.done, 5.0)
    host, port = env.srv.address
    addrs, err = rec.calls[0]
    assert addrs == [] and "servfail" in err.lower() and f"(DNS server {host}:{port})" in err, err
