#!/usr/bin/env bash
# Build dist/portunus (one executable shiv zipapp) and its role symlinks.
#   ./build.sh          build
#   ./build.sh test     build, then run the whole test suite against the build
#   ./build.sh demo     build, then run the standalone example (see README)
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: Python >= 3.11 is required (found $("$PY" --version 2>&1))" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt

rm -rf dist build
mkdir -p dist
# shiv installs this project plus its pinned runtime deps into the zipapp.
"$VENV/bin/shiv" -q -c portunus -o dist/portunus -p '/usr/bin/env python3' \
  --reproducible --compressed . -r requirements.txt >/dev/null
# bytecode in the archive and a __main__ that skips shiv's bootstrap once site-packages is extracted
"$VENV/bin/python" deploy/zipapp_finish.py dist/portunus
rm -rf build ./*.egg-info
for role in server client standalone; do
  ln -sf portunus "dist/portunus-$role"
done
echo "built dist/portunus ($(du -h dist/portunus | cut -f1)), $(dist/portunus --version)" >&2

case "${1:-}" in
  test)
    shift
    export PORTUNUS_BIN="$PWD/dist/portunus"
    # The zipapp starts with `/usr/bin/env python3`, which may find a version manager's shim first
    # (pyenv's is a shell script: ~100 ms per process). The tests start thousands of processes, so
    # the interpreter behind that shim goes first on PATH: the same plain Python, not the venv.
    PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
    export PATH
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  demo)
    exec examples/run-example.sh
    ;;
  "") ;;
  *) echo "error: usage: ./build.sh [test [pytest args…] | demo]" >&2; exit 2 ;;
esac
