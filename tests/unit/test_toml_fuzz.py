"""A seeded TOML mutator (issue 8 point 10): mutated copies of the shipped configs never crash a loader.

Each case is a mutation of examples/portunus.toml (standalone loader) or server.toml.example (server
loader). The only acceptable outcomes are a loaded config or ``config_invalid``; anything else (a
RecursionError, a TypeError, ``internal``) is a bug. Most cases run in-process for speed; a few dozen
go through the real ``--check`` CLI. ``PORTUNUS_FUZZ_CASES=N`` raises the in-process count.
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from conftest import ROOT, portunus_cmd
from portunus.errors import PortunusError
from portunus.server import config as server_config
from portunus.standalone import config as standalone_config

SEED = 20261201
CASES = int(os.environ.get("PORTUNUS_FUZZ_CASES", "300"))
CLI_CASES = max(36, CASES // 10)

STANDALONE_EXAMPLE = (ROOT / "examples" / "portunus.toml").read_text()
SERVER_EXAMPLE = (ROOT / "server.toml.example").read_text()

# Values a hostile or careless hand might write where a value belongs.
VALUES = [
    "0", "-1", "65536", "99999999999999999999999", "-9223372036854775809", "1e400", "nan", "-inf", "0x10",
    "0o777", "1_000", "true", "false", '""', '"x"', '"\\u0000"', '"²"', '"٣"', '"127.0.0.1:²"', '"[::1]:0"',
    '"0.0.0.0:70000"', '"localhost:-1"', '"a-b"', '"1-0"', '"30000-29999"', '"1-65535"', '"host:1-2"',
    "[]", "[1, 2]", '["a", 1]', "{}", "{ a = 1 }", "{ host = 1, port = \"x\" }", "1979-05-27T07:32:00Z",
    "07:32:00", "1979-05-27", "'''multi\nline'''", '"""\nmulti\n"""', "[[]]", "[{}]",
    "[" * 40 + "]" * 40, "{a=" * 40 + "1" + "}" * 40, "[" * 1000 + "]" * 1000, "{a=" * 1000 + "1" + "}" * 1000,
    '"' + "x" * 5000 + '"', '"\\ud800"', "inf", '"' + "é" * 10 + '"',
]
JUNK = ["[", "]", "{", "}", "=", '"', "'", "#", "\\", "\n", "[[", "]]", "\x00", "\x7f", "\u2028", ".", ",", " "]


def _lines_with_values(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if "=" in line and not line.lstrip().startswith("#")]


def mutate(text: str, rng: random.Random) -> bytes:
    """One to three random edits of a TOML document; returns bytes (some edits break UTF-8 on purpose)."""
    lines = text.split("\n")
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(10)
        valued = _lines_with_values(lines)
        if op <= 3 and valued:  # replace a value
            i = rng.choice(valued)
            key = lines[i].split("=", 1)[0]
            lines[i] = f"{key}= {rng.choice(VALUES)}"
        elif op == 4 and lines:  # delete a line
            del lines[rng.randrange(len(lines))]
        elif op == 5 and lines:  # duplicate a line (duplicate keys, tables, rules)
            i = rng.randrange(len(lines))
            lines.insert(rng.randrange(len(lines) + 1), lines[i])
        elif op == 6 and valued:  # rename a key
            i = rng.choice(valued)
            value = lines[i].split("=", 1)[1]
            lines[i] = rng.choice(["name", "bogus", "listen", "rule", "global", "a.b.c", '"q"', "x-y"]) + " =" + value
        elif op == 7:  # insert a table header or a deep inline value on a new line
            lines.insert(rng.randrange(len(lines) + 1),
                         rng.choice(["[[rule]]", "[global]", "[stats]", "[defaults]", "[rule]", "[[global]]",
                                     "[x.y]", "targets = " + rng.choice(VALUES), "rule = 1"]))
        elif op == 8:  # splice junk characters into the text
            joined = "\n".join(lines)
            pos = rng.randrange(len(joined) + 1)
            joined = joined[:pos] + "".join(rng.choice(JUNK) for _ in range(rng.randint(1, 4))) + joined[pos:]
            lines = joined.split("\n")
        else:  # truncate
            joined = "\n".join(lines)
            lines = joined[:rng.randrange(len(joined) + 1)].split("\n")
    raw = "\n".join(lines).encode("utf-8", "surrogatepass")
    if rng.random() < 0.05 and raw:  # a byte that is not UTF-8
        pos = rng.randrange(len(raw))
        raw = raw[:pos] + bytes([rng.choice([0x80, 0xC3, 0xFF, 0xED])]) + raw[pos:]
    return raw


def _cases(example: str, count: int, salt: int) -> list[bytes]:
    rng = random.Random(SEED + salt)
    return [mutate(example, rng) for _ in range(count)]


def _fail(kind: str, n: int, raw: bytes, exc: BaseException) -> None:
    pytest.fail(f"{kind} case #{n} (seed {SEED}) raised {type(exc).__name__}: {exc}\n--- input ---\n"
                f"{raw[:2000].decode('utf-8', 'replace')}")


def test_mutated_standalone_configs_load_or_fail_with_config_invalid(tmp_path):
    outcomes = {"ok": 0, "config_invalid": 0}
    for n, raw in enumerate(_cases(STANDALONE_EXAMPLE, CASES, 0)):
        path = tmp_path / f"case{n}.toml"
        path.write_bytes(raw)
        try:
            standalone_config.load(str(path))
            outcomes["ok"] += 1
        except PortunusError as exc:
            if exc.code != "config_invalid":
                _fail("standalone", n, raw, exc)
            assert str(path) in exc.message  # every error names the file
            outcomes["config_invalid"] += 1
        except BaseException as exc:  # noqa: BLE001 -- anything else is the bug this test hunts
            _fail("standalone", n, raw, exc)
    # the mutator must exercise both sides, or it tests nothing
    assert outcomes["ok"] > 0 and outcomes["config_invalid"] > CASES // 2, outcomes


def test_mutated_server_configs_load_or_fail_with_config_invalid(tmp_path):
    outcomes = {"ok": 0, "config_invalid": 0}
    for n, raw in enumerate(_cases(SERVER_EXAMPLE, CASES, 1)):
        data_dir = tmp_path / f"d{n}"
        data_dir.mkdir()
        (data_dir / "server.toml").write_bytes(raw)
        try:
            cfg = server_config.load(str(data_dir))
            cfg.public_origin, cfg.cert_path, cfg.key_path  # the derived values must be total too
            outcomes["ok"] += 1
        except PortunusError as exc:
            if exc.code != "config_invalid":
                _fail("server", n, raw, exc)
            outcomes["config_invalid"] += 1
        except BaseException as exc:  # noqa: BLE001
            _fail("server", n, raw, exc)
    assert outcomes["ok"] > 0 and outcomes["config_invalid"] > CASES // 4, outcomes


def test_mutated_configs_through_the_real_check_cli(tmp_path):
    env = dict(os.environ)
    env.pop("PORTUNUS_DEBUG", None)
    seen = set()
    for n, raw in enumerate(_cases(STANDALONE_EXAMPLE, CLI_CASES, 2)):
        path = tmp_path / f"cli{n}.toml"
        path.write_bytes(raw)
        r = subprocess.run(portunus_cmd("standalone") + ["--check", "--config", str(path)], capture_output=True,
                           text=True, errors="replace", timeout=30, stdin=subprocess.DEVNULL, env=env)
        text = raw[:2000].decode("utf-8", "replace")
        assert "Traceback" not in r.stderr and "internal" not in r.stderr, f"case #{n}:\n{r.stderr}\n{text}"
        if r.returncode == 0:
            assert r.stdout.strip() == "ok", f"case #{n}: {r.stdout!r}"
        else:
            assert r.returncode == 2, f"case #{n}: exit {r.returncode}\n{r.stderr}\n{text}"
            assert r.stderr.startswith("error: config_invalid: "), f"case #{n}: {r.stderr}"
            assert len(r.stderr.strip().splitlines()) == 1, f"case #{n}: one line expected:\n{r.stderr}"
        seen.add(r.returncode)
    assert seen == {0, 2}, seen


@pytest.mark.parametrize("loader", ["standalone", "server"])
@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_deeply_nested_values_are_config_invalid_naming_the_key(tmp_path, loader, depth):
    deep = "[" * depth + "]" * depth
    if loader == "standalone":
        path = tmp_path / "deep.toml"
        path.write_text(STANDALONE_EXAMPLE.replace('target = "127.0.0.1:8000"', f"target = {deep}", 1))
        with pytest.raises(PortunusError) as err:
            standalone_config.load(str(path))
        assert "[[rule]] 'target'" in err.value.message
    else:
        (tmp_path / "server.toml").write_text(f"log_format = \"json\"\ncontrol_listen = {deep}\n")
        with pytest.raises(PortunusError) as err:
            server_config.load(str(tmp_path))
        assert "line 2: 'control_listen'" in err.value.message
    assert err.value.code == "config_invalid"
    assert "nested more than 32 levels" in err.value.message


def test_brackets_inside_strings_and_comments_are_not_nesting(tmp_path):
    many = "[{" * 50
    path = tmp_path / "quoted.toml"
    path.write_text(f'# {many}\n[global]\nlabel = "{many}"\n' + f"log_level = 'info' # {many}\n"
                    + "[defaults]" + STANDALONE_EXAMPLE.split("[defaults]", 1)[1])
    cfg = standalone_config.load(str(path))
    assert cfg.label == many


def test_deep_toml_through_check_is_config_invalid_exit_2(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text('[[rule]]\nname = "r"\nlisten_port = 20001\ntarget = ' + "[" * 1000 + "]" * 1000 + "\n")
    r = subprocess.run(portunus_cmd("standalone") + ["--check", "--config", str(path)], capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: config_invalid: ") and "'target'" in r.stderr, r.stderr


@pytest.mark.parametrize("text,key", [
    ("[" + ".".join(["a"] * 1000) + "]\nx = 1\n", "a.a.a.a.a.a.…"),
    ("[global]\nlabel." + ".".join(["a"] * 1000) + " = 1\n", "global.label.a.a.a.a.…"),
    ('[[rule]]\nname = "r"\nlisten_port = 1\ntarget = {' + ".".join(["a"] * 100) + " = 1}\n",
     "rule[0].target.a.a.a.…"),
])
def test_dotted_keys_nesting_without_brackets_are_config_invalid_too(tmp_path, text, key):
    path = tmp_path / "dotted.toml"
    path.write_text(text)
    with pytest.raises(PortunusError) as err:
        standalone_config.load(str(path))
    assert err.value.code == "config_invalid"
    assert f"key {key!r} is nested more than 32 levels deep" in err.value.message


def test_error_messages_show_huge_values_shortened(tmp_path):
    path = tmp_path / "long.toml"
    rest = STANDALONE_EXAMPLE.split("\n[defaults]", 1)[1]
    path.write_text(f"[global]\nlog_level = '{'x' * 100_000}'\n[defaults]{rest}")
    with pytest.raises(PortunusError) as err:
        standalone_config.load(str(path))
    assert "[global] log_level" in err.value.message and len(err.value.message) < 400
