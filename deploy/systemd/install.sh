#!/usr/bin/env bash
# Install the one-file Portunus binary and its systemd units.
#   sudo deploy/systemd/install.sh server   [path/to/portunus]
#   sudo deploy/systemd/install.sh client   [path/to/portunus]
set -euo pipefail
role=${1:-}
bin=${2:-$(dirname "$0")/../../dist/portunus}
here=$(cd "$(dirname "$0")" && pwd)
case "$role" in
  server|client) ;;
  *) echo "usage: $0 server|client [path/to/portunus]" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "error: run as root (installs to /usr/local/bin and /etc/systemd/system)" >&2; exit 1; }
[ -f "$bin" ] || { echo "error: $bin not found; run ./build.sh first or pass the path" >&2; exit 1; }
command -v python3 >/dev/null || { echo "error: python3 (>= 3.11) is required on this host" >&2; exit 1; }

install -m 0755 "$bin" /usr/local/bin/portunus
ln -sf portunus /usr/local/bin/portunus-server
ln -sf portunus /usr/local/bin/portunus-client
ln -sf portunus /usr/local/bin/portunus-standalone

user="portunus-$role"
if ! id "$user" >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin "$user"
fi
install -m 0644 "$here/portunus-$role.service" /etc/systemd/system/
# the units' Documentation= points here; copied when the script runs from a checkout or release tree
repo=$(cd "$here/../.." && pwd)
if [ -f "$repo/README.md" ] && [ -d "$repo/docs" ]; then
  install -d -m 0755 /usr/local/share/doc/portunus/docs/img
  install -m 0644 "$repo/README.md" /usr/local/share/doc/portunus/
  install -m 0644 "$repo"/docs/*.md /usr/local/share/doc/portunus/docs/
  if compgen -G "$repo/docs/img/*.png" >/dev/null; then
    install -m 0644 "$repo"/docs/img/*.png /usr/local/share/doc/portunus/docs/img/
  fi
fi
if [ "$role" = client ]; then
  install -d -m 0750 -o root -g "$user" /etc/portunus
  echo "next: portunus-client enroll '<uri>' --out /etc/portunus/client.bundle.json"
  echo "      chown $user /etc/portunus/client.bundle.json   # keep mode 0600"
fi
systemctl daemon-reload
echo "installed; start with: systemctl enable --now portunus-$role"
