"""No heavy import at start: each command line imports what it needs and nothing more (issue 15).

An import-set assertion, not a timing one: a fresh interpreter runs ``portunus.__main__.main`` from
the source tree with the given argv and reports ``sys.modules``. The modules named here cost
5-90 ms each to import (cryptography, sqlite3, ssl, http.server, urllib.request, the server's
wiring); a command that does not use them must not pay for them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

HARNESS = """
import json, sys
argv = json.loads(sys.argv[1])
try:
    from portunus.__main__ import main
    main(argv)
except SystemExit:
    pass
finally:
    with open(sys.argv[2], "w") as f:
        json.dump(sorted(sys.modules), f)
"""

SERVER_SIDE = {"sqlite3", "http.server", "portunus.server.app", "portunus.control.hub", "portunus.store.db",
               "portunus.http.app"}
HEAVY = {"cryptography", "ssl", "urllib.request", "http.client"} | SERVER_SIDE


def imported(tmp_path: Path, *args: str) -> set[str]:
    out = tmp_path / "modules.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTUNUS_")}
    env.update(PYTHONPATH=str(REPO), XDG_CONFIG_HOME=str(tmp_path), HOME=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", HARNESS, json.dumps(["portunus", *args]), str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.exists(), res.stderr
    return set(json.loads(out.read_text()))


@pytest.mark.parametrize("argv, never", [
    (["--version"], HEAVY | {"argparse", "dataclasses", "portunus.errors"}),
    (["--help"], HEAVY | {"argparse", "dataclasses", "portunus.errors"}),
    (["server", "--version"], HEAVY | {"argparse", "portunus.cli.server"}),
    (["client", "--help"], HEAVY | {"portunus.control.agent", "portunus.relay.runtime", "portunus.errors",
                                    "dataclasses"}),
    (["standalone", "--help"], HEAVY | {"portunus.relay.runtime"}),
    (["server", "--help"], HEAVY),
    (["server", "enroll-client", "--help"], HEAVY),
    (["server", "push-rule", "--help"], HEAVY),
])
def test_help_and_version_import_nothing_heavy(tmp_path, argv, never):
    mods = imported(tmp_path, *argv)
    assert "portunus.__main__" in mods
    assert sorted(m for m in mods if m.split(".")[0] in {x.split(".")[0] for x in never} and
                  any(m == x or m.startswith(x + ".") for x in never)) == []


def test_an_online_command_reads_serve_json_without_importing_serve(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "serve.json").write_text(json.dumps({"pid": os.getpid(), "operator_http_url": "http://127.0.0.1:9"}))
    mods = imported(tmp_path, "server", "--data-dir", str(data), "list-clients")  # no token: refused at once
    assert "portunus.server.runtime_info" in mods
    assert not mods & {"portunus.server.app", "portunus.control.hub", "portunus.http.app", "cryptography",
                       "sqlite3", "portunus.store.db"}


def test_client_start_and_enroll_import_no_server_side_module(tmp_path):
    bundle = tmp_path / "bad.json"
    bundle.write_text("{}")
    run = imported(tmp_path, "client", "--bundle", str(bundle))       # stops at the bundle check
    assert "portunus.client.app" in run
    enroll = imported(tmp_path, "client", "enroll", "portunus://127.0.0.1:1/enroll")  # stops at the URI check
    for mods in (run, enroll):
        assert not {m for m in mods if m in SERVER_SIDE or m.startswith(("portunus.server", "portunus.store",
                                                                           "portunus.http"))}
        assert "urllib.request" not in mods
        assert not mods & {"shutil", "bz2", "lzma"}  # argparse's terminal-width lookup (cli/client._Formatter)
    assert "urllib.parse" not in run      # the bundle is JSON; only enroll parses a URI
    assert "typing" not in enroll


def test_enroll_imports_neither_the_agent_nor_the_relay(tmp_path):
    """Redeeming a URI is one TLS exchange: ``control.redeem``, not the agent and its data plane."""
    mods = imported(tmp_path, "client", "enroll", "portunus://127.0.0.1:1/enroll")  # stops at the URI check
    assert "portunus.control.redeem" in mods
    assert sorted(m for m in mods if m == "portunus.control.agent" or m.startswith(("portunus.relay", "portunus.client"))
                  or m in {"portunus.loop", "portunus.netio", "portunus.control.channel"}) == []


def test_the_agent_still_exports_enroll():
    from portunus.control import agent, redeem
    assert agent.enroll is redeem.enroll


def test_client_start_and_enroll_do_not_import_cryptography(tmp_path):
    bundle = tmp_path / "bad.json"
    bundle.write_text("{}")
    assert "cryptography" not in imported(tmp_path, "client", "--bundle", str(bundle))
    assert "cryptography" not in imported(tmp_path, "client", "enroll", "portunus://127.0.0.1:1/enroll")


def test_gen_token_imports_neither_cryptography_nor_sqlite(tmp_path):
    mods = imported(tmp_path, "server", "gen-token")
    assert "cryptography" not in mods and "sqlite3" not in mods


FIRST_START = """
import json, sys
from portunus.control import tls
import portunus.server.app
from portunus.server import passwords
d = sys.argv[1]
info = tls.ensure_server_cert(d + "/server.crt", d + "/server.key")
tls.server_context(info)
passwords.start_hash_workers()
passwords.stop_hash_workers()
after_first = sorted(sys.modules)
again = tls.ensure_server_cert(d + "/server.crt", d + "/server.key")   # a restart reads the pair back
assert again.fingerprint == info.fingerprint
json.dump({"first": after_first, "restart": sorted(sys.modules)}, open(d + "/m.json", "w"))
"""


def test_a_first_start_makes_its_certificate_without_importing_cryptography(tmp_path):
    """serve's wiring and a new self-signed pair (control/selfsigned.py) need no cryptography; reading
    an existing pair back (a restart, an operator's files) still goes through it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTUNUS_")}
    subprocess.run([sys.executable, "-c", FIRST_START, str(tmp_path)], cwd=tmp_path, env=dict(env, PYTHONPATH=str(REPO)),
                   check=True, timeout=60)
    mods = json.loads((tmp_path / "m.json").read_text())
    assert [m for m in mods["first"] if m == "cryptography" or m.startswith("cryptography.")] == []
    assert "portunus.control.selfsigned" in mods["first"]
    assert "cryptography.x509" in mods["restart"]


def test_main_spells_the_same_exit_codes_as_the_error_table():
    import portunus.__main__ as entry
    from portunus import errors
    assert (entry.EXIT_GENERIC, entry.EXIT_USAGE) == (errors.EXIT_GENERIC, errors.EXIT_USAGE)


def test_migrations_read_the_same_from_the_package_dir_and_through_importlib_resources(monkeypatch):
    from portunus.store import db
    on_disk = db.load_migrations()
    real_isdir = os.path.isdir
    monkeypatch.setattr(db.os.path, "isdir", lambda p: False if p.endswith("migrations") else real_isdir(p))
    assert db.load_migrations() == on_disk and on_disk


@pytest.mark.parametrize("argv", [
    ["serve"], ["--data-dir", "/d", "serve"], ["--data-dir=/d", "serve", "--advertised-endpoint", "h:1"],
    ["--server", "http://x", "--data-dir", "serve", "serve"], ["serve", "--advertised-endpoint=h:2"],
])
def test_serve_parses_with_the_serve_only_parser_exactly_as_with_the_whole_tree(argv):
    from portunus.cli import server as cli_server
    assert cli_server.is_serve(argv)
    whole = vars(cli_server.build_parser().parse_args(argv))
    alone = vars(cli_server.build_parser(only_serve=True).parse_args(argv))
    assert whole == alone and whole["command"] == "serve"


@pytest.mark.parametrize("argv", [
    [], ["--help", "serve"], ["-h"], ["--data", "/d", "serve"], ["list-clients"], ["--data-dir", "serve"],
    ["--data-dir"], ["doctor", "serve"], ["--bogus", "serve"],
])
def test_anything_but_a_plain_serve_takes_the_whole_tree(argv):
    from portunus.cli import server as cli_server
    assert not cli_server.is_serve(argv)


def test_the_serve_only_parser_imports_no_other_command_module(tmp_path):
    out = tmp_path / "m.json"
    code = ("import json, sys\nfrom portunus.cli import server\nserver.build_parser(only_serve=True)"
            ".parse_args(['serve'])\njson.dump(sorted(sys.modules), open(sys.argv[1], 'w'))\n")
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                   check=True, timeout=60)
    mods = set(json.loads(out.read_text()))
    assert not mods & {"portunus.cli.caps", "portunus.cli.identity", "portunus.cli.quota", "portunus.cli.rules",
                       "portunus.doctor.cli", "sqlite3", "cryptography", "portunus.cli.output", "decimal"}


def test_an_error_of_a_role_still_reaches_the_operator_as_its_code_and_exit_code(tmp_path):
    """__main__ catches PortunusError without importing errors.py up front: the table's exit code
    and the one-line message still come out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTUNUS_")}
    res = subprocess.run([sys.executable, "-m", "portunus", "server", "--data-dir", str(tmp_path / "nope"),
                          "list-clients"], cwd=tmp_path, env=dict(env, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=60)
    from portunus.errors import ERRORS
    assert res.returncode == ERRORS["io_error"].exit_code != 0
    assert res.stderr.startswith("error: io_error: data dir ") and "Traceback" not in res.stderr


ONE_SHOT = """
import sys
import portunus.__main__ as entry
def role_main(role, args):
    print("enrolled as edge (piped, so block-buffered)")
    print("to stderr too", file=sys.stderr)
    return 0
entry._role_main = role_main
import atexit
atexit.register(lambda: print("ATEXIT RAN"))
sys.argv = ["portunus"] + sys.argv[1:]
code = entry.main(None if sys.argv[1:2] == ["client"] else sys.argv)
print("main returned", code)
"""


@pytest.mark.parametrize("argv, fast", [(["client", "enroll", "portunus://x"], True),
                                        (["client", "--bundle", "b.json"], False)])
def test_client_enroll_ends_without_interpreter_teardown_and_loses_no_output(tmp_path, argv, fast):
    """`client enroll` as the program: its output is flushed, then the process ends at once
    (os._exit: no finalization, no atexit); any other command returns from main as before."""
    res = subprocess.run([sys.executable, "-c", ONE_SHOT, *argv], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("enrolled as edge (piped, so block-buffered)\n")
    assert "to stderr too" in res.stderr
    assert ("main returned" in res.stdout, "ATEXIT RAN" in res.stdout) == ((False, False) if fast else (True, True))


def test_main_with_an_explicit_argv_never_exits_the_caller(tmp_path):
    out = tmp_path / "o.txt"
    code = ("import portunus.__main__ as e\ne._role_main = lambda role, args: 0\n"
            f"r = e.main(['portunus', 'client', 'enroll', 'x'])\nopen({str(out)!r}, 'w').write(str(r))\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                   check=True, timeout=60)
    assert out.read_text() == "0"


@pytest.mark.parametrize("columns", ["60", "132"])
def test_the_client_help_is_as_wide_as_argparse_would_make_it(monkeypatch, columns):
    """cli/client._Formatter finds the width as shutil.get_terminal_size would (COLUMNS first)."""
    import argparse
    import shutil
    from portunus.cli import client as cli_client
    monkeypatch.setenv("COLUMNS", columns)
    ours = cli_client._run_parser().format_help()
    parser = cli_client._run_parser()
    parser.formatter_class = argparse.HelpFormatter
    assert shutil.get_terminal_size().columns == int(columns)
    assert ours == parser.format_help() and "--bundle" in ours
