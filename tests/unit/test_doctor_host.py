"""Doctor host facts: /proc parsers, the pure checks, and the splice / DNS probes on real local objects."""

from __future__ import annotations

import fcntl
import os
import resource
import socket
import struct
import threading

import pytest

from portunus.doctor import host
from portunus.doctor import report as r
from portunus.relay import dns

# /proc/net/tcp: 127.0.0.1:8080 LISTEN, 10.0.0.5:40000 -> 192.168.1.1:7443 ESTABLISHED
PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0 100 0 0 10 0
   1: 0500000A:9C40 0101A8C0:1D13 01 00000000:00000000 00:00000000 00000000     0        0 2222 1 0 20 4 30 10 -1
   2: garbage
"""
# /proc/net/tcp6: [::1]:443 LISTEN, and an IPv4-mapped ::ffff:127.0.0.1:5000 TIME_WAIT
PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3333 1 0 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:1388 0000000000000000FFFF00000100007F:D431 06 00000000:00000000 03:00000a2d 00000000     0        0 0 3 0
"""
PROC_LIMITS = """\
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            1024                 524288               files
"""


def test_proc_net_tcp_ipv4_entries():
    entries = host.parse_proc_net(PROC_NET_TCP, "tcp")
    assert entries == [
        host.SocketEntry("tcp", "127.0.0.1", 8080, "0.0.0.0", 0, "LISTEN", 1111),
        host.SocketEntry("tcp", "10.0.0.5", 40000, "192.168.1.1", 7443, "ESTABLISHED", 2222),
    ]


def test_proc_net_tcp6_entries_and_ipv4_mapped_addresses():
    entries = host.parse_proc_net(PROC_NET_TCP6, "tcp")
    assert entries[0] == host.SocketEntry("tcp", "::1", 443, "::", 0, "LISTEN", 3333)
    assert (entries[1].local_ip, entries[1].local_port, entries[1].state) == ("127.0.0.1", 5000, "TIME_WAIT")


def test_proc_net_of_this_host_lists_a_socket_we_listen_on():
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert any(e.local_port == port and e.state == "LISTEN" for e in host.read_sockets())
        inode = os.fstat(s.fileno()).st_ino
        inodes, count = host.process_socket_inodes(os.getpid())
        assert inode in inodes and count >= 1
    finally:
        s.close()


def test_proc_limits_and_capabilities():
    assert host.parse_proc_limits(PROC_LIMITS) == (1024, 524288)
    assert host.parse_proc_limits("Max open files  unlimited unlimited files") == (resource.RLIM_INFINITY,) * 2
    assert host.parse_proc_limits("nothing here") is None
    assert host.parse_cap_eff("Name:\tx\nCapEff:\t0000000000000400\n") == 1 << host.CAP_NET_BIND_SERVICE
    assert host.parse_cap_eff("CapEff:\tzz") is None


def test_effective_nofile_is_the_hard_limit_the_agent_raises_to():
    assert host.effective_nofile(1024, 4096) == 4096
    assert host.effective_nofile(1024, resource.RLIM_INFINITY) == 1 << 20


def test_proc_locks_holder_of_a_real_file(tmp_path):
    lock = tmp_path / "state.db.lock"
    lock.write_text("")
    st = os.stat(lock)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    text = (f"1: FLOCK  ADVISORY  WRITE 4242 {dev}:{st.st_ino} 0 EOF\n"
            f"1: -> FLOCK  ADVISORY  WRITE 5555 {dev}:{st.st_ino} 0 EOF\n"
            f"2: POSIX  ADVISORY  READ 777 {dev}:{st.st_ino + 1} 0 EOF\n")
    assert host.lock_holders(str(lock), text) == [4242]
    assert host.lock_holders(str(lock), "") == []


def test_lock_holders_sees_a_real_flock(tmp_path):
    lock = tmp_path / "state.db.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holders = host.lock_holders(str(lock))
        if holders is None:
            pytest.skip("/proc/locks is not readable here")
        assert holders == [os.getpid()]
    finally:
        os.close(fd)
    assert host.lock_holders(str(lock)) == []


@pytest.mark.parametrize("limit, status", [(10_000, r.OK), (1200, r.WARN), (1000, r.FAIL)])
def test_nofile_against_the_rules_needs(limit, status):
    c = host.check_nofile(limit, {"rule A (tcp 30000-30999)": 1000}, "test")
    assert c.status == status
    assert c.details["estimated_need"] == 1000 + host.FD_BASELINE
    if status == r.FAIL:
        assert "LimitNOFILE" in c.fix and str(limit) in c.summary


def test_privileged_ports_need_the_capability_unless_the_sysctl_allows_them():
    cap = 1 << host.CAP_NET_BIND_SERVICE
    assert host.check_privileged_ports([80, 8080], 0, 1024, "this user").status == r.FAIL
    failed = host.check_privileged_ports([80, 443, 8080], 0, 1024, "this user")
    assert "80,443" in failed.summary and "CAP_NET_BIND_SERVICE" in failed.fix
    assert host.check_privileged_ports([80], cap, 1024, "this user").status == r.OK
    assert host.check_privileged_ports([80], 0, 0, "this user").status == r.OK
    assert host.check_privileged_ports([8080], None, None, "this user").status == r.OK


def test_ephemeral_range_overlap_is_a_warning_naming_the_ports():
    c = host.check_ephemeral_ports([20000, 33000, 33001, 33002, 61000], (32768, 60999))
    assert c.status == r.WARN
    assert "33000-33002" in c.summary and "ip_local_reserved_ports=33000-33002" in c.fix
    assert host.check_ephemeral_ports([20000], (32768, 60999)).status == r.OK
    assert host.check_ephemeral_ports([20000], None).status == r.SKIP
    assert host.parse_port_range("32768\t60999\n") == (32768, 60999)
    assert host.parse_port_range("junk") is None


def test_port_runs_are_compact_and_bounded():
    assert host._ports_text([3, 1, 2, 5, 7, 8]) == "1-3,5,7-8"
    assert host._ports_text(list(range(0, 40, 2)), limit=3) == "0,2,4,… (17 more)"


@pytest.mark.parametrize("env, status", [({}, r.OK), ({"PORTUNUS_DISABLE_SPLICE": "1"}, r.WARN),
                                         ({"PORTUNUS_DISABLE_SPLICE": "true"}, r.WARN)])
def test_disable_splice_env(env, status):
    c = host.check_splice_env(env)
    assert c.status == status
    if env.get("PORTUNUS_DISABLE_SPLICE") == "true":
        assert "no effect" in c.summary


def test_splice_probe_on_this_kernel_and_both_outcomes_of_its_check():
    assert host.splice_probe() in (None, "ENOSYS", "EINVAL", "EPERM", "EOPNOTSUPP")
    assert host.check_splice_kernel(None).status == r.OK
    refused = host.check_splice_kernel("EPERM")
    assert refused.status == r.WARN and "PORTUNUS_DISABLE_SPLICE=1" in refused.fix
    assert "EPERM" in refused.summary


def test_pipe_max_size_below_one_mib_is_a_warning_with_the_sysctl():
    low = host.check_pipe_max_size(65536, (False, "EPERM"))
    assert low.status == r.WARN and "fs.pipe-max-size=1048576" in low.fix
    assert host.check_pipe_max_size(65536, (True, None)).details["note"].startswith("this process may exceed")
    assert host.check_pipe_max_size(1 << 20, (True, None)).status == r.OK
    assert host.check_pipe_max_size(1 << 20, (False, "EPERM")).status == r.WARN
    assert host.pipe_size_probe()[0] in (True, False)


# ------------------------------------------------------------------ DNS

def _answer(query: bytes, rcode: int = 0) -> bytes:
    txid = struct.unpack(">H", query[:2])[0]
    question = query[12:]
    answers = 0 if rcode else 1
    body = question
    if answers:
        body += b"\xc0\x0c" + struct.pack(">HHIH", dns.QTYPE_A, 1, 60, 4) + bytes([10, 0, 0, 9])
    return struct.pack(">HHHHHH", txid, 0x8180 | rcode, 1, answers, 0, 0) + body


class FakeDnsServer:
    """A UDP DNS server on 127.0.0.1 answering each query once with ``rcode``."""

    def __init__(self, rcode: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.addr = self.sock.getsockname()
        self.rcode = rcode
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            data, peer = self.sock.recvfrom(4096)
            self.sock.sendto(_answer(data, self.rcode), peer)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def test_dns_probe_answers_refusals_and_silence():
    good, refusing = FakeDnsServer(), FakeDnsServer(rcode=dns.RCODE_REFUSED)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    silent_addr = silent.getsockname()
    try:
        res = host.probe_dns_servers([good.addr, refusing.addr, silent_addr], "backend.example", 0.5)
    finally:
        good.close()
        refusing.close()
        silent.close()
    labels = [f"127.0.0.1:{a[1]}" for a in (good.addr, refusing.addr, silent_addr)]
    assert res[labels[0]] is None
    assert res[labels[1]].startswith("refused")
    assert res[labels[2]] == "no answer within 0.5 s"


def test_dns_check_fails_only_when_a_name_depends_on_silent_servers():
    dead = {"10.0.0.2:53": "no answer within 1 s"}
    assert host.check_dns_servers(dead, "/etc/resolv.conf", ["backend.example"]).status == r.FAIL
    assert host.check_dns_servers(dead, "/etc/resolv.conf", []).status == r.WARN
    mixed = {"10.0.0.2:53": "no answer within 1 s", "10.0.0.3:53": None}
    assert host.check_dns_servers(mixed, "--dns-server", ["backend.example"]).status == r.WARN
    assert host.check_dns_servers({"10.0.0.3:53": None}, "--dns-server", []).status == r.OK
    assert host.check_dns_servers({}, "--dns-server", []).status == r.SKIP


def test_pid_alive_answers_for_this_process_and_refuses_non_pids():
    # the no-/proc/locks path of store.lock: the helper lives in cli.api_client (it moved out of cli.server)
    assert host.pid_alive(os.getpid()) is True
    assert host.pid_alive(0) is False
    assert host.pid_alive("123") is False
