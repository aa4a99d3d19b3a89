#!/usr/bin/env bash
# Install the Debian 12 packages blockcrypt needs to build, test, demo and benchmark.
# Idempotent: installs only what is missing. Needs root (or sudo) when something is missing.
set -euo pipefail

PKGS=(
  build-essential libssl-dev libsodium-dev libgcrypt20-dev openssl   # native core
  libfuse3-dev pkg-config                            # the C FUSE session (libfuse 3 low-level API)
  python3-venv python3-dev                           # virtualenv + headers (system python)
  fuse3 libfuse2                                     # FUSE: fusermount + libfuse.so.2 for fusepy
  util-linux e2fsprogs kmod procps                   # losetup, mkfs.ext4, fsck, lsmod
  fio qemu-utils                                     # I/O tests, qemu-img
  qemu-system-x86 busybox-static                     # the VM boot test (TCG) and its initramfs
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients   # the same boot through virsh (its own libvirtd)
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
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} packages present"
else
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "install-deps: done"
fi
# libvirt's QEMU user, as libvirt-daemon-system makes it (without pulling systemd into a container)
if ! getent passwd libvirt-qemu >/dev/null; then
  getent group libvirt-qemu >/dev/null || $SUDO groupadd --system --gid 64055 libvirt-qemu
  $SUDO useradd --system --uid 64055 --gid libvirt-qemu --no-create-home --home-dir /var/lib/libvirt \
    --shell /usr/sbin/nologin libvirt-qemu 2>/dev/null
fi
# the Debian kernel the VM boot test boots (unpacked into a cache, not installed)
$SUDO bash "$(dirname "$0")/fetch-test-kernel.sh"
