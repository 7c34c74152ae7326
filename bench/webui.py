#!/usr/bin/env python3
"""Web UI benchmark (issue 11 budget): dashboard load time and the rules list with 5 000 rules.

Starts, on 127.0.0.1 in a temp dir, a real server (source tree by default, or --bin) and one
enrolled client, pushes --rules rules to it over the API, logs a superadmin in through the
login page of a real headless Chromium, and reads the Performance API:

  * dashboard_10_rules_ms / dashboard_N_rules_ms: navigation start -> the dashboard drawn with
    its data (app.js marks ``portunus:rendered`` after a page's render() resolved), with 10
    rules and with all N; dashboard_cold_10_rules_ms: the same with the browser cache emptied
    before each load (every UI file fetched);
  * rules_page_ms: navigation start -> the rules page drawn with all N rules fetched;
  * rules_api_ms: the GET /v1/rules resource timing inside that load;
  * rules_filter_ms / rules_page_flip_ms: one re-filter (a search keystroke) / one page flip
    over the N rules (the ``portunus:rules-draw`` measure).

Medians over --repeat loads. Needs chromium, chromedriver and selenium (requirements-dev.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "e2e" / "webui"))
TOKEN = "bench-operator-token-0123456789abcdefghijklmnop"
PASSWORD = "bench-password-0123"


def role_cmd(bin_path: str | None, role: str) -> list[str]:
    return [bin_path, role] if bin_path else [sys.executable, "-m", "portunus", role]


def api(base: str, method: str, path: str, body=None, timeout: float = 60):
    req = urllib.request.Request(base + "/v1/" + path, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_event(log: Path, event: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if f'"event":"{event}"' in line.replace(" ", ""):
                return json.loads(line)
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {event} in {log}")


def free_block(n: int) -> int:
    import random
    import socket

    def free(p):
        s = socket.socket()
        try:
            s.bind(("0.0.0.0", p))
            return True
        except OSError:
            return False
        finally:
            s.close()
    for _ in range(200):
        base = random.randrange(10000, 32000 - n)
        if all(free(p) for p in range(base, base + n)):
            return base
    raise SystemExit("no free port block")


def start(tmp: Path, bin_path: str | None, procs: list):
    data = tmp / "data"
    data.mkdir()
    (data / "server.toml").write_text(f'control_listen = "127.0.0.1:0"\noperator_http_listen = "127.0.0.1:0"\n'
                                      f'metrics_listen = "127.0.0.1:0"\noperator_token = "{TOKEN}"\n'
                                      '')
    env = {**os.environ, "PORTUNUS_ALLOW_ANY_FS": "1"}
    log = tmp / "server.log"
    procs.append(subprocess.Popen(role_cmd(bin_path, "server") + ["--data-dir", str(data), "serve"], env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True))
    base = wait_event(log, "server.ready")["operator_http_url"]
    status, res = api(base, "POST", "client-enrollments", {"name": "bench-edge"})
    assert status == 201, res
    bundle = tmp / "edge.json"
    subprocess.run(role_cmd(bin_path, "client") + ["enroll", res["enrollment_uri"], "--out", str(bundle)], check=True,
                   cwd=REPO, capture_output=True, timeout=30)
    clog = tmp / "client.log"
    procs.append(subprocess.Popen(role_cmd(bin_path, "client") + ["--bundle", str(bundle)], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(clog, "w"), start_new_session=True))
    wait_event(clog, "control.connected")
    return base, res["client"]["client_id"]


def push_rules(base: str, client_id: str, n: int) -> float:
    first = free_block(n)
    t0 = time.monotonic()

    def one(i):
        status, res = api(base, "POST", "rules", {"client": client_id, "listen_port": first + i,
                                                  "target": f"127.0.0.1:{9 + i % 50}", "ack_timeout_secs": 5})
        return status
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(n)))
    bad = [s for s in statuses if s not in (201, 202)]
    if bad:
        print(f"note: {len(bad)} of {n} pushes failed (e.g. HTTP {bad[0]})", file=sys.stderr)
    return time.monotonic() - t0


def rendered_at(b, path: str, timeout: float = 60) -> float:
    return b.wait(lambda: b.js("const m = performance.getEntriesByName('portunus:rendered').find(e => e.detail === arguments[0]);"
                               "return m ? m.startTime : null;", path), timeout, f"{path} rendered")


def login(base: str):
    from webui_browser import Browser
    b = Browser(1280, 900)
    b.get(base + "/login")
    b.set_field("user_id", "bench")
    b.set_field("password", PASSWORD)
    b.click("main form button[type=submit]")
    b.wait(lambda: b.path() == "/", 20, "logged in")
    return b


BREAKDOWN = """
  const nav = performance.getEntriesByType('navigation')[0];
  const res = performance.getEntriesByType('resource');
  const end = (pred) => Math.round(Math.max(0, ...res.filter(pred).map(e => e.responseEnd)));
  return {html: Math.round(nav.responseEnd), modules: end(e => e.name.endsWith('.js')),
          session: end(e => e.name.endsWith('/v1/auth/status')), clients: end(e => e.name.endsWith('/v1/clients')),
          rules: end(e => e.name.endsWith('/v1/rules'))};
"""


def measure_dashboard(b, base: str, repeat: int, cold: bool = False) -> tuple[list[float], dict]:
    """Warm: the versioned UI files come from the browser cache. Cold: the cache is emptied before each load."""
    out = []
    for _ in range(repeat):
        if cold:
            b.driver.execute_cdp_cmd("Network.clearBrowserCache", {})
        b.get(base + "/")
        out.append(rendered_at(b, "/"))
    return out, b.js(BREAKDOWN)


def measure_rules(b, base: str, repeat: int, n_rules: int) -> dict:
    out = {k: [] for k in ("rules_page_ms", "rules_api_ms", "rules_filter_ms", "rules_page_flip_ms")}
    last_draw = ("const m = performance.getEntriesByName('portunus:rules-draw');"
                 "return m.length ? m[m.length - 1].duration : null;")
    for _ in range(repeat):
        b.get(base + "/rules")
        out["rules_page_ms"].append(rendered_at(b, "/rules"))
        out["rules_api_ms"].append(b.js("const r = performance.getEntriesByType('resource')"
                                        ".find(e => e.name.endsWith('/v1/rules')); return r ? r.duration : null;"))
        count = b.find("#rules-count").text
        assert f"of {n_rules} rules" in count, count
        for kind, action in (("rules_filter_ms", lambda: b.find(".filters input[type=search]").send_keys("1")),
                             ("rules_page_flip_ms", lambda: b.click_text("Next", ".pager button"))):
            b.js("performance.clearMeasures('portunus:rules-draw')")
            action()
            out[kind].append(b.wait(lambda: b.js(last_draw), 20, kind))
            if kind == "rules_filter_ms":
                b.find(".filters input[type=search]").clear()
                b.js("document.querySelector('.filters input[type=search]').dispatchEvent(new Event('input'))")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", help="the built zipapp (default: the source tree)")
    ap.add_argument("--rules", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "webui.json")
    args = ap.parse_args()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="portunus-webui-bench-") as tmp:
        try:
            base, client_id = start(Path(tmp), args.bin, procs)
            status, res = api(base, "POST", "users", {"user_id": "bench", "display_name": "Bench", "role": "superadmin",
                                                      "password": PASSWORD})
            if status != 201:
                raise SystemExit(f"cannot create the bench superadmin (HTTP {status} {res}); are the identity routes wired?")
            push_rules(base, client_id, 10)
            b = login(base)
            try:
                raw, phases = {}, {}
                raw["dashboard_cold_10_rules_ms"], phases["dashboard_cold_10_rules"] = \
                    measure_dashboard(b, base, args.repeat, cold=True)
                raw["dashboard_10_rules_ms"], phases["dashboard_10_rules"] = measure_dashboard(b, base, args.repeat)
                push_secs = push_rules(base, client_id, args.rules - 10)
                n = len(api(base, "GET", "rules")[1]["rules"])
                raw[f"dashboard_{n}_rules_ms"], phases[f"dashboard_{n}_rules"] = measure_dashboard(b, base, args.repeat)
                raw.update(measure_rules(b, base, args.repeat, n))
            finally:
                b.quit()
        finally:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
    summary = {k: round(statistics.median(v), 1) for k, v in raw.items() if v}
    summary.update(rules=n, push_secs=round(push_secs, 1), repeat=args.repeat)
    for k, v in summary.items():
        print(f"{k:30} {v}")
    for k, v in phases.items():  # when each part of the last load had arrived, ms after navigation start
        print(f"{k + ' phases':30} {v}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "phases": phases, "samples": raw}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
