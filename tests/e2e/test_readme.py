"""The README's commands, run exactly as written against the built dist/.

The "Try it" section's fenced `sh` blocks are parsed, so if someone edits the
README the test follows: its first command is `./build.sh && <demo command>`;
the demo part runs from the repo root until its URL answers, then Ctrl-C. Every
other `dist/portunus-*` command there must exit 0 and print something.
"""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from conftest import ROOT
from portunus import __version__
from demo_run import built_binary, repo_workdir, run_demo_to_ctrl_c

BUILD_PREFIX = "./build.sh && "


def section(markdown: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\b.*?$(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def sh_commands(text: str) -> list[str]:
    """Commands of the fenced ```sh blocks, in order, without trailing `# comments`."""
    out = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S):
        for line in block.splitlines():
            command = re.sub(r"(^|\s+)#.*$", "", line).strip()
            if command:
                out.append(command)
    return out


def try_it_commands() -> list[str]:
    commands = sh_commands(section((ROOT / "README.md").read_text(), "Try it"))
    assert commands, "the Try it section has no sh commands"
    return commands


def test_parser_reads_blocks_and_drops_comments():
    text = "## Try it\n\n```sh\na && b   # first\n# only a comment\nc --x\n```\n\n```toml\nno = 1\n```\n## Next\n"
    assert sh_commands(section(text, "Try it")) == ["a && b", "c --x"]


def test_first_command_of_try_it_brings_the_demo_up_and_ctrl_c_cleans_up(tmp_path):
    first = try_it_commands()[0]
    assert first.startswith(BUILD_PREFIX), f"the first Try it command no longer starts with ./build.sh: {first!r}"
    demo = first[len(BUILD_PREFIX):]
    built_binary()
    # bash runs a lone command by exec, as an interactive shell runs it in the foreground: Ctrl-C reaches the demo
    run_demo_to_ctrl_c(["bash", "-c", demo], cwd=repo_workdir(tmp_path))


ROLE_COMMANDS = [c for c in try_it_commands() if c.startswith("dist/portunus") and " demo" not in c]


def test_try_it_shows_every_role_symlink():
    shown = {shlex.split(c)[0] for c in ROLE_COMMANDS}
    assert shown >= {"dist/portunus-server", "dist/portunus-client", "dist/portunus-standalone"}, shown


@pytest.mark.parametrize("command", ROLE_COMMANDS)
def test_role_symlink_command_runs_as_written(command, tmp_path):
    built_binary()
    res = subprocess.run(["bash", "-c", command], cwd=repo_workdir(tmp_path), capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"{command!r} exited {res.returncode}:\n{res.stdout}{res.stderr}"
    assert res.stdout.strip(), f"{command!r} printed nothing"
    assert "error:" not in res.stderr, res.stderr
    if command.endswith("--version"):
        assert __version__ in res.stdout  # the build under test, not some older dist/
