#!/usr/bin/env python3
"""Portunus benchmark runner (SPEC §11).

Starts every process itself on 127.0.0.1, measures each forwarding path and
prints a table; writes JSON to bench/results/latest.json; optionally compares
medians with a stored baseline (exit 1 when a metric is more than 25 % worse).

Paths:   direct | portunus-splice | portunus-userspace (standalone mode) |
         client-splice | client-userspace (a real server pushes the rules to a
         real client) | haproxy
         (+ optional haproxy-splice: the C reference on the splice fast path)
Tests:   tcp  - iperf3 bulk throughput, single stream (forward and -R)
         http - wrk keep-alive req/s, wrk new-connection req/s
                (Connection: close), idle request RTT on one connection
         udp  - 64-byte datagram echo rate, 1 flow and N flows

Standard library only (Python >= 3.11). External tools: iperf3, wrk, haproxy.
See bench/README.md; the code is the package bench/portbench/.

Hidden helper sub-commands (used by the runner itself, started as child
processes):  run.py _http-origin PORT   |   run.py _udp-echo PORT
"""

import sys

from portbench.cli import main      # bench/ is sys.path[0] when this file is run

if __name__ == "__main__":
    sys.exit(main())
