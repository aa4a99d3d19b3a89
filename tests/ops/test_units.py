"""`make install` and the systemd units (issue 16), as an operator runs them: install into a
fresh prefix (a virtualenv with blockcrypt built from this tree, not editable), `blockcrypt`
on the BINDIR, the units in UNITDIR with their paths rewritten; `systemd-analyze verify`
accepts both units (the mount unit as an instance named by `systemd-escape --path`); a
second install upgrades in place and still works; `make uninstall` removes what install made and
nothing else. PID 1 here is not systemd, so the units are verified, not started: their
readiness protocol is tested for real in test_notify.py."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = ("blockcrypt-mount@.service", "blockcrypt-vault.service")


def run(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def _verify(unit_path: Path) -> subprocess.CompletedProcess:
    return run("systemd-analyze", "verify", "--man=no", unit_path)


def test_units_in_the_repo_parse(tmp_path):
    """The units as shipped: every directive known to this systemd (the binary they name is
    checked by the install test below)."""
    for u in UNITS:
        text = (REPO / "systemd" / u).read_text()
        assert "Type=notify" in text
    mount = (REPO / "systemd" / "blockcrypt-mount@.service").read_text()
    for opt in ("ProtectSystem=", "PrivateTmp=", "ProtectHome=", "ReadWritePaths=", "PrivateDevices=",
                "PrivateMounts=", "MountFlags=", "ProtectKernelTunables=", "ProtectControlGroups="):
        assert not any(line.startswith(opt) for line in mount.splitlines()), opt  # own mount namespace
    vault = (REPO / "systemd" / "blockcrypt-vault.service").read_text()
    for opt in ("ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes", "NoNewPrivileges=yes"):
        assert opt in vault.splitlines()


@pytest.mark.timeout(1200)
def test_make_install_units_verify_idempotent_uninstall(tmp_path):
    assert shutil.which("systemd-analyze") and shutil.which("systemd-escape")
    prefix, bindir, unitdir = tmp_path / "opt" / "blockcrypt", tmp_path / "bin", tmp_path / "units"
    args = [f"PREFIX={prefix}", f"BINDIR={bindir}", f"UNITDIR={unitdir}"]
    r = run("make", "-C", REPO, "install", *args, timeout=1100)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exe = bindir / "blockcrypt"
    assert exe.is_symlink() and os.readlink(exe) == str(prefix / "bin" / "blockcrypt")
    r = run(exe, "--version")
    assert r.returncode == 0 and "blockcrypt" in r.stdout
    # not editable: the package and its native modules live in the prefix
    r = run(prefix / "bin" / "python", "-c", "import blockcrypt, blockcrypt._engine, blockcrypt._xts, "
            "blockcrypt._aead; print(blockcrypt.__file__); print(blockcrypt._engine.__file__)", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert all(line.startswith(str(prefix)) for line in r.stdout.split()), r.stdout
    # the installed CLI works: a state directory, a disk
    st = tmp_path / "state"
    assert run(exe, "--state", st, "init").returncode == 0
    r = run(exe, "--state", st, "disk", "create", "d", "--size", "8M")
    assert r.returncode == 0, r.stderr
    # the units: paths rewritten, and systemd-analyze verify accepts them
    mount_unit = (unitdir / "blockcrypt-mount@.service").read_text()
    assert f"ExecStart={exe} mount --foreground" in mount_unit and "/usr/local/bin" not in mount_unit
    inst = run("systemd-escape", "--path", "--template=blockcrypt-mount@.service", "/srv/bc/vm-disks").stdout.strip()
    assert inst == "blockcrypt-mount@srv-bc-vm\\x2ddisks.service", inst
    check = tmp_path / "check"
    check.mkdir()
    shutil.copy(unitdir / "blockcrypt-mount@.service", check / inst)
    shutil.copy(unitdir / "blockcrypt-vault.service", check / "blockcrypt-vault.service")
    for name in (inst, "blockcrypt-vault.service"):
        r = _verify(check / name)
        assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"
        assert "blockcrypt" not in r.stderr, r.stderr     # no warning about our units
    # idempotent: again, the same result
    r = run("make", "-C", REPO, "install", *args, timeout=1100)
    assert r.returncode == 0, r.stderr[-3000:]
    assert run(exe, "--version").returncode == 0
    # uninstall: the prefix, the link and the units go; the state directory stays
    r = run("make", "-C", REPO, "uninstall", *args, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not prefix.exists() and not exe.exists() and not any(unitdir.iterdir())
    assert (st / "catalog.db").exists() or any(st.iterdir())
