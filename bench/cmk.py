#!/usr/bin/env python3
"""Customer-managed-key benchmarks: DES rotation time vs disk count and size, and revocation latency.

    .venv/bin/python bench/cmk.py [--disks 1000] [--sizes 1G,1T] [--trials 5] [--interval 1,2] [--json]

Rotation: N disks on one disk encryption set, then the vault key is rotated and
``des.rotate`` re-wraps every DEK (one unwrap through the vault over HTTPS per disk,
the wrap under the new version with its public key after one vault wrapKey per
batch, and one atomic header write per disk, synced per batch). Run for each disk size: the time
must not depend on it, because no data is rewritten. The platform-key rotation
of the same disks is timed too.

The same for a DES on an OpenBao transit key (``--providers vault,transit``): its
re-wrap is transit ``rewrap`` (the DEK never leaves the server). ``--workers``
sets how many re-wraps are in flight at once for a provider without a batch API
(control/rotation.py REWRAP_WORKERS), ``--batch`` how many disks go together
(REWRAP_BATCH: one transit request, two header sync passes). Each figure
carries the 1-minute load average before and after it (``load1m*``): on a
shared host, rerun on a quiet one.

Unwrap: milliseconds for one unwrap of a DEK, per provider (platform file and
PKCS#11, vault RSA and RSA-HSM in SoftHSM2, transit, PKCS#11, KMIP), each
against its real key store.

Revocation: a CMK disk held open through a real mount (like a VM), the key
disabled at a random moment, O_DIRECT writes every 10 ms until EIO: latency per
trial against the bound (check interval + 1 s).

Everything runs on 127.0.0.1 in a temporary directory and is torn down.
"""
from __future__ import annotations

import argparse
import errno
import json
import mmap
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from blockcrypt.control import des, disks  # noqa: E402
from blockcrypt.control import rotation
from blockcrypt.control.state import State  # noqa: E402
from blockcrypt._util.units import parse_size  # noqa: E402


def vault_cli(*args):
    p = subprocess.run([sys.executable, "-m", "blockcrypt", "vault", *map(str, args)], capture_output=True,
                       text=True, cwd=REPO)
    if p.returncode:
        raise SystemExit(f"vault {' '.join(map(str, args))}: {p.stderr.strip()}")
    return p.stdout


class Vault:
    def __init__(self, d: Path, init_args=(), serve_args=()):
        self.dir = d
        vault_cli("init", "--dir", d, "--purge-protection", "--retention-days", "7", *init_args)
        self.proc = subprocess.Popen([sys.executable, "-m", "blockcrypt", "vault", "serve", "--dir", str(d),
                                      "--listen", "127.0.0.1:0", *map(str, serve_args)], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("vault listening on "):
            raise SystemExit("vault serve did not start")
        self.url = line.split()[-1]

    def key(self, *args):
        return json.loads(vault_cli("key", *args, "--dir", self.dir, "--json") or "{}")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


class TransitServer:
    """`bao server -dev` on 127.0.0.1 (tests/support/baoproc.py) for the transit provider."""

    def __init__(self, d: Path):
        sys.path.insert(0, str(REPO / "tests"))
        from support.baoproc import BaoProcess
        d.mkdir(parents=True, exist_ok=True)
        self.bao = BaoProcess(d).start()
        self.url = self.bao.url

    def make_des(self, st, key: str) -> str:
        from blockcrypt.keys.providers.transit import key_url
        self.bao.make_key(key)
        ident = self.bao.make_role(key, key)
        f = st.path / "transit-identity.json"
        f.write_text(json.dumps(ident))
        f.chmod(0o600)
        des.create(st, "des", key_url(self.url, "transit", key), identity_file=str(f))
        return key

    def rotate(self, st, key: str) -> str:
        self.bao.root.secrets.transit.rotate_key(key)
        return st.keys.get("transit").latest_version(st.catalog.get_des("des"))

    def stop(self):
        self.bao.stop()


def _vault_des(vault: "Vault", st, key: str) -> str:
    vault.key("create", key)
    des.create(st, "des", f"{vault.url}/keys/{key}", vault_dir=str(vault.dir), grant=True)
    return key


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def bench_rotation(root: Path, vault: Vault, n_disks: int, size: int, transit: TransitServer | None = None,
                   workers: int = rotation.REWRAP_WORKERS, batch: int = rotation.REWRAP_BATCH) -> dict:
    kind = "transit" if transit else "vault"
    st = State.init(root / f"state-{kind}-{size}")
    key = f"rot{size}"
    if transit:
        transit.make_des(st, key)
    else:
        _vault_des(vault, st, key)
    t0 = time.perf_counter()
    for i in range(n_disks):
        des.create_disk(st, f"d{i:04d}", size, "des")
    t_create = time.perf_counter() - t0
    new_kid = transit.rotate(st, key) if transit else vault.key("rotate", key)["key"]["kid"]
    old = rotation.REWRAP_WORKERS, rotation.REWRAP_BATCH
    rotation.REWRAP_WORKERS, rotation.REWRAP_BATCH = workers, batch
    try:
        load0 = _load()
        t0 = time.perf_counter()
        r = des.rotate(st, "des", new_kid)
        t_rotate = time.perf_counter() - t0
        load1 = _load()
    finally:
        rotation.REWRAP_WORKERS, rotation.REWRAP_BATCH = old
    assert len(r["rewrapped"]) == n_disks
    out = {"provider": kind, "workers": workers, "batch": batch, "disks": n_disks, "diskSizeBytes": size,
           "createSeconds": round(t_create, 2), "rotateSeconds": round(t_rotate, 2),
           "msPerDisk": round(1000 * t_rotate / n_disks, 2), "load1mBefore": load0, "load1mAfter": load1}
    if not transit:
        # the same disks moved off the DES would be platform keys; time a platform rotation on as many disks
        pst = State.init(root / f"pstate-{size}")
        for i in range(n_disks):
            disks.create(pst, f"p{i:04d}", size)
        rotation.REWRAP_WORKERS, rotation.REWRAP_BATCH = workers, batch
        try:
            t0 = time.perf_counter()
            pr = rotation.rotate_platform_key(pst)
            out["platformRotateSeconds"] = round(time.perf_counter() - t0, 2)
        finally:
            rotation.REWRAP_WORKERS, rotation.REWRAP_BATCH = old
        assert len(pr["rewrapped"]) == n_disks
        shutil.rmtree(pst.path)
    out["backingBytesUsed"] = sum(f.stat().st_blocks * 512 for f in (st.path / "disks").glob("*.img"))
    shutil.rmtree(st.path)
    return out


def bench_unwrap(root: Path, vault: Vault, transit: TransitServer, n: int = 200) -> list[dict]:
    """Milliseconds for one unwrap of a disk's DEK (the open of a disk, and every key check), per
    provider, each against its real key store; median and 90th percentile of ``n``."""
    from blockcrypt.format import ROLE_DATA, binding_context
    from blockcrypt.keys.envelope import new_dek
    sys.path.insert(0, str(REPO / "tests"))
    setups = {}

    def platform_file():
        st = State.init(root / "u-platform")
        return st.keys.get("platform"), st.keys.get("platform").default_ref()
    setups["platform file"] = platform_file

    def on_vault():
        st = State.init(root / "u-vault")
        _vault_des(vault, st, "unwrap-bench")
        return st.keys.get("vault"), st.catalog.get_des("des").active_key
    setups["vault RSA-2048"] = on_vault

    def on_transit():
        st = State.init(root / "u-transit")
        transit.make_des(st, "unwrap-bench")
        return st.keys.get("transit"), st.catalog.get_des("des").active_key
    setups["transit"] = on_transit

    softhsm = Path("/usr/lib/softhsm/libsofthsm2.so")
    if softhsm.exists() and shutil.which("softhsm2-util"):
        hd = root / "softhsm"
        (hd / "tokens").mkdir(parents=True)
        (hd / "conf").write_text(f"directories.tokendir = {hd / 'tokens'}\nobjectstore.backend = file\n"
                                 "log.level = ERROR\n")
        os.environ["SOFTHSM2_CONF"] = str(hd / "conf")
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", "1234",
                        "--so-pin", "5678"], check=True, capture_output=True)
        (hd / "pin").write_text("1234\n")
        (hd / "pin").chmod(0o600)
        uri = f"pkcs11:token=bench;object=%s?module-path={softhsm}&pin-source=file:{hd / 'pin'}"

        def on_pkcs11():
            from blockcrypt.keys.providers.pkcs11 import Pkcs11Keys, parse_uri
            st = State.init(root / "u-pkcs11")
            Pkcs11Keys(parse_uri(uri % "des")).create()
            des.create(st, "des", uri % "des")
            return st.keys.get("pkcs11"), st.catalog.get_des("des").active_key
        setups["pkcs11 (SoftHSM2)"] = on_pkcs11

        def platform_pkcs11():
            st = State.init(root / "u-platform-pkcs11", platform_keys=uri % "platform")
            return st.keys.get("platform"), "platform/latest"
        setups["platform pkcs11 (SoftHSM2)"] = platform_pkcs11
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench-vault", "--pin", "1234",
                        "--so-pin", "5678"], check=True, capture_output=True)

        def on_vault_hsm():
            v = Vault(root / "vault-hsm", ("--sku", "premium"),
                      ("--hsm-module", softhsm, "--hsm-token", "bench-vault", "--hsm-pin-file", hd / "pin"))
            hsm_vaults.append(v)
            st = State.init(root / "u-vault-hsm")
            v.key("create", "unwrap-bench", "--kty", "RSA-HSM")
            des.create(st, "des", f"{v.url}/keys/unwrap-bench", vault_dir=str(v.dir), grant=True)
            return st.keys.get("vault"), st.catalog.get_des("des").active_key
        setups["vault RSA-HSM-2048 (SoftHSM2)"] = on_vault_hsm

    kmip = None
    hsm_vaults: list[Vault] = []

    def on_kmip():
        nonlocal kmip
        from kmip.core.enums import CryptographicAlgorithm
        from support.kmipproc import KmipProcess
        kmip = KmipProcess(root / "kmip").start()
        cert, key = kmip.pki.issue("bench")
        c = kmip.client(cert, key)
        c.open()
        uid = c.create(CryptographicAlgorithm.AES, 256)
        c.activate(uid)
        c.close()
        st = State.init(root / "u-kmip")
        f = root / "kmip-identity.json"
        f.write_text(json.dumps({"cert": str(cert), "key": str(key), "ca": str(kmip.pki.ca_path)}))
        des.create(st, "des", f"kmip://127.0.0.1:{kmip.port}/{uid}", identity_file=str(f))
        return st.keys.get("kmip"), st.catalog.get_des("des").active_key
    setups["kmip (PyKMIP)"] = on_kmip

    out = []
    try:
        for name, setup in setups.items():
            prov, ref = setup()
            ctx = binding_context(os.urandom(16), ROLE_DATA)
            w = prov.wrap(ref, new_dek(), ctx)
            prov.unwrap(w, ctx)   # warm: login, TLS, sessions
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                prov.unwrap(w, ctx)
                times.append((time.perf_counter() - t0) * 1000)
            times.sort()
            out.append({"provider": name, "unwraps": n, "medianMs": round(statistics.median(times), 2),
                        "p90Ms": round(times[int(0.9 * n)], 2), "load1m": _load()})
    finally:
        if kmip is not None:
            kmip.stop()
        for v in hsm_vaults:
            v.stop()
    return out


def _dio_write(fd: int) -> int:
    buf = mmap.mmap(-1, 4096)
    try:
        buf.write(os.urandom(4096))
        os.pwritev(fd, [buf], 1 << 20)
        return 0
    except OSError as e:
        return e.errno
    finally:
        buf.close()


def bench_revocation(root: Path, vault: Vault, interval: float, trials: int) -> dict:
    st = State.init(root / f"rstate-{interval}")
    st.catalog.set_setting("key_check_interval", str(interval))
    key = f"rev{str(interval).replace('.', '-')}"
    vault.key("create", key)
    des.create(st, "des", f"{vault.url}/keys/{key}", vault_dir=str(vault.dir), grant=True)
    des.create_disk(st, "vm", 64 << 20, "des")
    mp = root / f"mnt-{interval}"
    mp.mkdir()
    bc = [sys.executable, "-m", "blockcrypt.cli", "--state", str(st.path)]
    subprocess.run([*bc, "mount", str(mp)], check=True, capture_output=True)
    lat = []
    try:
        fd = os.open(mp / "disks" / "vm", os.O_RDWR | os.O_DIRECT)
        try:
            for _ in range(trials):
                time.sleep(random.uniform(0, interval))  # disable at a random phase of the check cycle
                vault.key("disable", key)
                t0 = time.monotonic()
                while _dio_write(fd) != errno.EIO:
                    if time.monotonic() - t0 > interval + 10:
                        raise SystemExit("I/O never stopped")
                    time.sleep(0.01)
                lat.append(time.monotonic() - t0)
                vault.key("enable", key)
                t1 = time.monotonic()
                while _dio_write(fd) != 0:
                    if time.monotonic() - t1 > interval + 10:
                        raise SystemExit("I/O never came back")
                    time.sleep(0.01)
        finally:
            os.close(fd)
    finally:
        subprocess.run([*bc, "umount", str(mp)], capture_output=True)
    return {"intervalSeconds": interval, "boundSeconds": interval + 1, "trials": trials,
            "latencySeconds": [round(x, 3) for x in lat], "median": round(statistics.median(lat), 3),
            "max": round(max(lat), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--disks", type=int, default=1000)
    ap.add_argument("--sizes", default="1G,1T")
    ap.add_argument("--providers", default="vault,transit", help="DES providers to rotate (vault, transit)")
    ap.add_argument("--workers", default=str(rotation.REWRAP_WORKERS),
                    help="re-wrap workers, comma-separated to compare (1 = one disk at a time)")
    ap.add_argument("--batch", default=str(rotation.REWRAP_BATCH),
                    help="disks per re-wrap batch, comma-separated to compare (control/rotation.py REWRAP_BATCH)")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--interval", default="1,2")
    ap.add_argument("--skip-revocation", action="store_true")
    ap.add_argument("--skip-unwrap", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bc-cmk-bench-"))
    vault = Vault(root / "vault")
    transit = TransitServer(root / "bao")
    out = {"load": os.getloadavg(), "rotation": [], "unwrap": [], "revocation": []}
    try:
        import itertools
        for prov, w, b, s in itertools.product(a.providers.split(","), a.workers.split(","), a.batch.split(","),
                                               a.sizes.split(",")):
            r = bench_rotation(root, vault, a.disks, parse_size(s), transit if prov == "transit" else None,
                               int(w), int(b))
            out["rotation"].append(r)
            if not a.json:
                extra = (f", platform re-wrap {r['platformRotateSeconds']} s"
                         if "platformRotateSeconds" in r else "")
                print(f"rotation ({prov}, {w} workers, batch {b}): {r['disks']} disks of {s}: DES re-wrap "
                      f"{r['rotateSeconds']} s ({r['msPerDisk']} ms/disk){extra}, "
                      f"backing space used {r['backingBytesUsed'] >> 20} MiB "
                      f"(load {r['load1mBefore']} -> {r['load1mAfter']})", flush=True)
        if not a.skip_unwrap:
            out["unwrap"] = bench_unwrap(root, vault, transit)
            if not a.json:
                for r in out["unwrap"]:
                    print(f"unwrap: {r['provider']}: median {r['medianMs']} ms, p90 {r['p90Ms']} ms "
                          f"({r['unwraps']} unwraps, load {r['load1m']})", flush=True)
        if not a.skip_revocation:
            for iv in a.interval.split(","):
                r = bench_revocation(root, vault, float(iv), a.trials)
                out["revocation"].append(r)
                if not a.json:
                    print(f"revocation: interval {iv} s: EIO after median {r['median']} s, max {r['max']} s "
                          f"(bound {r['boundSeconds']} s) over {r['trials']} trials", flush=True)
    finally:
        vault.stop()
        transit.stop()
        shutil.rmtree(root, ignore_errors=True)
    out["loadAfter"] = os.getloadavg()
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"load average before {out['load']}, after {out['loadAfter']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
