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
the others: it is reported in ``failed``, the rotation finishes for the rest,
and no old version is retired (the failed disk may still need it).

Caveat: time grows with the number of disks, not their size.
"""
from __future__ import annotations

from ..errors import BlockcryptError
from ..format import Header, Layer, read_header, write_header
from ..keys.envelope import rewrap_layer
from ..keys.providers.platform import PlatformKeyStore, parse_platform_kek_id
from .disks import disk_id_of, header_backing, read_disk_header

ROTATION_STEPS = ("new-version", "rewrap", "retire")


def rewrap_disks(st, recs, plan, on_step=None, failed: dict | None = None
                 ) -> tuple[list[str], list[str], dict[str, Header]]:
    """Re-wrap the layers ``plan(header, layer) -> (provider, to_ref) | None`` picks, disk by disk.

    Returns (names re-wrapped, names unchanged, {name: new header}). ``on_step("rewrap",
    name)`` is called before each disk (progress, and crash tests). With ``failed`` (a dict),
    a disk that cannot be re-wrapped (corrupt, its key unavailable) is recorded there as
    {name: error} and the loop goes on with the next disk; without it the error is raised."""
    step = on_step or (lambda s, d=None: None)
    rewrapped, unchanged, headers = [], [], {}
    for rec in recs:
        step("rewrap", rec.name)
        if failed is not None:
            try:
                r, u, h = rewrap_disks(st, [rec], plan)
            except BlockcryptError as e:
                failed[rec.name] = e
                continue
            rewrapped += r
            unchanged += u
            headers.update(h)
            continue
        with header_backing(rec.path, rec.name) as b:
            h = read_header(b, rec.name, repair=True, expect_id=disk_id_of(rec))
            new = h
            for layer in h.layers:
                target = plan(h, layer)
                if target is not None:
                    new = new.with_layer(rewrap_layer(st.keys, h, layer.role, *target))
            if new is not h:
                headers[rec.name] = write_header(b, new)
                rewrapped.append(rec.name)
            else:
                unchanged.append(rec.name)
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
    rewrapped, skipped, _ = rewrap_disks(st, st.catalog.list_disks(), plan, step, failed=failed)
    step("retire", None)
    in_use = set()
    if failed:  # a disk we cannot read may use any version: retire none of them
        in_use = {v["version"] for v in store.versions()}
    else:
        for rec in st.catalog.list_disks():
            for layer in read_disk_header(rec).layers:
                if layer.provider == "platform":
                    in_use.add(parse_platform_kek_id(layer.kek_id))
    removed = store.finish_rotation(in_use)
    return {"version": target, "rewrapped": rewrapped, "unchanged": skipped, "retired": removed,
            "failed": {name: str(e) for name, e in failed.items()}}
