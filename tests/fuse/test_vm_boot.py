"""A VM boots from a blockcrypt disk: QEMU (TCG: no KVM here) runs the Debian kernel of
linux-image-amd64 (scripts/fetch-test-kernel.sh unpacks it into a cache) with an initramfs
this test builds from busybox-static and the kernel's virtio modules. Its init reads a
marker the host wrote to the virtio disk, writes one of its own and powers off. QEMU opens
the disk file through the mount with cache=none (O_DIRECT) and discard=unmap; the host then
finds the guest's marker through the mount and not in the backing file.
"""
from __future__ import annotations

import io
import os
import secrets
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from blockcrypt.control import disks

from support.fusehelpers import backing_path, need, wait_for

MiB = 1 << 20
KERNEL_DIR = Path(os.environ.get("BLOCKCRYPT_TEST_KERNEL_DIR", "/var/cache/blockcrypt/test-kernel"))
BUSYBOX = "/bin/busybox"           # busybox-static's (the initramfs has no libc)
BOOT_TIMEOUT_S = 300               # TCG on a loaded 2-core host; a boot takes 10-60 s
HOST_OFF = 2 * MiB + 512           # the host's marker (the guest reads it)
GUEST_SECTOR = 1234                # the guest writes its marker at 4 KiB sector 1234 (dd bs=4096 seek=)


def _kernel():
    ready = KERNEL_DIR / "READY"
    if not ready.exists():
        pytest.fail(f"no test kernel in {KERNEL_DIR}: run scripts/install-deps.sh (make deps), which "
                    "unpacks linux-image-amd64 there with scripts/fetch-test-kernel.sh")
    kver = ready.read_text().split()[1]
    return KERNEL_DIR / "vmlinuz", KERNEL_DIR / "lib" / "modules" / kver


def _module_chain(moddir: Path, names) -> list[Path]:
    """The module files to insmod for ``names``, dependencies first (modules.dep); built-in
    ones (modules.builtin) need nothing."""
    deps, by_name = {}, {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
    builtin = {Path(l).name.split(".ko")[0].replace("-", "_")
               for l in (moddir / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(mod: str):
        for d in deps.get(mod, []):
            visit(d)
        if mod not in order:
            order.append(mod)

    for n in names:
        if n in builtin:
            continue
        if n not in by_name:
            pytest.fail(f"the test kernel has no module {n} ({moddir})")
        visit(by_name[n])
    files = [moddir / m for m in order]
    for f in files:
        if not f.exists():
            pytest.fail(f"{f} is missing from the test kernel cache: rerun scripts/fetch-test-kernel.sh")
        if f.suffix in (".xz", ".zst", ".gz"):
            pytest.fail(f"{f} is compressed; busybox insmod needs plain .ko files")
    return files


def _cpio(entries) -> bytes:
    """A newc cpio archive of (name, mode, data) entries (directories: data None)."""
    out = io.BytesIO()

    def put(name: str, mode: int, data: bytes, ino: int):
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        out.write(hdr.encode() + nb)
        out.write(b"\0" * (-(110 + len(nb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    for i, (name, mode, data) in enumerate(entries, start=1):
        put(name, mode, data or b"", i)
    put("TRAILER!!!", 0, b"", 0)
    return out.getvalue()


def _initramfs(tmp_path: Path, moddir: Path, host_marker: bytes, guest_marker: bytes) -> Path:
    mods = _module_chain(moddir, ["virtio_pci", "virtio_blk"])
    insmods = "\n".join(f"/bin/busybox insmod /lib/modules/{m.name}" for m in mods)
    init = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
{insmods}
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do /bin/busybox sleep 0.1; i=$((i+1)); done
echo "BC-GUEST-READ:$(/bin/busybox dd if=/dev/vda bs=1 skip={HOST_OFF} count={len(host_marker)} 2>/dev/null)"
printf '%s' '{guest_marker.decode()}' > /tmp.marker
/bin/busybox dd if=/tmp.marker of=/dev/vda bs=4096 seek={GUEST_SECTOR} conv=sync,fsync oflag=direct 2>/dev/null
echo "BC-GUEST-WROTE:$?"
/bin/busybox sync
/bin/busybox poweroff -f
"""
    ents = [("bin", stat.S_IFDIR | 0o755, None), ("lib", stat.S_IFDIR | 0o755, None),
            ("lib/modules", stat.S_IFDIR | 0o755, None),
            ("bin/busybox", stat.S_IFREG | 0o755, Path(BUSYBOX).read_bytes()),
            ("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
            ("init", stat.S_IFREG | 0o755, init.encode())]
    ents += [(f"lib/modules/{m.name}", stat.S_IFREG | 0o644, m.read_bytes()) for m in mods]
    p = tmp_path / "initramfs.cpio"
    p.write_bytes(_cpio(ents))
    return p


def _busybox_static():
    if not os.path.exists(BUSYBOX):
        pytest.fail("busybox-static not installed: run scripts/install-deps.sh (make deps)")
    r = subprocess.run(["file", "-L", BUSYBOX], capture_output=True, text=True) if shutil.which("file") else None
    if r is not None and "dynamically linked" in r.stdout:
        pytest.fail(f"{BUSYBOX} is dynamically linked: install busybox-static (scripts/install-deps.sh)")


def test_vm_boots_from_a_blockcrypt_disk(state, mnt, tmp_path):
    need("qemu-system-x86_64")
    _busybox_static()
    vmlinuz, moddir = _kernel()
    host_marker = b"HOST-" + secrets.token_hex(8).encode()
    guest_marker = b"GUEST-" + secrets.token_hex(8).encode()
    initrd = _initramfs(tmp_path, moddir, host_marker, guest_marker)
    disks.create(state, "vm", 64 * MiB)
    p = mnt.disk("vm")
    wait_for(p.exists, what="disk file")
    with open(p, "r+b") as f:
        f.seek(HOST_OFF)
        f.write(host_marker)
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nodefaults", "-no-user-config",
           "-display", "none", "-serial", "stdio", "-no-reboot",
           "-kernel", str(vmlinuz), "-initrd", str(initrd),
           "-append", "console=ttyS0 panic=-1 rdinit=/init quiet loglevel=3",
           "-drive", f"file={p},format=raw,if=virtio,cache=none,aio=threads,discard=unmap"]
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=BOOT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the VM did not power off within {BOOT_TIMEOUT_S} s; console:\n"
                    f"{(e.stdout or b'').decode(errors='replace')[-3000:]}")
    console = r.stdout.decode(errors="replace")
    assert r.returncode == 0, (r.returncode, console[-3000:], r.stderr.decode(errors="replace"))
    assert f"BC-GUEST-READ:{host_marker.decode()}" in console, console[-3000:]
    assert "BC-GUEST-WROTE:0" in console, console[-3000:]
    # the host sees the guest's write through the mount ...
    with open(p, "rb") as f:
        f.seek(GUEST_SECTOR * 4096)
        assert f.read(4096) == guest_marker + bytes(4096 - len(guest_marker))
    # ... and neither marker is in the backing file (ciphertext only)
    raw = backing_path(state, "vm").read_bytes()
    assert guest_marker not in raw and host_marker not in raw
