#!/usr/bin/env python3
"""Portunus benchmark runner (SPEC §11).

Starts every process itself on 127.0.0.1, measures each forwarding path and
prints the side-by-side table of issue 15 (rows = figures, columns = paths) with
ratios to direct and to the best peer and the goal marks; writes JSON to
bench/results/latest.json; optionally compares medians with a stored baseline
(exit 1 when a compared metric is more than 25 % worse).

Paths:   direct | portunus-splice | portunus-userspace (standalone mode) |
         client-splice | client-userspace (a real server pushes the rules to a
         real client) | haproxy (one thread per CPU) | haproxy-1t (nbthread 1) |
         nginx (stream, 1 worker, TCP+UDP) | rinetd | socat
         (+ optional haproxy-splice: the C reference on the splice fast path)
Tests:   tcp  - iperf3 bulk throughput, single stream (-R with --reverse)
         http - wrk -t1 -c50 keep-alive req/s, new-connection req/s
                (Connection: close), idle request RTT on one connection
         udp  - 64-byte datagram echo rate, 1 flow and N flows
         and the proxy's CPU per request / connection / GB / datagram.

Standard library only (Python >= 3.11). External tools: iperf3, wrk, and the
peers haproxy, nginx (+ libnginx-mod-stream; also the HTTP origin), rinetd, socat.
See bench/README.md; the code is the package bench/portbench/.

Hidden helper sub-commands (used by the runner itself, started as child
processes):  run.py _http-origin PORT   |   run.py _udp-echo PORT
"""

import sys

from portbench.cli import main      # bench/ is sys.path[0] when this file is run

if __name__ == "__main__":
    sys.exit(main())
