#!/usr/bin/env bash
# Debian bits the ssh device runner (edgepipe/devices/ssh.py) and its tests need:
# the OpenSSH client (ssh, scp, ssh-keygen, ssh-keyscan), rsync, and the OpenSSH server that
# tests/test_ssh.py starts on 127.0.0.1 as a stand-in board (never as a system service).
# Run as root: bash .ci/ssh-deps.sh
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "ssh-deps.sh: run as root (sudo bash .ci/ssh-deps.sh)" >&2
    exit 1
fi

need=()
command -v ssh >/dev/null || need+=(openssh-client)
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v rsync >/dev/null || need+=(rsync)
if [ "${#need[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # policy-rc.d may refuse to start the service in a container: that is fine, the tests
    # start their own sshd.
    apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# sshd's privilege-separation folder (the package's service unit makes it at boot)
mkdir -p /run/sshd
chmod 0755 /run/sshd
echo "ssh-deps.sh: ssh, scp, rsync and sshd are present ($(ssh -V 2>&1))"
