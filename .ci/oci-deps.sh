#!/usr/bin/env bash
# Debian bits the OCI image tests (tests/test_oci.py) use on a fresh machine: skopeo, to read the
# layouts `edgepipe package --oci` writes. The image itself is written by edgepipe (no daemon); its
# Debian root comes through the same private apt as the qemu runner's (.ci/qemu-deps.sh).
#   bash .ci/oci-deps.sh
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "oci-deps.sh: run as root (sudo bash .ci/oci-deps.sh)" >&2
    exit 1
fi
if command -v skopeo >/dev/null; then
    echo "oci-deps.sh: skopeo is present ($(skopeo --version))"
    exit 0
fi
if ! grep -qs '^ID=debian' /etc/os-release; then
    echo "oci-deps.sh: not a Debian host; install skopeo yourself (the skopeo tests are skipped without it)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends skopeo
echo "oci-deps.sh: $(skopeo --version)"
