"""The product under test: the --bin command, the role commands derived from it,
the standalone config the bench generates, and a --check probe before the run."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from . import LOOPBACK, REPO, BenchError
from .origins import Backends
from .procs import Procs, free_port

ROLES = ("standalone", "server", "client")


def resolve_bin(spec: str) -> list[str] | None:
    """The --bin command as argv with an absolute executable, or None if it does not exist.

    A relative path is taken from the current directory, else from the repository."""
    argv = shlex.split(spec)
    if not argv:
        return None
    exe = argv[0]
    cand = Path(exe) if os.sep in exe else None
    if cand is not None:
        if not cand.is_absolute():
            cand = (Path.cwd() / cand) if (Path.cwd() / cand).exists() else (REPO / cand)
        if not cand.exists():
            return None
        # keep the symlink name: the zipapp picks its role from argv[0]
        argv[0] = str(cand.absolute())
    elif shutil.which(exe) is None:
        return None
    return argv


def script_command(bin_path: str, source: bool) -> list[str]:
    """The product command of control_plane.py and dns_targets.py (--bin / --source):
    the zipapp, or the source tree run by this interpreter."""
    return [sys.executable, "-m", "portunus"] if source else [sys.executable, bin_path]


def portunus_commands(argv: list[str]) -> tuple[list[str] | None, list[str] | None, str | None]:
    """From the --bin command: (standalone argv, base argv that takes the role as its
    first argument, or None with the reason).

    `dist/portunus` and `python3 -m portunus` are base commands. For compatibility,
    `python3 -m portunus standalone` (a trailing role) and the `dist/portunus-standalone`
    symlink (role from argv[0]; its target is the base) are accepted too."""
    if argv[-1] in ROLES:
        base = argv[:-1]
        return base + ["standalone"], base, None
    name = os.path.basename(argv[0])
    m = re.fullmatch(r"portunus-(standalone|server|client)", name)
    if m:
        exe = Path(argv[0])
        if exe.is_symlink():
            base = [str(exe.resolve())] + argv[1:]
            return base + ["standalone"], base, None
        why = (f"{argv[0]} picks its role ({m.group(1)}) from its name; pass the zipapp itself "
               "(--bin dist/portunus) for the client-* paths")
        return (argv if m.group(1) == "standalone" else None), None, why
    return argv + ["standalone"], argv, None


def standalone_config(f: Backends, be: Backends, listen_host: str | None, drain: int,
                      log_level: str = "info") -> str:
    """The TOML of a standalone path: three rules, fronts `f` -> backends `be`; three more
    (iperf_udp_rules) when `f` has a second iperf port."""
    lh = f'listen_host = "{listen_host}"\n' if listen_host else ""
    return (
        "[global]\n"
        'label = "bench"\n'
        f'log_level = "{log_level}"\n'
        'log_format = "json"\n'
        f"shutdown_drain_secs = {drain}\n\n"
        "[[rule]]\n"
        'name = "bench-iperf"\n'
        'protocol = "tcp"\n'
        f"{lh}listen_port = {f.iperf}\n"
        f'target = "{LOOPBACK}:{be.iperf}"\n\n'
        "[[rule]]\n"
        'name = "bench-http"\n'
        'protocol = "tcp"\n'
        f"{lh}listen_port = {f.http}\n"
        f'target = "{LOOPBACK}:{be.http}"\n\n'
        "[[rule]]\n"
        'name = "bench-udp"\n'
        'protocol = "udp"\n'
        f"{lh}listen_port = {f.udp}\n"
        f'target = "{LOOPBACK}:{be.udp}"\n'
        "udp_max_flows = 4096\n"
    ) + "".join(
        "\n[[rule]]\n"
        f'name = "bench-{nm}-{proto}"\n'
        f'protocol = "{proto}"\n'
        f"{lh}listen_port = {fp}\n"
        f'target = "{LOOPBACK}:{bp}"\n'
        + ("udp_max_flows = 4096\n" if proto == "udp" else "")
        for nm, fp, bp, proto in iperf_udp_rules(f, be))


def iperf_udp_rules(f: Backends, be: Backends) -> list[tuple[str, int, int, str]]:
    """The extra rules of the iperf3 UDP test, (name, front, backend, protocol): UDP beside
    TCP on the iperf port, TCP and UDP on the second iperf port (SPEC §2.4: a TCP and a UDP
    rule may share a listen port). None when `f` has no second iperf port."""
    if not f.iperf_b:
        return []
    return [("iperf", f.iperf, be.iperf, "udp"), ("iperf-b", f.iperf_b, be.iperf_b, "tcp"),
            ("iperf-b", f.iperf_b, be.iperf_b, "udp")]


def splice_env(splice: bool) -> dict:
    """The environment for a product process: PORTUNUS_DISABLE_SPLICE=1 unless `splice`."""
    env = dict(os.environ)
    env.pop("PORTUNUS_DISABLE_SPLICE", None)
    if not splice:
        env["PORTUNUS_DISABLE_SPLICE"] = "1"
    return env


def _bin_identity(exe: Path) -> dict:
    real = exe.resolve()
    return {"bin_file": str(real),
            "bin_sha256": hashlib.sha256(real.read_bytes()).hexdigest()[:16],
            "bin_mtime": _dt.datetime.fromtimestamp(real.stat().st_mtime).astimezone()
            .isoformat(timespec="seconds")}


def probe_portunus(procs: Procs, argv: list[str], workdir: Path) -> tuple[str | None, dict]:
    """Check the config with --check; prefer binding 127.0.0.1 via listen_host.

    Returns (listen_host or None, info)."""
    info: dict = {}
    exe = Path(argv[0])
    if exe.is_file():
        info.update(_bin_identity(exe))
    try:
        rc, out, err = procs.run("portunus-version", argv + ["--version"], timeout=30,
                                 env=dict(os.environ))
        info["version"] = (out.strip() or err.strip()).splitlines()[-1:] or None
    except BenchError as e:
        info["version"] = f"error: {e}"
    dummy = Backends(free_port(), free_port(), free_port(), free_port())
    for lh in (LOOPBACK, None):
        cfg = workdir / "probe.toml"
        cfg.write_text(standalone_config(dummy, dummy, lh, 1, "warn"))
        rc, out, err = procs.run("portunus-check", argv + ["--config", str(cfg), "--check"],
                                 timeout=60)
        info[f"check_listen_host_{lh}"] = {"rc": rc, "out": (out + err).strip()[-500:]}
        if rc == 0:
            info["listen_host"] = lh
            return lh, info
    raise BenchError("portunus --check rejected the benchmark config: "
                     + json.dumps({k: v for k, v in info.items() if k.startswith("check")}))
