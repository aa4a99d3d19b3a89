"""Re-wrapping DEKs without touching data: the one loop, and platform key rotation.

``rewrap_disks`` is the loop every re-wrap goes through: platform key rotation,
DES rotation (control/des.py) and moving a disk onto a DES. For each disk it
takes the disk file's lock, reads the header (repairing a stale copy), asks
``plan(header, layer)`` which layers move where, re-wraps those
(keys/envelope.py) and writes the header once, atomically.

Platform rotation is crash-safe by construction: (1) the new version is added
and marked pending (one atomic store write); (2) each disk header is rewritten
atomically under the new version, one disk at a time; (3) versions no disk uses
are forgotten and the pending mark cleared. Old versions remain until step 3,
so a crash anywhere leaves every disk openable; running it again resumes the
pending rotation.

A disk that cannot be re-wrapped (corrupt header, key unavailable) does not stop
the others when the caller asks for ``failed``: it is reported there, the rotation
finishes for the rest, and no old version is retired (the failed disk may still
need it).

Caveat: time grows with the number of disks, not their size; up to REWRAP_WORKERS disks are
re-wrapped at once (the key server must take that many concurrent requests).
"""
from __future__ import annotations

import threading

from ..errors import BlockcryptError
from ..format import Header, Layer, read_header, write_header
from ..keys.envelope import rewrap_layer
from ..keys.providers.platform import PlatformKeyStore, parse_platform_kek_id
from .disks import disk_id_of, header_backing, read_disk_header

ROTATION_STEPS = ("new-version", "rewrap", "retire")


#: disks re-wrapped at once: the time of a re-wrap is a key server round trip and a header
#: fsync, both waits, so threads overlap them (each disk's step stays atomic on its own)
REWRAP_WORKERS = 4


def _rewrap_one(st, rec, plan):
    with header_backing(rec.path, rec.name) as b:
        h = read_header(b, rec.name, repair=True, expect_id=disk_id_of(rec))
        new = h
        for layer in h.layers:
            target = plan(h, layer)
            if target is not None:
                new = new.with_layer(rewrap_layer(st.keys, h, layer.role, *target))
        return write_header(b, new) if new is not h else None


def rewrap_disks(st, recs, plan, on_step=None, workers: int = REWRAP_WORKERS, failed: dict | None = None
                 ) -> tuple[list[str], list[str], dict[str, Header]]:
    """Re-wrap the layers ``plan(header, layer) -> (provider, to_ref) | None`` picks, disk by disk.

    Returns (names re-wrapped, names unchanged, {name: new header}) in the order of ``recs``.
    ``on_step("rewrap", name)`` is called before each disk (progress, and crash tests). Up to
    ``workers`` disks are in flight at once; each one is re-wrapped and its header rewritten
    atomically under its lock, so a crash (or an error) at any point leaves every disk with
    either its old or its new header, and every key version involved is kept until the caller's
    last step. Without ``failed`` the first error stops the disks not yet started and is raised;
    with it (a dict), a disk that cannot be re-wrapped (corrupt, its key unavailable) is recorded
    there as {name: error} and the others go on."""
    step = on_step or (lambda s, d=None: None)
    recs = list(recs)
    results: dict[str, Header | None] = {}

    def one_checked(rec):
        try:
            return _rewrap_one(st, rec, plan)
        except BlockcryptError as e:
            if failed is None:
                raise
            failed[rec.name] = e
            return None

    if workers <= 1 or len(recs) <= 1:
        for rec in recs:
            step("rewrap", rec.name)
            results[rec.name] = one_checked(rec)
    else:
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
        step_lock = threading.Lock()

        def one(rec):
            with step_lock:
                step("rewrap", rec.name)
            return one_checked(rec)

        with ThreadPoolExecutor(max_workers=min(workers, len(recs)), thread_name_prefix="rewrap") as ex:
            futs = {ex.submit(one, rec): rec.name for rec in recs}
            done, pending = wait(futs, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            wait(futs)
            for f, name in futs.items():
                if not f.cancelled() and f.exception() is not None:
                    raise f.exception()
            results = {name: f.result() for f, name in futs.items()}
    failed_names = set(failed or ())
    rewrapped = [r.name for r in recs if results[r.name] is not None]
    unchanged = [r.name for r in recs if results[r.name] is None and r.name not in failed_names]
    headers = {n: h for n, h in results.items() if h is not None}
    return rewrapped, unchanged, headers


def rotate_platform_key(st, on_step=None) -> dict:
    """Add a platform key version and re-wrap every platform-keyed DEK under it (see above).

    ``on_step(step, detail)`` is called before each step (tests)."""
    store = PlatformKeyStore(st.path / "keys")
    step = on_step or (lambda s, d=None: None)
    step("new-version", None)
    target = store.begin_rotation()
    target_id = f"platform/{target}"

    def plan(h: Header, layer: Layer):
        if layer.provider == "platform" and layer.kek_id != target_id:
            return "platform", target_id
        return None

    failed: dict = {}
    rewrapped, skipped, _ = rewrap_disks(st, st.catalog.list_members(), plan, step, failed=failed)
    step("retire", None)
    in_use = set()
    if failed:  # a disk we cannot read may use any version: retire none of them
        in_use = {v["version"] for v in store.versions()}
    else:
        for rec in st.catalog.list_members():
            for layer in read_disk_header(rec).layers:
                if layer.provider == "platform":
                    in_use.add(parse_platform_kek_id(layer.kek_id))
    removed = store.finish_rotation(in_use)
    return {"version": target, "rewrapped": rewrapped, "unchanged": skipped, "retired": removed,
            "failed": {name: str(e) for name, e in failed.items()}}
