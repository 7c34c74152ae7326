"""`portunus-server demo`: a newcomer's first command shows a working system and cleans up."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request

from conftest import portunus_cmd


def test_demo_serves_the_sample_rule_and_cleans_up_on_ctrl_c():
    p = subprocess.Popen(portunus_cmd("server") + ["demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, stdin=subprocess.DEVNULL)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Logs:"):
                break
        text = "".join(lines)
        assert "Portunus demo is running" in text, text + p.stderr.read() if p.poll() is not None else text
        url = re.search(r"Sample rule\s+(http://127\.0\.0\.1:\d+/)", text).group(1)
        state_dir = re.search(r"State lives in (\S+?)\.\n", text).group(1)
        body = urllib.request.urlopen(url, timeout=10).read()
        assert b"Hello through Portunus" in body
        api = re.search(r"Operator API\s+(\S+)", text).group(1)
        token = re.search(r"bearer token (\S+)", text).group(1)
        req = urllib.request.Request(api + "/v1/rules", headers={"Authorization": f"Bearer {token}"})
        assert b'"state":"active"' in urllib.request.urlopen(req, timeout=10).read()
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 0
        assert not os.path.exists(state_dir)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
