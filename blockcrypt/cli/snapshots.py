"""`blockcrypt snapshot ...` and `blockcrypt image ...`: copy-on-write members of a disk's family.

Caveat: a front end: control/snapshots.py holds the rules (keys, dependents, merging).
"""
from __future__ import annotations

import click

from .._util.units import format_size
from .options import Ctx, Progress, confirm, emit, json_opt, pass_ctx, yes_opt  # noqa: F401 (Progress: old name)
from .output import contract


def member_json(st, rec) -> dict:
    from ..control import snapshots
    d = snapshots.to_json(st, rec)
    d["size"] = format_size(rec.size)
    d["path"] = rec.path
    return d


def _list(c: Ctx, kind: str, as_json: bool) -> None:
    from ..control import snapshots
    recs = snapshots.list_members(c.state, kind)
    if as_json:
        emit([member_json(c.state, r) for r in recs], True)
        return
    if not recs:
        click.echo(f"no {kind}s")
        return
    w = max(len(r.name) for r in recs)
    click.echo(f"{'NAME':<{w}}  {'SIZE':>8}  {'SOURCE':<20}  ENCRYPTION")
    for r in recs:
        src = (snapshots.source_of(c.state, r) or {}).get("sourceResourceId") or "-"
        click.echo(f"{r.name:<{w}}  {format_size(r.size):>8}  {src:<20}  {r.encryption_type}")


def _show(c: Ctx, kind: str, name: str, as_json: bool) -> None:
    from ..control import snapshots
    d = member_json(c.state, snapshots.get(c.state, kind, name))
    if as_json:
        emit(d, True)
        return
    d = contract(d)
    src = (d["creationData"] or {}).get("sourceResourceId") or "-"
    for k, v in (("name", d["name"]), ("id", d["id"]), ("size", d["size"]), ("source", src),
                 ("encryption", d["encryption"]["type"]), ("des", d["encryption"].get("diskEncryptionSetId", "-")),
                 ("double", d["doubleEncryption"]), ("created", d["created"]),
                 ("space used", format_size(d["spaceUsedBytes"]))):
        click.echo(f"{k:<12} {v}")


def _delete(c: Ctx, kind: str, name: str, yes: bool, as_json: bool) -> None:
    from ..control import snapshots
    deps = snapshots.dependents(c.state, kind, name)
    if len(deps) <= 1:  # more: delete refuses, naming them; no question first
        confirm(f"delete {kind} {name}" + (f" (merged into {deps[0]})" if deps else ""), yes)
    r = snapshots.delete(c.state, kind, name)
    emit(r, as_json, f"deleted {kind} {name}" + (f" (merged into {r['merged']})" if r["merged"] else ""))


# --- snapshot ---------------------------------------------------------------------------------

@click.group()
def snapshot():
    """Snapshots: read-only, instant, copy-on-write copies of a disk."""


@snapshot.command("create")
@click.argument("disk")
@click.argument("name")
@json_opt
@pass_ctx
def snapshot_create(c: Ctx, disk, name, as_json):
    """Snapshot DISK as NAME (O(1); the disk may be mounted and in use)."""
    from ..control import snapshots
    rec = snapshots.create_snapshot(c.state, disk, name)
    emit(member_json(c.state, rec), as_json, f"created snapshot {name} of disk {disk} (id {rec.disk_id})")


@snapshot.command("list")
@json_opt
@pass_ctx
def snapshot_list(c: Ctx, as_json):
    """List snapshots."""
    _list(c, "snapshot", as_json)


@snapshot.command("show")
@click.argument("name")
@json_opt
@pass_ctx
def snapshot_show(c: Ctx, name, as_json):
    """Show a snapshot: its encryption, DES and source (creationData)."""
    _show(c, "snapshot", name, as_json)


@snapshot.command("delete")
@click.argument("name")
@yes_opt
@json_opt
@pass_ctx
def snapshot_delete(c: Ctx, name, yes, as_json):
    """Delete a snapshot (merged into the one member built on it, or refused naming them)."""
    _delete(c, "snapshot", name, yes, as_json)


@snapshot.command("diff")
@click.argument("old")
@click.argument("new")
@json_opt
@pass_ctx
def snapshot_diff(c: Ctx, old, new, as_json):
    """The byte ranges that differ between two snapshots of a family, from their chunk maps."""
    from ..control import diff
    r = diff.diff(c.state, old, new)
    emit(r, as_json, "\n".join(f"{x['offset']}+{x['length']}" for x in r["changedRanges"])
         or f"{old} and {new} have the same content")


# --- image --------------------------------------------------------------------------------------

@click.group()
def image():
    """Images: read-only templates to make disks from."""


@image.command("create")
@click.argument("name")
@click.option("--source", required=True, help="a disk or a snapshot")
@json_opt
@pass_ctx
def image_create(c: Ctx, name, source, as_json):
    """Make image NAME from a disk or a snapshot (O(1))."""
    from ..control import snapshots
    rec = snapshots.create_image(c.state, name, source)
    emit(member_json(c.state, rec), as_json, f"created image {name} from {source} (id {rec.disk_id})")


@image.command("list")
@json_opt
@pass_ctx
def image_list(c: Ctx, as_json):
    """List images."""
    _list(c, "image", as_json)


@image.command("show")
@click.argument("name")
@json_opt
@pass_ctx
def image_show(c: Ctx, name, as_json):
    """Show an image: its encryption, DES and source (creationData)."""
    _show(c, "image", name, as_json)


@image.command("delete")
@click.argument("name")
@yes_opt
@json_opt
@pass_ctx
def image_delete(c: Ctx, name, yes, as_json):
    """Delete an image (merged into the one member built on it, or refused naming them)."""
    _delete(c, "image", name, yes, as_json)
