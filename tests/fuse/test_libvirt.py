"""The VM boot of test_vm_boot.py through libvirt: `virsh create` of a domain whose disk is a
blockcrypt disk file (the domain XML of docs/OPERATIONS.md: raw, cache='none',
discard='unmap'), with a libvirtd this test starts on a socket of its own. libvirt's DAC
driver runs QEMU as libvirt-qemu: it chowns the disk file to that user through the
--allow-other mount, remembers the old owner in trusted.libvirt.security.* xattrs on it,
and gives both back when the VM powers off.
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from blockcrypt.control import disks, settings

from support.fusehelpers import Mount, backing_path, cleanup_tree, need, wait_for
from test_vm_boot import GUEST_SECTOR, HOST_OFF, _busybox_static, _initramfs, _kernel

MiB = 1 << 20
QEMU_USER = "libvirt-qemu"
BOOT_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def libvirtd():
    """A libvirtd of this test's own (its socket in a temp directory), with virtlogd for the
    serial console file; both stopped at the end."""
    need("libvirtd", "virtlogd", "virsh")
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        pytest.fail(f"no {QEMU_USER} user: run scripts/install-deps.sh (make deps)")
    base = Path(tempfile.mkdtemp(prefix="bc-libvirtd-"))
    (base / "sock").mkdir()
    conf = base / "libvirtd.conf"
    conf.write_text(f'unix_sock_dir = "{base}/sock"\nunix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\n'
                    f'auth_unix_ro = "none"\nlog_outputs = "3:file:{base}/libvirtd.log"\n')
    procs = []
    if not os.path.exists("/run/libvirt/virtlogd-sock"):
        procs.append(subprocess.Popen(["virtlogd", "-p", str(base / "virtlogd.pid")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    procs.append(subprocess.Popen(["libvirtd", "-f", str(conf), "-p", str(base / "libvirtd.pid")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    uri = f"qemu:///system?socket={base}/sock/libvirt-sock"
    try:
        wait_for(lambda: subprocess.run(["virsh", "-c", uri, "version"], capture_output=True).returncode == 0,
                 timeout_s=30, what="libvirtd answering")
        yield uri
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def vmdir(state):
    """A directory libvirt-qemu can reach (pytest's tmp directories are 0700): the mount point
    (--allow-other), the kernel and initramfs, the console file."""
    base = Path(tempfile.mkdtemp(prefix="bc-libvirt-vm-"))
    base.chmod(0o755)
    yield base
    cleanup_tree(base, state)
    shutil.rmtree(base, ignore_errors=True)


def _domain_xml(name, disk, kernel, initrd, console) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 rdinit=/init quiet loglevel=3</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='threads' discard='unmap'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def test_virsh_boots_a_vm_from_a_blockcrypt_disk(state, libvirtd, vmdir):
    _busybox_static()
    vmlinuz, moddir = _kernel()
    kernel = vmdir / "vmlinuz"
    shutil.copyfile(vmlinuz, kernel)   # libvirt relabels the kernel too: not the shared cache's
    host_marker = b"HOST-" + secrets.token_hex(8).encode()
    guest_marker = b"GUEST-" + secrets.token_hex(8).encode()
    initrd = _initramfs(vmdir, moddir, host_marker, guest_marker)
    for f in (kernel, initrd):
        f.chmod(0o644)
    mp = vmdir / "mnt"
    mp.mkdir()
    settings.set_(state, "xattrs", "true")   # libvirt's DAC driver remembers owners in trusted.*
    Mount(state, mp, allow_other=True).start()
    disks.create(state, "vm", 64 * MiB)
    p = mp / "disks" / "vm"
    wait_for(p.exists, what="disk file")
    with open(p, "r+b") as f:
        f.seek(HOST_OFF)
        f.write(host_marker)
    before = os.stat(p)
    console = vmdir / "console.log"
    name = "bc-test-" + secrets.token_hex(4)
    xml = vmdir / "domain.xml"
    xml.write_text(_domain_xml(name, p, kernel, initrd, console))
    virsh = ["virsh", "-q", "-c", libvirtd]
    r = subprocess.run([*virsh, "create", str(xml)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    try:
        # while it runs, QEMU's user owns the disk and libvirt remembers the old owner on it
        st = os.stat(p)
        qemu_uid = pwd.getpwnam(QEMU_USER).pw_uid
        assert st.st_uid == qemu_uid, (st.st_uid, qemu_uid)   # a TCG boot takes seconds: still running
        assert any(n.startswith("trusted.libvirt.security.") for n in os.listxattr(p)), os.listxattr(p)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < deadline:
            out = subprocess.run([*virsh, "domstate", name], capture_output=True, text=True)
            if out.returncode != 0 or "shut off" in out.stdout:
                break   # a transient domain vanishes when it powers off
            time.sleep(1)
        else:
            pytest.fail(f"the VM did not power off in {BOOT_TIMEOUT_S} s; console:\n"
                        f"{console.read_text(errors='replace')[-3000:] if console.exists() else ''}")
    finally:
        subprocess.run([*virsh, "destroy", name], capture_output=True)
    text = console.read_text(errors="replace")
    assert f"BC-GUEST-READ:{host_marker.decode()}" in text, text[-3000:]
    assert "BC-GUEST-WROTE:0" in text, text[-3000:]
    # libvirt gave the owner back and dropped what it remembered
    wait_for(lambda: os.stat(p).st_uid == before.st_uid, timeout_s=10, what="the owner restored")
    st = os.stat(p)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (before.st_uid, before.st_gid, before.st_mode & 0o777)
    assert not [n for n in os.listxattr(p) if n.startswith("trusted.libvirt.security.dac")]
    with open(p, "rb") as f:
        f.seek(GUEST_SECTOR * 4096)
        assert f.read(4096) == guest_marker + bytes(4096 - len(guest_marker))
    raw = backing_path(state, "vm").read_bytes()
    assert guest_marker not in raw and host_marker not in raw
