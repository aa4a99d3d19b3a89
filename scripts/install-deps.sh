#!/usr/bin/env bash
# Install the Debian 12 packages blockcrypt needs to build, test, demo and benchmark.
# Idempotent: installs only what is missing. Needs root (or sudo) when something is missing.
set -euo pipefail

PKGS=(
  build-essential libssl-dev libsodium-dev openssl   # native core
  libfuse3-dev pkg-config                            # the C FUSE session (libfuse 3 low-level API)
  python3-venv python3-dev                           # virtualenv + headers (system python)
  fuse3 libfuse2                                     # FUSE: fusermount + libfuse.so.2 for fusepy
  util-linux e2fsprogs kmod procps                   # losetup, mkfs.ext4, fsck, lsmod
  fio qemu-utils                                     # I/O tests, qemu-img
  softhsm2 opensc                                    # PKCS#11 token for HSM-backed keys
  systemd                                            # systemd-analyze verify, systemd-escape (units)
)
if [ "${1:-}" = "--bench" ]; then
  PKGS+=(gocryptfs qemu-system-common python3-matplotlib)  # peers for bench/ (qemu-storage-daemon)
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
