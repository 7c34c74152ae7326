"""Smoke runs of the scale benches (bench/scale_clients.py, bench/client_memory.py) at tiny sizes.

They run against the product under test ($PORTUNUS_BIN, else the source tree), so neither bench
rots. No figure is judged here (figures live in bench/, never in timed tests): each run must
finish, exit 0 and report every figure it promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _product_args() -> list[str]:
    binary = os.environ.get("PORTUNUS_BIN")
    return ["--bin", binary] if binary else ["--source"]


def _run(script: str, args: list[str], tmp_path: Path, timeout: float) -> dict:
    out = tmp_path / (Path(script).stem + ".json")
    r = subprocess.run([sys.executable, str(REPO / "bench" / script), *_product_args(), *args, "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{script} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.timeout(60)
def test_scale_clients_smoke(tmp_path):
    res = _run("scale_clients.py", ["--clients", "20", "--pushes", "10", "--idle-secs", "1",
                                          "--settle-secs", "0"], tmp_path, 50)
    assert res["metric_clients_connected"] == 20 and res["still_connected"] == 20
    assert res["harness_errors"] == []
    assert res["push_ms"]["n"] == 10 and res["push_ms"]["p99"] > 0
    assert res["push_server_ms"]["n"] == 10
    assert res["clients_with_rules"] >= 1
    # the server restarted on the same data and port: every agent came back by itself
    assert res["restart"]["back"] == 20 and res["restart"]["connected_metric"] == 20
    for phase in ("idle_heartbeats", "idle_stats"):
        assert res[phase]["server_cpu_pct"] >= 0
        assert res[phase]["server_VmRSS_kib"] > 0


@pytest.mark.timeout(60)
def test_client_memory_smoke(tmp_path):
    res = _run("client_memory.py", ["--ports", "16", "--connections", "100"], tmp_path, 50)
    modes = {r["mode"]: r for r in res["results"]}
    assert set(modes) == {"client", "standalone"}
    for r in modes.values():
        assert r["connections"] == 100
        assert r["mem_with_conns"]["VmRSS"] > 0 and r["mem_with_conns"]["fds"] >= 200  # 2 per connection
        assert "bytes_per_connection" in r
    assert "bytes_per_listener" in modes["client"]
