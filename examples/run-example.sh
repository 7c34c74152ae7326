#!/usr/bin/env bash
# Start the demo backends, then Portunus standalone in front of them (Ctrl-C stops both).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${PORTUNUS_BIN:-dist/portunus}
[ -x "$BIN" ] || { echo "error: $BIN not found; run ./build.sh first" >&2; exit 1; }
python3 examples/demo_backend.py &
backend=$!
trap 'kill $backend 2>/dev/null' EXIT
cat <<MSG
Portunus standalone example — forwarding:
  http://127.0.0.1:18080/        -> 127.0.0.1:8000   (rule "web")
  http://127.0.0.1:18081-18083/  -> 127.0.0.1:8000-8002 (rule "web-range", same offset)
  udp 127.0.0.1:18053            -> 127.0.0.1:8053   (rule "echo"; try: echo hi | socat - udp:127.0.0.1:18053)
Live counters in another terminal:  $BIN standalone stats --config examples/portunus.toml
Press Ctrl-C to stop.

MSG
"$BIN" standalone --config examples/portunus.toml
