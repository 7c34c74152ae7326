"""`doctor`: the troubleshooting guide (seed 004) as a command (issue 16).

``portunus-server [--data-dir DIR] doctor`` and ``portunus-client doctor
[--bundle PATH]`` run the checks that match each failure mode of the guide on
the host they are on and print every result as ✓ / ⚠ / ✗ with the values
found and the guide's fix in one or two lines (``--format json``: a list of
``{id, status, summary, details, fix}``). Exit 0 when nothing is ✗, else 1.

The contract every check keeps:

- read-only: nothing is created, written, locked or bound; the state database
  is opened with ``mode=ro`` (safe while ``serve`` runs), the store lock is
  read from ``/proc/locks`` and never taken;
- no secret leaves the host before the server proved its certificate (the
  client's hello goes only over a pinned TLS channel, exactly as the agent
  sends it), and no secret is ever printed;
- every network step has a timeout, so a healthy host finishes in well under
  3 s and a broken one still answers;
- a check that cannot run (no bundle, no running server) says so as ``skip``
  instead of guessing.

Layout: ``report`` (the result type and its text/JSON rendering, sans-IO),
``host`` (facts of this host shared by both roles), ``client`` and ``server``
(the role checks; ``server`` runs the offline ones), ``online`` (the server's
checks through its running API: onboarding, clients, rules, DNS, quotas, SNI),
``web`` (the Web UI's origin settings and files), ``cli`` (argparse
registration). A new feature adds its check as one more ``(id, function)`` in
``online.ONLINE_CHECKS``, or one more call in the role's ``run_checks``.
"""
