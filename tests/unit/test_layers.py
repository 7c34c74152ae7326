"""The arrows of docs/ARCHITECTURE.md, checked on the code: which package may import which.

Imports are read with ``ast`` — module level and inside functions, ``import x`` and
``from x import y`` (absolute and relative) — so a lazy import cannot hide an arrow.
Add a layer by adding a row to ``RULES``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "portunus"


@dataclass(frozen=True)
class LayerRule:
    layer: str                       # a package (``portunus.http``) or module, and everything below it
    may_import: tuple = ()           # if set: the only portunus modules it may import (and below them)
    must_not_import: tuple = ()      # portunus modules it may never import (and below them)
    why: str = ""
    except_modules: tuple = ()       # modules under ``layer`` this rule leaves out (and below them)


BASE = ("portunus.errors", "portunus.log")
# the command layer: argument parsing and the doctor's checks; only it may reach into cli/
COMMANDS = ("portunus.__main__", "portunus.cli", "portunus.doctor")

RULES = [
    LayerRule("portunus.http",
              may_import=("portunus.http", "portunus.server", "portunus.errors", "portunus.log", "portunus.model"),
              why="http/ talks only to server/: the store is reached through server.access"),
    LayerRule("portunus.relay",
              must_not_import=("portunus.store", "portunus.http", "portunus.server", "portunus.control",
                               "portunus.cli", "portunus.standalone", "portunus.client", "portunus.doctor"),
              why="the data plane knows nothing of HTTP, SQL, the control protocol or wiring"),
    LayerRule("portunus.store", may_import=("portunus.store", "portunus.model") + BASE,
              why="the store holds SQL only; services that combine aggregates live in server/"),
    LayerRule("portunus.control",
              must_not_import=("portunus.store", "portunus.server", "portunus.http", "portunus.cli",
                               "portunus.standalone", "portunus.client", "portunus.doctor"),
              why="the control plane reaches the server's state through control.registry.ClientRegistry"),
    LayerRule("portunus.control", must_not_import=("portunus.relay",), except_modules=("portunus.control.agent",),
              why="only the client end (agent) drives the relay runtime"),
    LayerRule("portunus.server",
              must_not_import=("portunus.cli", "portunus.relay", "portunus.standalone", "portunus.client",
                               "portunus.doctor"),
              why="server/ is below the command line and beside the data plane"),
    LayerRule("portunus.server", must_not_import=("portunus.http",), except_modules=("portunus.server.app",),
              why="only serve's wiring (server.app) starts the HTTP listeners; services never call up into http/"),
    LayerRule("portunus.client",
              must_not_import=("portunus.store", "portunus.server", "portunus.http", "portunus.standalone",
                               "portunus.cli", "portunus.doctor"),
              why="the client wiring runs the agent and the relay; it has no database and serves no API"),
    LayerRule("portunus.standalone",
              may_import=("portunus.standalone", "portunus.relay", "portunus.model", "portunus.loop",
                          "portunus.sysinfo", "portunus.server.config") + BASE,
              why="standalone drives the relay from TOML (server.config only for the shared strict TOML reader)"),
    LayerRule("portunus.netio", may_import=BASE, why="socket plumbing sits below relay/ and control/"),
    LayerRule("portunus.loop", may_import=("portunus.log",), why="the reactor knows only how to log"),
    LayerRule("portunus.model", may_import=("portunus.errors", "portunus.ratelimit"),
              why="the rule model is shared by every role"),
    LayerRule("portunus.ratelimit", may_import=("portunus.errors",),
              why="rate limits are part of the rule model (re-exported by portunus.model)"),
    LayerRule("portunus.errors", may_import=("portunus.errors",), why="the error table is the bottom layer"),
    LayerRule("portunus.log", may_import=("portunus.log",), why="logging is the bottom layer"),
    LayerRule("portunus.sysinfo", may_import=BASE, why="host facts are read by every role"),
    LayerRule("portunus", must_not_import=("portunus.cli",), except_modules=COMMANDS,
              why="nothing below the command layer imports cli/ (__main__ picks a role's cli module)"),
    LayerRule("portunus", must_not_import=("portunus.doctor",), except_modules=COMMANDS,
              why="doctor is a command: only the command line dispatches to it"),
]

# ``from .. import __version__`` imports the top package for a name, not a layer
TOP_PACKAGE_NAMES = {"__version__"}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module) for every portunus import in ``source``, wherever it appears."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # ``from portunus import store`` imports portunus.store; ``from x import name`` imports x
                if base == "portunus" and alias.name not in TOP_PACKAGE_NAMES:
                    found.append((node.lineno, f"portunus.{alias.name}"))
                else:
                    found.append((node.lineno, base))
    return [(line, name) for line, name in found if _within(name, "portunus")]


def violations(rule: LayerRule, module: str, source: str, is_package: bool = False) -> list[str]:
    out = []
    for line, target in imported_modules(source, module, is_package):
        if target == "portunus":  # the top package itself (its __version__)
            continue
        if rule.may_import and not any(_within(target, allowed) for allowed in rule.may_import):
            out.append(f"{module}:{line} imports {target} ({rule.why})")
        if any(_within(target, banned) for banned in rule.must_not_import):
            out.append(f"{module}:{line} imports {target} ({rule.why})")
    return out


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, module_name(path)


@pytest.mark.parametrize("rule", RULES, ids=[r.layer for r in RULES])
def test_no_arrow_points_the_wrong_way(rule):
    checked, problems = 0, []
    for path, module in _sources():
        if _within(module, rule.layer) and not any(_within(module, x) for x in rule.except_modules):
            checked += 1
            problems += violations(rule, module, path.read_text(encoding="utf-8"), _is_package(path))
    assert checked, f"no module found under {rule.layer}"
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ the checker itself

HTTP = RULES[0]
RELAY = RULES[1]


@pytest.mark.parametrize("source", [
    "from ..store import operators\n",
    "from ..store.db import Store\n",
    "import portunus.store.clients\n",
    "from portunus import store\n",
    "from .. import store\n",
    "def handler():\n    from ..store import audit\n    return audit\n",
    "class A:\n    def m(self):\n        import portunus.control.hub\n",
    "from ..cli import server\n",
    "from ..standalone.app import run\n",
    "from ..relay import tcp\n",
])
def test_http_importing_below_server_is_caught(source):
    assert violations(HTTP, "portunus.http.app", source)


@pytest.mark.parametrize("source", [
    "from ..server.access import OperatorAccess\n",
    "from ..errors import PortunusError\nfrom ..log import log\nfrom ..model import Rule\n",
    "from .. import __version__\n",
    "from . import routes\nfrom .auth import AuthSeam\n",
    "import json\nimport http.server\n",
])
def test_what_http_may_import_passes(source):
    assert violations(HTTP, "portunus.http.app", source) == []


def test_relative_imports_resolve_from_a_package_init():
    assert imported_modules("from . import app\n", "portunus.http", is_package=True) == [(1, "portunus.http")]
    assert violations(HTTP, "portunus.http", "from ..store import db\n", is_package=True)


@pytest.mark.parametrize("source", [
    "from ..store import rules\n", "from ..server.core import ServerCore\n", "import portunus.http.app\n",
    "def f():\n    from ..control import hub\n", "from ..cli import client\n",
])
def test_relay_importing_upwards_is_caught(source):
    assert violations(RELAY, "portunus.relay.tcp", source)


def test_relay_may_import_the_loop_log_and_model():
    assert violations(RELAY, "portunus.relay.tcp", "from ..loop import Loop\nfrom ..model import Rule\n"
                                                  "from . import splice\n") == []


def _broken_rules(module: str, source: str) -> list[str]:
    """Every rule ``module`` falls under that ``source`` breaks (what the table test would report)."""
    out = []
    for rule in RULES:
        if _within(module, rule.layer) and not any(_within(module, x) for x in rule.except_modules):
            out += violations(rule, module, source)
    return out


@pytest.mark.parametrize("module, source", [
    ("portunus.control.hub", "def f():\n    from ..store import clients\n"),
    ("portunus.control.hub", "from ..relay.runtime import RuleRuntime\n"),
    ("portunus.control.agent", "from ..server.core import ServerCore\n"),
    ("portunus.server.core", "from ..http.app import OperatorAPI\n"),
    ("portunus.server.quotas", "from ..cli.output import table\n"),
    ("portunus.store.rules", "from ..server.quotas import QuotaService\n"),
    ("portunus.store.clients", "from ..control.tls import pin\n"),
    ("portunus.netio", "from .relay.context import RelayContext\n"),
    ("portunus.model", "from .log import log\n"),
    ("portunus.loop", "from .relay import tcp\n"),
    ("portunus.client.app", "from ..store.db import Store\n"),
    ("portunus.standalone.app", "from ..control.agent import Agent\n"),
    ("portunus.standalone.config", "from ..server.core import ServerCore\n"),
    ("portunus.relay.tcp", "from ..doctor import host\n"),
])
def test_an_arrow_pointing_up_is_caught(module, source):
    assert _broken_rules(module, source)


@pytest.mark.parametrize("module, source", [
    ("portunus.control.agent", "from ..relay.runtime import RuleRuntime\n"),
    ("portunus.control.hub", "from .registry import ClientRegistry\nfrom ..netio import family_of\n"),
    ("portunus.server.app", "from ..http.app import make_server\nfrom ..control.hub import Hub\n"),
    ("portunus.server.client_registry", "from ..store import clients\n"),
    ("portunus.store.rules", "from ..model import Rule\nfrom ..errors import PortunusError\n"),
    ("portunus.client.app", "from ..control.agent import Agent\nfrom ..relay.runtime import RuleRuntime\n"),
    ("portunus.standalone.config", "from ..server.config import parse_toml\n"),
    ("portunus.cli.server", "from ..doctor.cli import server_main\nfrom ..store.backup import backup\n"),
    ("portunus.doctor.host", "from ..cli.server import _pid_alive\n"),
    ("portunus.__main__", "from .cli.standalone import main\n"),
])
def test_an_arrow_the_doc_draws_passes(module, source):
    assert _broken_rules(module, source) == []


def test_the_offline_hub_offers_what_server_core_needs_from_the_hub():
    """``ControlHub`` lists it; the live ``Hub`` and ``OfflineHub`` both have every member."""
    from portunus.control.hub import Hub
    from portunus.server.control_hub import ControlHub, OfflineHub
    needed = {name for name in vars(ControlHub) if not name.startswith("_")} | set(ControlHub.__annotations__)
    assert needed >= {"call", "session_info", "push_rule", "bound_port"}
    offline = OfflineHub()
    assert [name for name in sorted(needed) if not hasattr(offline, name)] == []
    assert [name for name in sorted(needed - {"bound_port"}) if not hasattr(Hub, name)] == []
    assert offline.session_info("C1") is None and offline.connected_ids() == set()
    assert offline.call(lambda a, b: a + b, 2, 3).result() == 5
    from portunus.errors import PortunusError
    with pytest.raises(PortunusError) as exc:
        offline.push_rule("C1", {"rule_id": "R1"}, None).result()
    assert exc.value.code == "client_not_connected"
