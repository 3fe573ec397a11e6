#!/usr/bin/env bash
# Debian bits the qemu device runner (edgepipe/devices/qemu.py; its aarch64 environment: qemu_env.py)
# needs on a fresh machine.
# Run as root. The runner itself fetches qemu-user 10 (bookworm-backports), the arm64 Python 3.11
# packages and the aarch64 wheels into its own cache through a private apt configuration: this
# script changes no apt sources and adds no dpkg architecture.
#   bash .ci/qemu-deps.sh             install the tools
#   bash .ci/qemu-deps.sh --prefetch  also build the cached aarch64 environment now (~1 min, ~260 MB)
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "qemu-deps.sh: run as root (sudo bash .ci/qemu-deps.sh)" >&2
    exit 1
fi
if ! grep -qs '^ID=debian' /etc/os-release; then
    echo "qemu-deps.sh: not a Debian host; install qemu-user >= 8 yourself and put qemu-aarch64 on PATH" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# apt-get (download), dpkg-deb (-x), the Debian archive keys (signed-by for the private lists),
# CA certificates for https mirrors. Only what is missing is installed (no upgrades).
need=()
command -v apt-get >/dev/null || need+=(apt)
command -v dpkg-deb >/dev/null || need+=(dpkg)
[ -s /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
[ -s /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
if [ "${#need[@]}" -gt 0 ]; then
    apt-get install -y -q --no-install-recommends "${need[@]}"
fi
echo "qemu-deps.sh: apt, dpkg-deb, debian-archive-keyring and ca-certificates are present"

if [ "${1:-}" = "--prefetch" ]; then
    cd "$(dirname "$0")/.."
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 - <<'PY'
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
from edgepipe.devices.qemu import QemuRunner
env = QemuRunner("cortex-a76").ensure_env()
print(f"qemu env ready: {env.path} (qemu {env.qemu_version})")
PY
fi
