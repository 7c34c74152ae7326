#!/usr/bin/env python3
"""Finish the shiv zipapp build.sh made, in place, for a fast start (issue 15, startup):

1. Bytecode in the archive. shiv packs sources only, so every process compiled every module it
   imported (portunus, cryptography: ~60 ms a start) unless Python could write ``__pycache__`` into
   the extraction dir, which a read-only home, a systemd sandbox or ``PYTHONDONTWRITEBYTECODE``
   forbid. Each ``site-packages/**/x.py`` gets ``__pycache__/x.<tag>.pyc`` in *checked-hash* form
   (PEP 552): valid whatever the extracted file's mtime, and Python still re-reads a source that
   differs from the one compiled. Another Python version ignores them (its own tag) and compiles as before.
2. A fast ``__main__.py``. shiv's bootstrap imports compileall, subprocess, hashlib, shutil, pathlib
   and typing and parses the archive's directory on every start (~30 ms) only to find that this
   build's site-packages is already extracted. The new ``__main__`` checks for that directory the
   way shiv names it (``$SHIV_ROOT`` or ``~/.shiv``, ``<archive name>_<build id>``) and, when it is
   there, puts it on ``sys.path`` as shiv would and calls the entry point. Everything else — the
   first run (extraction), any ``SHIV_*`` override — goes to shiv's own bootstrap, unchanged.

The output is as reproducible as the input (fixed entry dates, sorted additions); the build id
(shiv's hash of the site-packages sources) is unchanged.

    python3 deploy/zipapp_finish.py dist/portunus
"""

from __future__ import annotations

import _imp
import importlib.util
import hashlib
import json
import os
import sys
import zipfile
from importlib._bootstrap_external import _code_to_hash_pyc

# shiv's environment overrides: with any of these set, shiv's own bootstrap decides
SHIV_OVERRIDES = ("SHIV_INTERPRETER", "SHIV_ENTRY_POINT", "SHIV_CONSOLE_SCRIPT", "SHIV_MODULE",
                  "SHIV_FORCE_EXTRACT", "SHIV_COMPILE_PYC", "SHIV_COMPILE_WORKERS",
                  "SHIV_EXTEND_PYTHONPATH", "SHIV_PREPEND_PYTHONPATH")

FAST_MAIN = '''# -*- coding: utf-8 -*-
# Written by deploy/zipapp_finish.py: start from the extracted site-packages when it is there,
# else (first run, SHIV_* overrides) hand over to shiv's bootstrap.
import os
import sys


def _extracted_site_packages():
    env = os.environ
    if any(k in env for k in {overrides!r}):
        return None
    root = env.get("SHIV_ROOT") or "~/.shiv"
    if root.startswith("$"):
        return None
    name = os.path.basename(os.path.realpath(sys.argv[0]))
    path = os.path.join(os.path.expanduser(root), name + "_" + {build_id!r}, "site-packages")
    return path if os.path.isdir(path) else None


def _check_unpack_root():
    # shiv unpacks into $SHIV_ROOT or ~/.shiv on a first run; a service user without a home (or
    # ProtectHome=) would get a traceback from deep inside shiv: say what to do instead.
    root = os.environ.get("SHIV_ROOT") or "~/.shiv"
    if root.startswith("$"):
        return
    root = os.path.expanduser(root)
    try:
        os.makedirs(root, exist_ok=True)
        ok = os.access(root, os.W_OK | os.X_OK)
        why = "not writable"
    except OSError as exc:
        ok, why = False, exc.strerror or str(exc)
    if not ok:
        sys.stderr.write("error: cannot unpack the zipapp's libraries into %s (%s); set SHIV_ROOT to a "
                         "writable directory (the systemd units use their CacheDirectory)\\n" % (root, why))
        sys.exit(1)


_site_packages = _extracted_site_packages()
if _site_packages is None:
    _check_unpack_root()
    import _bootstrap
    _bootstrap.bootstrap()
else:
    import site
    _n = len(sys.path)
    _first = next((i for i, p in enumerate(sys.path)
                   if os.path.basename(p) in ("site-packages", "dist-packages")), _n)
    site.addsitedir(_site_packages)
    sys.path = sys.path[:_first] + sys.path[_n:] + sys.path[_first:_n]   # ours before any other site dir
    from {module} import {function} as _entry
    sys.exit(_entry())
'''


def pyc_bytes(source: bytes, filename: str) -> bytes | None:
    try:
        code = compile(source, filename, "exec", dont_inherit=True)
    except SyntaxError:  # a file that is data, or for another Python: shiv's extraction keeps it as it was
        return None
    return _code_to_hash_pyc(code, _imp.source_hash(importlib.util._RAW_MAGIC_NUMBER, source), checked=True)


def finished_build_id(build_id: str, tag: str) -> str:
    return hashlib.sha256(f"{build_id}+pyc+{tag}".encode()).hexdigest()


def finish(path: str) -> None:
    with open(path, "rb") as f:
        first = f.readline()
    prefix = first if first.startswith(b"#!") else b""
    tmp = path + ".finishing"
    with zipfile.ZipFile(path) as src:
        names = src.namelist()
        env = json.loads(src.read("environment.json"))
        module, _, function = (env.get("entry_point") or "").partition(":")
        plain = (env.get("script") is None and env.get("preamble") is None and not env.get("no_modify")
                 and not env.get("extend_pythonpath") and not env.get("prepend_pythonpath")
                 and not env.get("root") and not env.get("always_write_cache") and module and function)
        date = src.getinfo("__main__.py").date_time
        tag = sys.implementation.cache_tag
        finished = b"Written by deploy/zipapp_finish.py" in src.read("__main__.py")
        if plain and not finished:
            # shiv's build id hashes the sources only: an unfinished build of the same tree has the same
            # id, and its extraction (no bytecode) would be reused by this one. A finished archive gets
            # its own id, so it always unpacks its own bytecode.
            env["build_id"] = finished_build_id(env["build_id"], tag)
        with open(tmp, "wb") as out:
            out.write(prefix)
            with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
                have = set(names)
                for name in names:
                    info = src.getinfo(name)
                    data = src.read(name)
                    if name == "environment.json" and plain and not finished:
                        data = json.dumps(env).encode()
                    if name == "__main__.py" and plain:
                        data = FAST_MAIN.format(overrides=SHIV_OVERRIDES, build_id=env["build_id"],
                                                module=module, function=function).encode()
                    dst.writestr(info, data, compress_type=info.compress_type)
                for name in sorted(n for n in names if n.startswith("site-packages/") and n.endswith(".py")):
                    folder, _, base = name.rpartition("/")
                    target = f"{folder}/__pycache__/{base[:-3]}.{tag}.pyc"
                    if target in have:
                        continue
                    data = pyc_bytes(src.read(name), name[len("site-packages/"):])
                    if data is None:
                        continue
                    info = zipfile.ZipInfo(target, date)
                    info.external_attr = 0o644 << 16
                    dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    os.chmod(tmp, os.stat(path).st_mode)
    os.replace(tmp, path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: zipapp_finish.py ZIPAPP")
    finish(sys.argv[1])
