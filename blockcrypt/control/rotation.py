"""Re-wrapping DEKs without touching data: the one loop, and platform key rotation.

``rewrap_disks`` is the loop every re-wrap goes through: platform key rotation,
DES rotation (control/des.py) and moving a disk onto a DES. It goes through the
disks in batches (REWRAP_BATCH): for each disk of a batch it takes the disk
file's lock, reads the header (repairing a stale copy) and asks
``plan(header, layer)`` which layers move where; it re-wraps those
(keys/envelope.py: one request for the batch where the provider has a batch API,
such as transit's ``batch_input``; else REWRAP_WORKERS at once), then writes
each changed header once, atomically, with two sync passes for the whole batch
(format/headerio.py ``write_headers``) instead of two fsyncs per disk.

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

Caveat: time grows with the number of disks, not their size; up to REWRAP_WORKERS re-wraps
are in flight at once (the key server must take that many concurrent requests), and a batch
holds up to REWRAP_BATCH disk-file locks (and descriptors) while it is re-wrapped.
"""
from __future__ import annotations

from ..errors import BlockcryptError
from ..format import Header, Layer, read_header, write_headers
from ..keys.envelope import rewrap_layers
from ..keys.providers.platform import PlatformKeyStore, parse_platform_kek_id
from .disks import disk_id_of, header_backing, read_disk_header

ROTATION_STEPS = ("new-version", "rewrap", "write", "retire")


#: re-wraps in flight at once for a provider without a batch API: each is a key server round
#: trip, a wait, so threads overlap them; the vault commits the audit records of concurrent
#: requests together, so the more in flight, the fewer fsyncs per disk (the KMIP and PKCS#11
#: providers serialise on their own session lock)
REWRAP_WORKERS = 16
#: disks handled together: their headers are read under their locks, their DEKs re-wrapped (one
#: request for the lot where the provider has a batch API) and their headers written with two
#: sync passes for the batch (format/headerio.py write_headers) instead of two fsyncs per disk
REWRAP_BATCH = 64
#: threads of a sync pass: fsyncs of many files overlap (the file system commits them together)
SYNC_THREADS = 16


def _sync_pass(backings, pool=None) -> None:
    """Flush every backing, many at once on ``pool`` (a thread pool); the first error is raised
    once all are done."""
    if pool is None or len(backings) <= 1:
        for b in backings:
            b.flush()
        return
    for f in [pool.submit(b.flush) for b in backings]:
        f.result()


def _rewrap_batch(st, recs, plan, step, workers: int, failed: dict | None, results: dict, pools) -> None:
    """One batch (see rewrap_disks): lock and read, re-wrap, write; results[name] = header|None."""
    from contextlib import ExitStack

    def fail(name, e):
        if failed is None:
            raise e
        failed[name] = e

    with ExitStack() as locks:
        opened: dict[str, tuple] = {}
        # lock in path order: two rotations over overlapping disks never hold-and-wait in a cycle
        for rec in sorted(recs, key=lambda r: r.path):
            try:
                b = locks.enter_context(header_backing(rec.path, rec.name))
                opened[rec.name] = (b, read_header(b, rec.name, repair=True, expect_id=disk_id_of(rec)))
            except BlockcryptError as e:
                fail(rec.name, e)
        jobs, owner = [], []
        for rec in recs:
            if rec.name not in opened:
                continue
            step("rewrap", rec.name)
            h = opened[rec.name][1]
            for layer in h.layers:
                target = plan(h, layer)
                if target is not None:
                    jobs.append((h, layer.role, *target))
                    owner.append(rec.name)
        new: dict[str, Header] = {}
        bad: set[str] = set()
        for name, r in zip(owner, rewrap_layers(st.keys, jobs, workers, pool=pools[0])):
            if isinstance(r, BaseException):
                if name not in bad:
                    bad.add(name)
                    fail(name, r)
            elif name not in bad:
                new[name] = new.get(name, opened[name][1]).with_layer(r)
        todo = [rec.name for rec in recs if rec.name in new and rec.name not in bad]
        step("write", todo)
        written = write_headers([(opened[n][0], new[n], opened[n][1]) for n in todo],
                                sync=lambda bs: _sync_pass(bs, pools[1]))
        for rec in recs:
            if rec.name in opened and rec.name not in bad:
                results[rec.name] = None
        results.update(zip(todo, written))


def rewrap_disks(st, recs, plan, on_step=None, workers: int | None = None, failed: dict | None = None,
                 batch: int | None = None) -> tuple[list[str], list[str], dict[str, Header]]:
    """Re-wrap the layers ``plan(header, layer) -> (provider, to_ref) | None`` picks, disk by disk.

    Returns (names re-wrapped, names unchanged, {name: new header}) in the order of ``recs``.
    ``on_step("rewrap", name)`` is called before each disk's re-wrap and ``on_step("write",
    names)`` before a batch's headers are written (progress, and crash tests).

    Disks go in batches of ``batch`` (REWRAP_BATCH): a batch's disk files are locked (in path
    order) and their headers read; the DEKs are re-wrapped (keys/envelope.py rewrap_layers: one
    request per batch where the provider has a batch API, else up to ``workers`` at once); then
    the headers are written by write_headers: copy A of every disk, one sync pass, copy B of
    every disk, one sync pass. Each disk's header stays atomic (a crash or an error at any point
    leaves every disk with either its old or its new header, see format/headerio.py), nothing
    is written before every re-wrap of the batch is back, and every key version involved is
    kept until the caller's last step. Without ``failed`` the first error stops the rotation:
    its batch writes nothing and is raised; with it (a dict), a disk that cannot be re-wrapped
    (corrupt, its key unavailable) is recorded there as {name: error}, keeps its old header,
    and the others go on."""
    step = on_step or (lambda s, d=None: None)
    workers = REWRAP_WORKERS if workers is None else workers
    batch = REWRAP_BATCH if batch is None else max(1, batch)
    recs = list(recs)
    results: dict[str, Header | None] = {}
    from concurrent.futures import ThreadPoolExecutor
    # one pool of each for the whole run: its threads (and their key server connections) stay
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="rewrap") as rewrap_pool, \
            ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="hsync") as sync_pool:
        for i in range(0, len(recs), batch):
            _rewrap_batch(st, recs[i:i + batch], plan, step, workers, failed, results,
                          (rewrap_pool if workers > 1 else None, sync_pool))
    failed_names = set(failed or ())
    rewrapped = [r.name for r in recs if results.get(r.name) is not None]
    unchanged = [r.name for r in recs if r.name in results and results[r.name] is None
                 and r.name not in failed_names]
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
