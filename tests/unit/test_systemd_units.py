"""The shipped systemd units give the zipapp a writable extraction cache.

A shiv zipapp unpacks its site-packages to $SHIV_ROOT (else ~/.shiv) at its first start.
The units run as system users without a home, under ProtectHome=yes and ProtectSystem=strict,
so SHIV_ROOT must point at the unit's own CacheDirectory (created, owned and kept by systemd).
"""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"


def _service(name: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    section = None
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


@pytest.mark.parametrize("unit", ["portunus-server.service", "portunus-client.service"])
def test_unit_points_shiv_root_at_its_cache_directory(unit):
    svc = _service(unit)
    env = dict(v.split("=", 1) for v in svc.get("Environment", []) if "=" in v)
    assert "SHIV_ROOT" in env, f"{unit}: no SHIV_ROOT: the zipapp would try ~/.shiv"
    cache_dirs = svc.get("CacheDirectory", [])
    assert len(cache_dirs) == 1, f"{unit}: one CacheDirectory expected, got {cache_dirs}"
    assert env["SHIV_ROOT"] == f"/var/cache/{cache_dirs[0]}"
    # the hardening that makes it necessary is still there (if it goes, this test should be revisited)
    assert svc["ProtectHome"] == ["yes"] and svc["ProtectSystem"] == ["strict"]
