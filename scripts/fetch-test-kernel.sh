#!/usr/bin/env bash
# The Debian kernel that the VM boot test (tests/fuse/test_vm_boot.py) boots under QEMU:
# linux-image-amd64's kernel package, fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` into a cache directory, never installed: installing a kernel package on a
# build host or CI container runs initramfs-tools and bootloader hooks, pulls firmware and
# writes /boot, none of which the test needs (it needs vmlinuz and the virtio modules).
# Idempotent: does nothing when the cache is complete. Needs apt (Debian 12).
#   BLOCKCRYPT_TEST_KERNEL_DIR   the cache (default /var/cache/blockcrypt/test-kernel)
set -euo pipefail

DEST="${BLOCKCRYPT_TEST_KERNEL_DIR:-/var/cache/blockcrypt/test-kernel}"
if [ -f "$DEST/READY" ]; then
  echo "fetch-test-kernel: $(cat "$DEST/READY") in $DEST"
  exit 0
fi
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
  echo "fetch-test-kernel: apt knows no linux-image-amd64 (run apt-get update)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get -o APT::Sandbox::User=root download -qq "$pkg")
mkdir -p "$tmp/x"
dpkg-deb -x "$tmp"/"$pkg"_*.deb "$tmp/x"
kver=$(ls "$tmp/x/lib/modules")
depmod -b "$tmp/x" "$kver"   # modules.dep is made at install time, not shipped
new="$DEST.new.$$"
rm -rf "$new"
mkdir -p "$new/lib/modules/$kver/kernel/drivers/block"
cp "$tmp/x/boot/vmlinuz-$kver" "$new/vmlinuz"
# the modules of the virtio block path (the test resolves their order from modules.dep)
cp "$tmp/x/lib/modules/$kver/"modules.{dep,builtin,order} "$new/lib/modules/$kver/"
cp -r "$tmp/x/lib/modules/$kver/kernel/drivers/virtio" "$new/lib/modules/$kver/kernel/drivers/"
cp "$tmp/x/lib/modules/$kver/kernel/drivers/block/"virtio_blk.ko* "$new/lib/modules/$kver/kernel/drivers/block/"
echo "$pkg $kver" > "$new/READY"
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$new" "$DEST"
echo "fetch-test-kernel: $pkg ($kver) unpacked into $DEST"
