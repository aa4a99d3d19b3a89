"""Nothing of a disk's plaintext or keys on the host's media (issue 13), on a real mount over
both front ends, with a real vault over HTTPS.

A marker is written through every kind of disk: platform key, customer key (a DES on a
vault key), double encryption (`disk create --double-encryption`), and a temp disk under
encryption at host; the disks stay open (their keys in the daemon's memory), the status
and key-event files are brought up to date, then a core is forced from the daemon
(SIGSEGV). On the way the customer key is disabled and enabled again, so the key-event
log has entries and the DEK was wiped and unwrapped anew. Then the state directory (catalog, disk files, logs, key events, status files),
the temp directory, the vault's directory, the daemon's working directory (where a core
would land) and the `status --json` / `disk show --json` answers are searched: neither the
marker nor any DEK (raw, hex or base64) is anywhere, and there is no core. The control:
the same search finds the marker in a plain temp disk's file (a mount without encryption
at host), so a miss means the bytes are not there, not that the search is blind.

Reading the disk files here goes through the page cache, so what the page cache holds of
them is ciphertext too."""
from __future__ import annotations

import base64
import json
import os
import signal
import time
from pathlib import Path

import pytest

from blockcrypt.control import des, disks
from blockcrypt.mount import daemon as bmount
from support.fusehelpers import Mount, bc, bc_json, wait_for

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is absent")

MiB = 1 << 20
OFFSETS = (0, 5 * MiB + 4096 + 7)    # aligned, and unaligned (read-modify-write)


@pytest.fixture(params=["native", "fusepy"])
def frontend(request, monkeypatch):
    monkeypatch.setenv("BLOCKCRYPT_FRONTEND", request.param)
    return request.param


def forms(secret: bytes) -> list[bytes]:
    """How a secret could appear in a file: raw, hex (both cases), base64 and base64url."""
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret),
            base64.urlsafe_b64encode(secret).rstrip(b"=")]


def files_below(*dirs: Path) -> list[Path]:
    out = []
    for d in dirs:
        for dirpath, _, names in os.walk(d):
            out += [Path(dirpath) / n for n in names]
    return [p for p in out if p.is_file() and not p.is_symlink()]


def data_runs(f):
    """The allocated runs of a (sparse) file: a double-encrypted disk's file is over 8 TiB long
    (its sector metadata sits at 8 TiB), almost all holes, which read as zeros anyway."""
    fd, off = f.fileno(), 0
    while True:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:       # ENXIO: no data past off
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        off = end


def hits(needles: dict[str, list[bytes]], paths: list[Path], texts: dict[str, bytes]) -> list[str]:
    """'<what> in <where>' for every needle found; files are read in 8 MiB windows with overlap,
    holes skipped."""
    found = []
    longest = max(len(f) for fs in needles.values() for f in fs)
    for p in paths:
        with open(p, "rb") as f:
            for start, end in data_runs(f):
                tail, pos = b"", start
                while pos < end:
                    f.seek(pos)
                    chunk = f.read(min(8 * MiB, end - pos))
                    if not chunk:
                        break
                    pos += len(chunk)
                    window = tail + chunk
                    for what, fs in needles.items():
                        if any(x in window for x in fs):
                            found.append(f"{what} in {p}")
                    tail = window[-longest:]
    for where, text in texts.items():
        found += [f"{what} in {where}" for what, fs in needles.items() if any(x in text for x in fs)]
    return sorted(set(found))


def write_marker(path: Path, mk: bytes) -> int:
    """The marker at OFFSETS through the mount; returns the fd, left open (key in memory)."""
    fd = os.open(path, os.O_RDWR)
    block = (mk * (4096 // len(mk) + 1))[:4096]
    for off in OFFSETS:
        os.pwrite(fd, block, off)
    os.fsync(fd)
    assert os.pread(fd, len(mk), OFFSETS[1]) == mk
    return fd


def test_the_marker_is_nowhere_on_the_host(root, state, vault, key_name, frontend):
    des.create(state, "des1", f"{vault.url}/keys/{key_name}", vault_dir=str(vault.dir), grant=True)
    bc(state, "disk", "create", "plat", "--size", "16M")
    bc(state, "disk", "create", "cust", "--size", "16M", "--des", "des1")
    bc(state, "disk", "create", "dbl", "--size", "16M", "--double-encryption")
    assert {n: bc_json(state, "disk", "show", n)["encryption"]["type"] for n in ("plat", "cust", "dbl")} == {
        "plat": "EncryptionAtRestWithPlatformKey", "cust": "EncryptionAtRestWithCustomerKey",
        "dbl": "EncryptionAtRestWithPlatformKey"}
    deks = {}
    for n in ("plat", "cust", "dbl"):
        layers = disks.open_layers(state, disks.read_disk_header(state.catalog.get_disk(n)))
        for i, layer in enumerate(layers):
            deks[f"DEK of {n} layer {i}"] = forms(bytes(layer[1]))
        disks.wipe_layers(layers)
    mk = b"NOWHERE-MARKER-" + os.urandom(8).hex().encode()
    needles = {"marker": forms(mk)[:2], **deks}

    state.catalog.set_setting("key_check_interval", "0.5")
    mp = root / "mnt"
    mp.mkdir()
    m = Mount(state, mp, temp_disks=["tmp:16M"], encryption_at_host=True).start()
    paths = [m.disk("plat"), m.disk("cust"), m.disk("dbl"), mp / "temp" / "tmp"]
    fds = [write_marker(p, mk) for p in paths]
    try:
        # a revocation and a restore: the key-event log gets entries, the DEK is wiped and comes back
        events = state.path / "logs" / "key-events.jsonl"
        vault.key("disable", key_name)
        wait_for(lambda: events.exists() and b'"KeyRevoked"' in events.read_bytes(), timeout_s=15,
                 what="the revocation")
        vault.key("enable", key_name)
        wait_for(lambda: b'"KeyRestored"' in events.read_bytes(), timeout_s=15, what="the restore")
        assert os.pread(fds[1], len(mk), OFFSETS[1]) == mk
        st = bc_json(state, "status")
        texts = {"status --json": json.dumps(st).encode(), "status": bc(state, "status").stdout.encode()}
        for n in ("plat", "cust", "dbl"):
            texts[f"disk show {n} --json"] = bc(state, "disk", "show", n, "--json").stdout.encode()
        (mnt,) = st["mounts"]
        assert mnt["encryptionAtHost"] is True
        assert {(d["dir"], d["name"]) for d in mnt["disks"]} == {("disks", "plat"), ("disks", "cust"),
                                                                 ("disks", "dbl"), ("temp", "tmp")}
        cwd = Path(os.readlink(f"/proc/{m.pid}/cwd"))
        cores_before = {p.name for p in cwd.glob("core*")}
        os.kill(m.pid, signal.SIGSEGV)   # a core, if the OS still made one, would hold keys and plaintext
        wait_for(lambda: not bmount._pid_alive(m.pid), timeout_s=20, what="the daemon to die")
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
    time.sleep(1.0)
    assert {p.name for p in cwd.glob("core*")} == cores_before, f"a core file appeared in {cwd}"
    searched = files_below(state.path, vault.dir) + [p for p in cwd.glob("core*")]
    assert any(p.name == "tmp.tmpdisk" for p in searched)        # the leftover temp file is searched
    assert any(p.name == "mount.log" for p in searched)                # the mount log (issue 16: one per state)
    assert any(p.name == "key-events.jsonl" for p in searched)
    assert hits(needles, searched, texts) == []

    # the control: a plain temp disk's file does hold the marker, and the same search finds it
    m2 = Mount(state, mp, temp_disks=["plain:16M"], encryption_at_host=False).start()
    assert not (state.path / "temp" / "tmp.tmpdisk").exists()  # the leftover was deleted
    os.close(write_marker(mp / "temp" / "plain", mk))
    found = hits({"marker": forms(mk)[:2]}, files_below(state.path), {})
    assert found == [f"marker in {state.path / 'temp' / 'plain.tmpdisk'}"]
    m2.stop()


def test_the_vault_is_reached_over_tls_only(vault):
    """In transit to the vault: the client refuses any URL but https://, and the server answers
    no plain HTTP request (the DEK an unwrapKey returns only ever travels inside TLS)."""
    import http.client

    from blockcrypt.vault.client import VaultClient
    with pytest.raises(ValueError, match="must be https"):
        VaultClient(vault.url.replace("https://", "http://"), tenant_id="t", client_id="c", client_secret="s")
    conn = http.client.HTTPConnection("127.0.0.1", vault.port, timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            conn.request("GET", "/keys?api-version=7.5")
            r = conn.getresponse()
            if r.status < 400:
                raise AssertionError(f"plain HTTP answered {r.status}")
            raise http.client.HTTPException(f"refused with {r.status}")
    finally:
        conn.close()
