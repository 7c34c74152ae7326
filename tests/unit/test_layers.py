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


RULES = [
    LayerRule("portunus.http",
              may_import=("portunus.http", "portunus.server", "portunus.errors", "portunus.log", "portunus.model"),
              why="http/ talks only to server/: the store is reached through server.access"),
    LayerRule("portunus.relay",
              must_not_import=("portunus.store", "portunus.http", "portunus.server", "portunus.control",
                               "portunus.cli", "portunus.standalone"),
              why="the data plane knows nothing of HTTP, SQL, the control protocol or wiring"),
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
        if _within(module, rule.layer):
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
