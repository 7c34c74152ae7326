"""serve.json: what a running ``serve`` tells the CLI and doctor about itself (pid, listeners, pin).

A module of its own so that reading it (every online CLI command without --server) does not
import what ``serve`` itself needs (TLS, the hub, HTTP, the store).
"""

from __future__ import annotations

import json
import os

RUNTIME_FILE = "serve.json"


def runtime_info_path(data_dir: str) -> str:
    return os.path.join(data_dir, RUNTIME_FILE)


def read_runtime_info(data_dir: str) -> dict | None:
    try:
        with open(runtime_info_path(data_dir)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
