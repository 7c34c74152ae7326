"""bench/portbench peer paths: the generated haproxy / nginx / rinetd / socat configs and
commands, how their logs are judged, and the proxy-CPU sum over a process tree (pure parts,
nothing started)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from portbench.origins import BODY, Backends, nginx_origin_config  # noqa: E402
from portbench.paths import (HaproxyPath, nginx_argv, nginx_log_problems,  # noqa: E402
                             nginx_stream_config, rinetd_config, socat_argvs, socat_log_problems)
from portbench.procs import tree_cpu_secs_from  # noqa: E402
from portbench.tools import response_length  # noqa: E402

FRONTS = Backends(41001, 41002, 41003)
BACKENDS = Backends(42001, 42002, 42003)
CLK = os.sysconf("SC_CLK_TCK")


def test_haproxy_default_threads_has_no_nbthread_and_1t_has_one(tmp_path):
    default = HaproxyPath(tmp_path, None).config_text(FRONTS, BACKENDS)
    assert "nbthread" not in default and "    maxconn 4000\n" in default
    one = HaproxyPath(tmp_path, 1, name="haproxy-1t")
    assert one.name == "haproxy-1t" and not one.supports_udp
    assert "    nbthread 1\n" in one.config_text(FRONTS, BACKENDS)
    assert HaproxyPath(tmp_path, None).name == "haproxy"


def test_nginx_stream_config_tcp_and_udp_on_loopback_one_worker(tmp_path):
    text = nginx_stream_config(FRONTS, BACKENDS, tmp_path)
    lines = text.splitlines()
    assert lines[0] == "load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
    assert "worker_processes 1;" in lines and "daemon off;" in lines
    assert f"pid {tmp_path / 'nginx.pid'};" in lines
    assert f"error_log {tmp_path / 'error.log'} warn;" in lines
    assert "    server { listen 127.0.0.1:41001 backlog=4096; proxy_pass 127.0.0.1:42001; }" in lines
    assert "    server { listen 127.0.0.1:41002 backlog=4096; proxy_pass 127.0.0.1:42002; }" in lines
    assert ("    server { listen 127.0.0.1:41003 udp rcvbuf=2m; proxy_pass 127.0.0.1:42003; "
            "proxy_timeout 10s; }") in lines
    assert "access_log" not in text          # the stream module logs nothing unless told
    assert "proxy_responses" not in text     # an echo flow: no limit on replies per datagram
    assert "load_module" not in nginx_stream_config(FRONTS, BACKENDS, tmp_path, module=None)
    # every listen is on loopback
    listens = [ln for ln in lines if "listen " in ln]
    assert len(listens) == 3 and all("listen 127.0.0.1:" in ln for ln in listens)


def test_nginx_runs_in_its_own_prefix_with_its_startup_log_there(tmp_path):
    conf = tmp_path / "nginx.conf"
    assert nginx_argv(tmp_path, conf) == ["nginx", "-p", f"{tmp_path}/", "-c", str(conf),
                                          "-e", str(tmp_path / "error.log")]


def test_nginx_origin_returns_the_bench_body_without_access_log_or_request_cap(tmp_path):
    text = nginx_origin_config(42002, tmp_path)
    assert "        listen 127.0.0.1:42002 backlog=4096 reuseport;" in text.splitlines()
    assert 'location / { return 200 "hello, world\\n"; }' in text
    assert BODY == b"hello, world\n"
    assert "    access_log off;" in text and "keepalive_requests 100000000;" in text
    assert "worker_processes 1;" in text and "daemon off;" in text
    for tmp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert f"{tmp}_temp_path {tmp_path}/" in text


def test_rinetd_config_forwards_both_tcp_services_loopback_to_loopback():
    assert rinetd_config(FRONTS, BACKENDS) == ("127.0.0.1 41001 127.0.0.1 42001\n"
                                               "127.0.0.1 41002 127.0.0.1 42002\n")


def test_socat_one_forking_listener_per_tcp_service():
    assert socat_argvs(FRONTS, BACKENDS) == [
        ["socat", "TCP-LISTEN:41001,fork,reuseaddr,bind=127.0.0.1,backlog=4096",
         "TCP:127.0.0.1:42001"],
        ["socat", "TCP-LISTEN:41002,fork,reuseaddr,bind=127.0.0.1,backlog=4096",
         "TCP:127.0.0.1:42002"]]


def test_nginx_log_errors_are_problems_but_a_peer_reset_is_not():
    log = "\n".join([
        "2026/12/01 13:02:00 [notice] 1#1: using the \"epoll\" event method",
        "2026/12/01 13:02:00 [error] 2#2: *7 recv() failed (104: Connection reset by peer) "
        "while proxying and reading from upstream",
        "2026/12/01 13:02:00 [emerg] 1#1: bind() to 127.0.0.1:41001 failed (98: Address in use)",
        "2026/12/01 13:02:01 [alert] 2#2: 8192 worker_connections are not enough",
        "2026/12/01 13:02:01 [warn] 2#2: something mild",
    ])
    assert nginx_log_problems(log) == [
        "2026/12/01 13:02:00 [emerg] 1#1: bind() to 127.0.0.1:41001 failed (98: Address in use)",
        "2026/12/01 13:02:01 [alert] 2#2: 8192 worker_connections are not enough"]


def test_socat_error_lines_are_problems_but_a_broken_pipe_is_not():
    log = "\n".join([
        "2026/12/01 13:02:08 socat[2169] E write(5, 0x5600d13fb000, 8192): Broken pipe",
        "2026/12/01 13:02:08 socat[2170] E connect(5, AF=2 127.0.0.1:42001, 16): "
        "Connection refused",
        "2026/12/01 13:02:09 socat[2100] W exiting on signal 15",
    ])
    assert socat_log_problems(log) == [
        "2026/12/01 13:02:08 socat[2170] E connect(5, AF=2 127.0.0.1:42001, 16): "
        "Connection refused"]


def _stat(sid: int, utime: int, stime: int, cutime: int = 0, cstime: int = 0) -> list[str]:
    """/proc/PID/stat fields after the command name: state ppid pgrp session ... utime(11)."""
    f = ["S", "1", str(sid), str(sid)] + ["0"] * 7 + [str(utime), str(stime), str(cutime),
                                                      str(cstime)] + ["20", "0", "1"]
    return f


def test_tree_cpu_sums_the_session_incl_reaped_children_and_nothing_else():
    # socat parent (sid 100) has reaped children worth 30+10 ticks; two live children
    stats = [_stat(100, 5, 5, 30, 10), _stat(100, 7, 3), _stat(100, 1, 1),
             _stat(200, 1000, 1000, 500, 500),          # another session: not ours
             ["Z"]]                                     # a malformed line is skipped
    assert tree_cpu_secs_from(stats, 100) == pytest.approx((10 + 40 + 10 + 2) / CLK)
    assert tree_cpu_secs_from(stats, 300) == 0


def test_tree_cpu_is_monotonic_when_a_child_is_reaped():
    before = [_stat(100, 5, 5), _stat(100, 20, 10)]           # live child: 30 ticks
    after = [_stat(100, 6, 5, 20, 10)]                        # reaped: in the parent's cutime
    assert tree_cpu_secs_from(after, 100) >= tree_cpu_secs_from(before, 100)
    assert tree_cpu_secs_from(after, 100) - tree_cpu_secs_from(before, 100) == \
        pytest.approx(1 / CLK)


@pytest.mark.parametrize("buf, n", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nhello, world\n", 52),
    (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 13:00:00 GMT\r\n"
     b"content-length: 13\r\nConnection: keep-alive\r\n\r\nhello, world\n", 135),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nhello", None),     # body incomplete
    (b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n", None),               # head incomplete
    (b"HTTP/1.1 204 No Content\r\n\r\n", 27),                           # no body
])
def test_response_length_of_any_origin(buf, n):
    assert response_length(buf) == n
    if n is not None:
        assert n == len(buf)
    if n is not None:
        assert response_length(buf + b"HTTP/1.1 200 OK") == n           # next one ignored
