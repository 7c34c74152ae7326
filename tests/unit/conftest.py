"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest

from portunus.store import Store
from portunus.store.db import ALLOW_ANY_FS_ENV


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A real store in a temp dir (any filesystem allowed: tmpfs is fine for tests)."""
    monkeypatch.setenv(ALLOW_ANY_FS_ENV, "1")
    s = Store.open(str(tmp_path / "data"))
    yield s
    s.close()
