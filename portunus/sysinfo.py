"""Process-level facts and limits shared by every role."""

from __future__ import annotations

import resource


def raise_nofile_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (each forwarded connection needs two fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            return soft
    return soft
