#!/usr/bin/env bash
# The `make demo` body: an encrypted 1 GiB disk, used as a block device with ext4 on it,
# and proof that the disk file holds no plaintext. Run as root after `make build`.
#
#   STATE=... VENV=... bash scripts/demo.sh             run the demo, then unmount and detach
#                                                      everything (the state directory stays)
#   KEEP=1 STATE=... VENV=... bash scripts/demo.sh      leave it all mounted, print how to tear down
#   STATE=... VENV=... bash scripts/demo.sh --teardown  unmount, detach and remove the demo state
#
# Mount points sit next to the state directory: $STATE-mnt (FUSE) and $STATE-fs (ext4).
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=${STATE:-$PWD/demo-state}
VENV=${VENV:-.venv}
STATE=$(realpath -m "$STATE")
MNT="$STATE-mnt"
FS="$STATE-fs"
DISK=demo
BC=("$VENV/bin/blockcrypt" --state "$STATE")

say()  { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run()  { printf '$ %s\n' "$*"; "$@"; }
die()  { echo "demo: $*" >&2; exit 1; }

is_mounted() { findmnt -rn --mountpoint "$1" >/dev/null 2>&1; }

teardown() {  # idempotent: whatever of the demo is still there goes away
    local quiet=${1:-}
    note() { [ -n "$quiet" ] || printf '$ %s\n' "$*"; }
    if is_mounted "$FS"; then
        note umount "$FS"
        umount "$FS" || umount -l "$FS"
    fi
    if is_mounted "$MNT"; then
        for dev in $(losetup -j "$MNT/disks/$DISK" -O NAME -n 2>/dev/null); do
            note losetup -d "$dev"
            losetup -d "$dev" || true
        done
        note blockcrypt umount "$MNT"
        "${BC[@]}" umount "$MNT" >/dev/null || fusermount -u -z "$MNT" 2>/dev/null || umount -l "$MNT"
    fi
    rmdir "$FS" "$MNT" 2>/dev/null || true
}

[ "$(id -u)" -eq 0 ] || die "run as root (loop devices and mounts need it): sudo make demo"
[ -x "$VENV/bin/blockcrypt" ] || die "$VENV/bin/blockcrypt is missing: run \`make build\` first"

if [ "${1:-}" = "--teardown" ]; then
    say "teardown"
    teardown
    [ -d "$STATE" ] && run rm -rf "$STATE"
    echo "demo: torn down (mounts, loop devices and $STATE removed)"
    exit 0
fi

for t in losetup mkfs.ext4 findmnt grep fusermount; do
    command -v "$t" >/dev/null || die "$t is missing: run \`make deps\` (scripts/install-deps.sh)"
done
[ -e /dev/fuse ] || die "/dev/fuse is missing: this host cannot run FUSE file systems"

if [ -e "$STATE" ] || is_mounted "$MNT" || is_mounted "$FS"; then
    say "a previous demo is still around: tearing it down first"
    teardown
    rm -rf "$STATE"
fi
if [ -z "${KEEP:-}" ]; then
    trap 'rc=$?; if [ $rc -ne 0 ]; then echo "demo: failed (exit $rc); cleaning up" >&2; teardown quiet; fi' EXIT
fi

say "1. a state directory: platform key store and catalog"
run "${BC[@]}" init

say "2. a 1 GiB disk: its own AES-256-XTS key, wrapped by the platform key"
run "${BC[@]}" disk create "$DISK" --size 1G

say "3. mount: every disk of the catalog becomes a file under $MNT/disks/"
mkdir -p "$MNT" "$FS"
run "${BC[@]}" mount "$MNT"
run ls -l "$MNT/disks/"

say "4. the disk file as a block device: losetup, mkfs.ext4, mount"
printf '$ losetup --find --show %s\n' "$MNT/disks/$DISK"
LOOP=$(losetup --find --show "$MNT/disks/$DISK")
echo "$LOOP"
run mkfs.ext4 -q -L blockcrypt-demo "$LOOP"
run mount "$LOOP" "$FS"

say "5. write a file on it"
MARKER="BLOCKCRYPT-DEMO-SECRET-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
printf '$ write %s (its text: "%s ..." x 20000)\n' "$FS/secret.txt" "$MARKER"
for _ in $(seq 20000); do echo "$MARKER the quick brown fox jumps over the lazy dog"; done > "$FS/secret.txt"
run sync
run ls -l "$FS"
run df -h "$FS"

say "6. the disk as the catalog sees it"
run "${BC[@]}" disk show "$DISK" --json
BACKING=$("${BC[@]}" disk show "$DISK" --json | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["path"])')
run "${BC[@]}" status

say "7. proof: the plaintext is on the disk, and none of it is in the disk file"
plain=$(grep -a -c -F "$MARKER" "$LOOP" || true)
cipher=$(grep -a -c -F "$MARKER" "$BACKING" || true)
printf '$ grep -a -c %s %s   -> %s line(s) (the decrypted view)\n' "$MARKER" "$LOOP" "$plain"
printf '$ grep -a -c %s %s   -> %s line(s) (the disk file at rest)\n' "$MARKER" "$BACKING" "$cipher"
run du -h --apparent-size "$BACKING"
run du -h "$BACKING"
[ "$plain" -gt 0 ] || die "the marker is not readable through the loop device"
[ "$cipher" -eq 0 ] || die "PLAINTEXT FOUND in the disk file $BACKING"
echo "OK: $plain line(s) of plaintext through the mount, 0 in the disk file"

if [ -n "${KEEP:-}" ]; then
    say "left mounted (KEEP=1); to tear down:"
    echo "  umount $FS"
    echo "  losetup -d $LOOP"
    echo "  ${BC[*]} umount $MNT"
    echo "  or: STATE=$STATE VENV=$VENV bash scripts/demo.sh --teardown   (make demo-clean)"
    exit 0
fi

say "8. clean teardown: unmount ext4, detach the loop device, unmount (flush) the disks"
teardown
trap - EXIT
run "${BC[@]}" status
echo
echo "demo: done. The state directory $STATE stays for a look (${BC[*]} disk list);"
echo "      \`make demo-clean\` removes it."
