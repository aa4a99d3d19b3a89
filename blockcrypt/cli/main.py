"""The `blockcrypt` command line (click): the group, the disk, platform-key, catalog,
des and config commands, and the one error boundary (``main``).

Every command takes ``--json`` for scripts (the contract is cli/output.py and
docs/CLI.md). Errors print one line on stderr (``blockcrypt: error: ...``, or
with ``--json`` a JSON object ``{"error": {"code", "message", "exitCode"}}``) and
exit with the error's exit code; no traceback reaches the user. The mount
commands (cli/mount.py) and the vault group (cli/vault.py) join the group here.

Caveat: this is a front end: it calls control/ and formats results; it holds
no policy of its own.
"""
from __future__ import annotations

import sys

import click

from .. import __version__
from .._util.units import format_size, parse_size
from ..errors import BlockcryptError, IntegrityError, UsageError
from .options import Ctx, Progress, confirm, emit, json_opt, out_file_opt, pass_ctx, yes_opt
from .output import contract, error_code, report_error, wants_json


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state", "state_path", envvar="BLOCKCRYPT_STATE", type=click.Path(),
              help="state directory (default: $BLOCKCRYPT_STATE or /var/lib/blockcrypt)")
@click.version_option(__version__, prog_name="blockcrypt", help="show the version and exit")
@click.pass_context
def cli(ctx, state_path):
    """Encrypted virtual disks: AES-256-XTS sectors, per-disk keys, FUSE disk files.

    Every command takes --json (one JSON document on stdout; docs/CLI.md is the reference).
    Shell completion: eval "$(_BLOCKCRYPT_COMPLETE=bash_source blockcrypt)" (zsh_source, fish_source)."""
    ctx.obj = Ctx(state_path)


@cli.command()
@click.option("--platform-keys", "platform_keys", default=None, metavar="PKCS11_URI",
              help="keep the platform keys in a PKCS#11 token: pkcs11:token=T;object=K"
                   "?module-path=M&pin-source=file:PATH (or env:VAR); default: a key file in the state")
@json_opt
@pass_ctx
def init(c: Ctx, platform_keys, as_json):
    """Create the state directory with its platform key store and catalog."""
    from ..control.state import State
    st = State.init(c.state_path, platform_keys=platform_keys)
    from ..keys.providers.platform import PlatformKeyStore
    backend = PlatformKeyStore(st.path / "keys").backend()
    emit({"state": str(st.path), "platformKeyStore": str(st.path / "keys"), "platformKeyBackend": backend},
         as_json, f"initialised {st.path}" + (" (platform keys in a PKCS#11 token)" if backend == "pkcs11" else ""))


# --- disks ---------------------------------------------------------------------------

def disk_json(st, rec, check_keys: bool = False) -> dict:
    from ..control.disks import encryption_type, health, is_double
    out = {
        "name": rec.name, "id": rec.disk_id, "kind": rec.kind, "sizeBytes": rec.size,
        "size": format_size(rec.size), "sectorSize": rec.sector_size, "readOnly": rec.read_only,
        "path": rec.path, "created": rec.created,
        "encryption": {"type": rec.encryption_type},
    }
    state, why, h = health(st, rec, check_keys=check_keys)
    out["health"] = state
    if why:
        out["error"] = why
    if h is None:
        return out
    out["revocation"] = rec.revocation
    out["encryption"] = {"type": encryption_type(h), "cipher": h.cipher,
                         "doubleEncryption": is_double(h),
                         "layers": [l.to_json() for l in h.layers]}
    if rec.des:
        from ..format import ROLE_DATA
        kid = h.layer(ROLE_DATA).kek_id
        des_rec = st.catalog.find_des(rec.des)
        out["encryption"]["diskEncryptionSetId"] = des_rec.des_id if des_rec else None
        out["encryption"]["diskEncryptionSetName"] = rec.des
        out["encryption"]["keyUrl"] = kid
        out["encryption"]["keyVersion"] = kid.rsplit("/", 1)[-1]
    out["header"] = {"formatVersion": 1, "sequence": h.seqno}
    if rec.source_id or rec.family_id:
        from ..control.snapshots import source_of
        out["creationData"] = source_of(st, rec)
        out["familyId"] = rec.family_id
    from ..mount.daemon import encryption_at_host
    out["encryptionAtHost"], out["encryptionAtHostFrom"] = encryption_at_host(st)
    return out


@cli.group()
def disk():
    """Create, list, show, resize and delete disks."""


def _size_arg(value):
    return parse_size(value)


@disk.command("create")
@click.argument("name")
@click.option("--size", help="size with K/M/G/T, e.g. 10G (with --source: the source's, or bigger)")
@click.option("--source", help="a snapshot or image to make the disk from (copy-on-write, O(1))")
@click.option("--sector-size", type=click.Choice(["512", "4096"]), default="4096", show_default=True,
              help="bytes per sector the disk shows (4096 unless a guest needs 512)")
@click.option("--des", "des_name", help="disk encryption set: wrap the DEK with its customer-managed key")
@click.option("--revocation", type=click.Choice(["immediate", "on-restart"]), default="immediate",
              show_default=True, help="when a revoked customer key stops this disk's I/O")
@click.option("--double-encryption", "double", is_flag=True,
              help="platform-key disk with a second, independent platform-keyed layer "
                   "(XChaCha20-Poly1305, tamper-detecting); a DES of type "
                   "EncryptionAtRestWithPlatformAndCustomerKeys does this for customer keys")
@json_opt
@pass_ctx
def disk_create(c: Ctx, name, size, source, sector_size, des_name, revocation, double, as_json):
    """Create a disk under a fresh DEK, wrapped by the platform key or a DES's customer key;
    or (--source) a disk made from a snapshot or image, sharing its data and keys."""
    from ..control import des, disks
    if source:
        from ..control import snapshots
        if double:
            raise UsageError("--double-encryption cannot be combined with --source: the disk keeps its "
                             "source's layers")
        prog = Progress(as_json, f"copying {source}", "copy")
        rec = snapshots.create_disk_from(c.state, name, source, size=parse_size(size) if size else None,
                                         des=des_name, revocation=revocation, progress=prog)
        prog.done()
        emit(disk_json(c.state, rec), as_json, f"created disk {rec.name} from {source} ({format_size(rec.size)}, "
                                               f"id {rec.disk_id})")
        return
    if not size:
        raise UsageError("Missing option '--size' (or --source SNAPSHOT|IMAGE to make the disk from one)")
    if des_name:
        if double:
            raise UsageError("--double-encryption is for platform-key disks; a DES's type decides for its disks "
                             "(des create --type EncryptionAtRestWithPlatformAndCustomerKeys)")
        rec = des.create_disk(c.state, name, parse_size(size), des_name, int(sector_size), revocation)
    else:
        rec = disks.create(c.state, name, parse_size(size), int(sector_size), revocation=revocation,
                           double=double)
    emit(disk_json(c.state, rec), as_json,
         f"created disk {rec.name} ({format_size(rec.size)}, id {rec.disk_id})")


@disk.command("list")
@json_opt
@pass_ctx
def disk_list(c: Ctx, as_json):
    """List disks."""
    recs = c.state.catalog.list_disks()
    if as_json:
        emit([{"name": r.name, "id": r.disk_id, "kind": r.kind, "sizeBytes": r.size,
               "sectorSize": r.sector_size, "encryption": {"type": r.encryption_type}}
              for r in recs], True)
        return
    if not recs:
        click.echo("no disks")
        return
    w = max(len(r.name) for r in recs)
    click.echo(f"{'NAME':<{w}}  {'SIZE':>8}  SECTOR  ENCRYPTION")
    for r in recs:
        click.echo(f"{r.name:<{w}}  {format_size(r.size):>8}  {r.sector_size:>6}  {r.encryption_type}")


@disk.command("show")
@click.argument("name")
@json_opt
@pass_ctx
def disk_show(c: Ctx, name, as_json):
    """Show a disk, its encryption type and key layers (never key bytes)."""
    from ..mount.daemon import disk_state
    rec = c.state.catalog.get_disk(name)
    d = disk_json(c.state, rec, check_keys=True)
    d["live"] = disk_state(c.state, rec, d["health"])  # issue 16: the state a running mount serves it in
    d["state"] = d["live"]["state"]
    d = contract(d)
    if as_json:
        emit(d, True)
        return
    for k in ("name", "id", "kind", "size", "sectorSize", "readOnly", "path", "created", "health"):
        click.echo(f"{k:<12} {d[k]}")
    live = d["live"]
    extra = (f" ({live['keyError']['reason']})" if live.get("keyError") and live["state"] == "KeyUnavailable"
             else f" ({live.get('graceSecondsLeft')} s left)" if live["state"] == "ServingOnGrace"
             else f" ({live.get('integrityErrors')} integrity failure(s))" if live.get("integrityErrors") else "")
    click.echo(f"{'state':<12} {live['state']}{extra}" + (f" in the mount at {live['mountpoint']}"
                                                          if live.get("mountpoint") else ""))
    click.echo(f"{'encryption':<12} {d['encryption']['type']}")
    if "encryptionAtHost" in d:
        click.echo(f"{'at host':<12} {'on' if d['encryptionAtHost'] else 'off'} ({d['encryptionAtHostFrom']})")
    for l in d["encryption"].get("layers", []):
        click.echo(f"  layer {l['role']}: {l['algorithm']} key {l['keyId']} ({l['provider']}, {l['wrapAlgorithm']})")
    if "error" in d:
        click.echo(f"{'error':<12} {d['error']}")


@disk.command("resize")
@click.argument("name")
@click.option("--size", required=True, help="new size (grow only)")
@json_opt
@pass_ctx
def disk_resize(c: Ctx, name, size, as_json):
    """Grow a disk (mounted disk files change size without a remount)."""
    from ..control import disks
    rec = disks.resize(c.state, name, parse_size(size))
    emit(disk_json(c.state, rec), as_json, f"resized disk {name} to {format_size(rec.size)}")


@disk.command("update")
@click.argument("name")
@click.option("--des", "des_name", help="move a platform-key disk to this disk encryption set (re-wrap only)")
@click.option("--platform-key", is_flag=True, help="(refused for customer-key disks: use `disk copy`)")
@click.option("--revocation", type=click.Choice(["immediate", "on-restart"]),
              help="when a revoked customer key stops this disk's I/O")
@json_opt
@pass_ctx
def disk_update(c: Ctx, name, des_name, platform_key, revocation, as_json):
    """Change a disk's key: platform key -> DES; never back (copy the disk instead)."""
    from ..control import des
    rec = c.state.catalog.get_disk(name)
    if platform_key:
        if rec.des:
            des.refuse_back_to_platform(name, rec.des)
    if des_name:
        rec = des.move_disk_to_des(c.state, name, des_name)
    if revocation:
        c.state.catalog.update_disk(name, revocation=revocation)
        rec = c.state.catalog.get_disk(name)
    emit(disk_json(c.state, rec), as_json, f"updated disk {name}: {rec.encryption_type}"
         + (f" (DES {rec.des})" if rec.des else "") + f", revocation {rec.revocation}")


@disk.command("copy")
@click.argument("src")
@click.argument("dst")
@click.option("--des", "des_name", default=None,
              help="DES of the copy (default: the source's); --des '' for a platform key")
@click.option("--double-encryption/--single-encryption", "double", default=None,
              help="with a platform key: give the copy a second, platform-keyed layer, or only one "
                   "(default: as the source); on a DES its type decides")
@json_opt
@pass_ctx
def disk_copy(c: Ctx, src, dst, des_name, double, as_json):
    """Copy a disk's data to a new disk with new DEKs (also between single and double encryption)."""
    from ..control.copy import copy

    progress = Progress(as_json, f"copying {src}", "copy")
    rec = copy(c.state, src, dst, des=des_name, double=double, progress=progress)
    progress.done()
    emit(disk_json(c.state, c.state.catalog.get_disk(rec.name)), as_json, f"copied {src} to {dst}")


@disk.command("delete")
@click.argument("name")
@yes_opt
@json_opt
@pass_ctx
def disk_delete(c: Ctx, name, yes, as_json):
    """Delete a disk and its file (its key dies with it: the data cannot be recovered)."""
    from ..control import disks
    from ..errors import Busy
    from ..mount.daemon import mount_with_disk_open
    rec = c.state.catalog.get_disk(name)
    mp = mount_with_disk_open(c.state, name, rec.disk_id)
    if mp is not None:
        raise Busy(f"disk {name!r} is open in the mount at {mp}; close it there (or "
                   f"`blockcrypt umount {mp}`) and delete it then")
    if rec.kind in ("disk", "copying"):  # else delete refuses, naming the right command
        confirm(f"delete disk {name} ({format_size(rec.size)}) and its data for good", yes)
    rec = disks.delete(c.state, name)
    emit({"deleted": rec.name, "id": rec.disk_id}, as_json, f"deleted disk {rec.name}")


@disk.command("export")
@click.argument("name")
@click.argument("file", type=click.Path())
@json_opt
@pass_ctx
def disk_export(c: Ctx, name, file, as_json):
    """Write the flat encrypted image (aes-xts-plain64, no header) of a disk, snapshot or image."""
    from ..control import diff
    prog = Progress(as_json, f"exporting {name}", "export")
    r = diff.export(c.state, name, file, progress=prog)
    prog.done()
    emit(r, as_json, f"wrote the encrypted image of {name} to {file} ({format_size(r['sizeBytes'])}); "
                     f"open it with the key of `disk dump-key`:\n  {r['cryptsetup']}")


@disk.command("dump-key")
@click.argument("name")
@out_file_opt("the 64-byte DEK", "double encryption: 64 + 32 bytes")
@click.option("--yes-i-understand", "yes", is_flag=True,
              help="confirm: whoever holds this file can read the disk without blockcrypt")
@json_opt
@pass_ctx
def disk_dump_key(c: Ctx, name, out, yes, as_json):
    """Emergency export of a disk's DEK, to open its data area with cryptsetup (docs/FORMAT.md)."""
    if not yes:
        raise UsageError("dump-key writes the disk's raw key to a file; pass --yes-i-understand to do it")
    from ..control import disks
    rec = c.state.catalog.get_disk(name)
    disks.dump_key(c.state, name, out)
    if disks.is_double(disks.read_disk_header(rec)):
        emit({"name": name, "keyFile": out, "keys": [
                 {"role": "data", "algorithm": "aes-xts-plain64", "offset": 0, "bytes": 64},
                 {"role": "infrastructure", "algorithm": "xchacha20-poly1305", "offset": 64, "bytes": 32}]},
             as_json, f"wrote both DEKs of {name} to {out} (mode 0600): bytes 0-63 the AES-256-XTS key, "
                      "64-95 the XChaCha20-Poly1305 key; docs/FORMAT.md shows how to decrypt a sector with them")
        return
    iv = " --iv-large-sectors" if rec.sector_size != 512 else ""
    line = (f"cryptsetup open --type plain -c aes-xts-plain64 -s 512 --sector-size {rec.sector_size}{iv} "
            f"--offset 2048 --key-file {out} --keyfile-size 64 {rec.path} {name}")
    emit({"name": name, "keyFile": out, "cryptsetup": line}, as_json,
         f"wrote the DEK of {name} to {out} (mode 0600). Open the data area with:\n  {line}")


@disk.command("verify")
@click.argument("name")
@json_opt
@pass_ctx
def disk_verify(c: Ctx, name, as_json):
    """Scrub a disk: read every written sector and list the ones whose tag fails (read-only)."""
    from ..control import disks

    progress = Progress(as_json, f"verifying {name}", "verify")
    r = disks.verify(c.state, name, progress=progress)
    progress.done()
    text = (f"disk {name}: {format_size(r['scannedBytes'])} of written sectors verified, no bad sector"
            if r["ok"] else
            f"disk {name}: {len(r['badSectors'])} bad sector(s) ({r['sectorSize']} bytes each): "
            + ", ".join(str(s) for s in r["badSectors"][:50]) + (" ..." if len(r["badSectors"]) > 50 else ""))
    emit(r, as_json, text)
    if not r["ok"]:
        raise SystemExit(IntegrityError.exit_code)


@disk.command("check")
@click.argument("name")
@json_opt
@pass_ctx
def disk_check(c: Ctx, name, as_json):
    """Check both header copies of a disk; repair a damaged copy from the good one."""
    from ..control.disks import check_headers
    r = check_headers(c.state.catalog.get_disk(name))
    before, repaired = r["before"], r["repaired"]
    emit({"name": name, **r}, as_json,
         f"{name}: header copies A={before['A']} B={before['B']}" +
         (f"; repaired {', '.join(repaired)}" if repaired else "; both intact"))


# --- platform keys ---------------------------------------------------------------------

@cli.group("platform-key")
def platform_key():
    """Platform-managed key store."""


@platform_key.command("list")
@json_opt
@pass_ctx
def pk_list(c: Ctx, as_json):
    """List platform key versions (never key bytes)."""
    from ..keys.providers.platform import PlatformKeyStore
    vs = PlatformKeyStore(c.state.path / "keys").versions()
    emit(vs, as_json, "\n".join(f"platform/{v['version']}  {v['created']}{'  current' if v['current'] else ''}"
                                for v in vs))


@platform_key.command("rotate")
@json_opt
@pass_ctx
def pk_rotate(c: Ctx, as_json):
    """Add a platform key version and re-wrap every disk's DEK (no data rewritten)."""
    from ..control.rotation import rotate_platform_key
    on_step = _rewrap_progress(as_json, "platform-key rotate", c.state.catalog.list_members())
    r = rotate_platform_key(c.state, on_step=on_step)
    on_step.progress.done()
    emit(r, as_json, f"platform key now platform/{r['version']}: re-wrapped {len(r['rewrapped'])} disk(s), "
                     f"retired {len(r['retired'])} old version(s)")
    if r["failed"]:
        from ..errors import Refused
        names = ", ".join(f"{n} ({e})" for n, e in sorted(r["failed"].items()))
        raise Refused(f"{len(r['failed'])} disk(s) could not be re-wrapped and keep their old key version: "
                      f"{names}; the other disks are rotated")


@cli.group()
def catalog():
    """The catalog of disks."""


@catalog.command("rebuild")
@json_opt
@pass_ctx
def catalog_rebuild(c: Ctx, as_json):
    """Rebuild the catalog from the disk headers."""
    from ..control.disks import rebuild_catalog
    r = rebuild_catalog(c.state)
    emit(r, as_json, f"catalog rebuilt: {len(r['disks'])} disk(s), {len(r['snapshots'])} snapshot(s), "
                     f"{len(r['images'])} image(s)"
                     + (f", {len(r['unreadable'])} unreadable" if r["unreadable"] else "")
                     + (f", {len(r['unused'])} unused file(s)" if r["unused"] else ""))


def _rewrap_progress(as_json: bool, operation: str, recs):
    """An ``on_step(step, detail)`` callback of a rotation that drives a Progress over ``recs``,
    the disks it re-wraps (one "rewrap" step each)."""
    total = len(list(recs))
    prog = Progress(as_json, "re-wrapping", operation, unit="disks")
    seen = []

    def on_step(step, detail=None):
        if step == "rewrap" and total:
            seen.append(detail)
            prog(min(len(seen), total), total)
    on_step.progress = prog
    return on_step


# --- disk encryption sets -----------------------------------------------------------------

@cli.group("des")
def des_group():
    """Disk encryption sets: customer-managed keys in a key vault."""


def _des_text(d: dict) -> str:
    lines = [f"{'name':<12} {d['name']}", f"{'id':<12} {d['id']}", f"{'type':<12} {d['type']}",
             f"{'active key':<12} {d['activeKey']['keyUrl']}",
             f"{'auto-rotate':<12} {d['rotationToLatestKeyVersionEnabled']}",
             f"{'identity':<12} {d['identity']['name']} ({d['identity']['clientId']})",
             f"{'disks':<12} {', '.join(d['disks']) or '-'}"]
    if d["previousKeys"]:
        lines.append(f"{'rotating from':<12} {', '.join(k['keyUrl'] for k in d['previousKeys'])}")
    return "\n".join(lines)


@des_group.command("create")
@click.argument("name")
@click.option("--key-url", required=True, help="https://HOST:PORT/keys/K[/VERSION] (key vault) or "
              "transit+https://HOST:PORT/MOUNT/keys/K[/VERSION] (OpenBao/Vault transit) or "
              "pkcs11:token=T;object=K?module-path=M&pin-source=file:PATH (PKCS#11 token) or "
              "kmip://HOST:PORT/UID (KMIP server)")
@click.option("--type", "enc_type", default="EncryptionAtRestWithCustomerKey", show_default=True,
              help="EncryptionAtRestWithCustomerKey, or EncryptionAtRestWithPlatformAndCustomerKeys "
                   "(double encryption)")
@click.option("--auto-rotate", is_flag=True, help="follow the key's newest version")
@click.option("--vault-dir", type=click.Path(), help="the vault's directory (a vault on this host): "
              "the DES identity is created there")
@click.option("--identity-file", type=click.Path(), help="an identity made by the vault admin "
              "(`blockcrypt vault identity create NAME --json`)")
@click.option("--ca", "ca_file", type=click.Path(), help="CA certificate of the vault (default: VAULT_DIR/ca.pem)")
@click.option("--grant", is_flag=True, help="also grant get, wrapKey, unwrapKey in the vault at --vault-dir")
@json_opt
@pass_ctx
def des_create(c: Ctx, name, key_url, enc_type, auto_rotate, vault_dir, identity_file, ca_file, grant, as_json):
    """Create a disk encryption set and its vault identity; probe its access."""
    from ..control import des
    rec = des.create(c.state, name, key_url, enc_type=enc_type, auto_rotate=auto_rotate, vault_dir=vault_dir,
                     identity_file=identity_file, ca_file=ca_file, grant=grant)
    emit(des.to_json(c.state, rec), as_json, f"created disk encryption set {name} (key {rec.active_key}); "
         f"identity {rec.identity.get('name')} has get, wrapKey, unwrapKey")


@des_group.command("list")
@json_opt
@pass_ctx
def des_list(c: Ctx, as_json):
    """List disk encryption sets."""
    from ..control import des
    items = [des.to_json(c.state, r) for r in c.state.catalog.list_des()]
    emit(items, as_json, "\n".join(f"{d['name']}  {d['activeKey']['keyUrl']}  disks: {len(d['disks'])}"
                                    for d in items) or "no disk encryption sets")


@des_group.command("show")
@click.argument("name")
@json_opt
@pass_ctx
def des_show(c: Ctx, name, as_json):
    """Show a disk encryption set (previousKeys while a rotation runs)."""
    from ..control import des
    d = des.to_json(c.state, c.state.catalog.get_des(name))
    emit(d, as_json, _des_text(d))


@des_group.command("update")
@click.argument("name")
@click.option("--key-url", help="a new version of the same key: re-wrap every disk's DEK under it")
@click.option("--auto-rotate/--no-auto-rotate", default=None, help="follow the key's newest version, or stop")
@click.option("--type", "enc_type", default=None, help="(refused: a DES's encryption type is fixed at creation)")
@json_opt
@pass_ctx
def des_update(c: Ctx, name, key_url, auto_rotate, enc_type, as_json):
    """Rotate a DES to a new key version (no data rewritten) or change auto-rotation."""
    from ..control import des
    if enc_type is not None and enc_type != c.state.catalog.get_des(name).type:
        des.refuse_type_change(name)

    on_step = _rewrap_progress(as_json, "des update", c.state.catalog.disks_of_des(name))
    r = des.update(c.state, name, key_url=key_url, auto_rotate=auto_rotate, on_step=on_step)
    on_step.progress.done()
    d = des.to_json(c.state, c.state.catalog.get_des(name))
    emit({**r, **_active(r, d), "des": d}, as_json,
         f"updated {name}: re-wrapped {len(r.get('rewrapped', []))} disk(s)")


@des_group.command("rotate")
@click.argument("name")
@json_opt
@pass_ctx
def des_rotate(c: Ctx, name, as_json):
    """Re-wrap every DEK under the key's newest version (or finish an interrupted rotation)."""
    from ..control import des
    on_step = _rewrap_progress(as_json, "des rotate", c.state.catalog.disks_of_des(name))
    r = des.rotate(c.state, name, on_step=on_step)
    on_step.progress.done()
    d = des.to_json(c.state, c.state.catalog.get_des(name))
    emit({**r, **_active(r, d), "des": d}, as_json,
         f"{name}: key {d['activeKey']['keyUrl']}, re-wrapped {len(r['rewrapped'])} disk(s)")


def _active(r: dict, d: dict) -> dict:
    """A rotation's ``activeKey`` as the same object as in ``des show`` (never a bare string)."""
    return {"activeKey": d["activeKey"]} if "activeKey" in r else {}


@des_group.command("delete")
@click.argument("name")
@yes_opt
@json_opt
@pass_ctx
def des_delete(c: Ctx, name, yes, as_json):
    """Delete a disk encryption set (refused while disks use it)."""
    from ..control import des
    c.state.catalog.get_des(name)
    if not c.state.catalog.disks_of_des(name):  # else delete refuses, naming them
        confirm(f"delete disk encryption set {name}", yes)
    rec = des.delete(c.state, name)
    emit({"deleted": rec.name, "id": rec.des_id}, as_json,
         f"deleted disk encryption set {name}; its vault identity {rec.identity.get('name')} "
         "can now be removed by the vault admin")


@cli.group("config")
def config_group():
    """Catalog settings: max_des, key_check_interval, key_grace_period, auto_rotate_interval, on_revoke,
    encryption_at_host, temp_disks, temp_dir, metrics_listen, log_max_bytes, log_files,
    warning_repeat_interval."""


def _setting_json(st, name: str) -> dict:
    """One setting as JSON: its typed value (a number is a number), its default, its help."""
    from ..control import settings
    s = settings.setting(name)
    return {"name": s.name, "value": settings.get(st, s.name), "default": s.parse(s.default),
            "mountTime": s.mount_time, "help": s.help}


@config_group.command("set")
@click.argument("key")
@click.argument("value")
@json_opt
@pass_ctx
def config_set(c: Ctx, key, value, as_json):
    """Set a catalog setting (running mounts pick it up at their next check; encryption_at_host,
    temp_disks and temp_dir at their next mount only)."""
    from ..control import settings
    text = settings.set_(c.state, key, value)
    emit(_setting_json(c.state, key), as_json, f"{key} = {text}")
    if settings.setting(key).mount_time and not as_json:
        click.echo(f"blockcrypt: {key} is read when a mount starts: running mounts keep their value "
                   "until remounted", err=True)


@config_group.command("get")
@click.argument("key", required=False)
@json_opt
@pass_ctx
def config_get(c: Ctx, key, as_json):
    """Show one setting, or all of them (--json: one object, or a list of them)."""
    from ..control import settings
    keys = [settings.setting(key).name] if key else list(settings.SETTINGS)
    if as_json:
        items = [_setting_json(c.state, k) for k in keys]
        emit(items[0] if key else items, True)
        return
    vals = {k: settings.get_text(c.state, k) for k in keys}
    if key:
        click.echo(vals[key])
    else:
        click.echo("\n".join(f"{k} = {v}    # {settings.SETTINGS[k].help}" for k, v in vals.items()))


# --- the other command sets ----------------------------------------------------------------

def _attach() -> None:
    from .mount import mount_cmd, status_cmd, umount_cmd
    from .snapshots import image, snapshot
    from .vault import vault
    for cmd in (mount_cmd, umount_cmd, status_cmd, vault, snapshot, image):
        cli.add_command(cmd)
    from .platformkey import register
    register(platform_key)  # platform-key export, platform-key import


_attach()


def main(argv=None) -> int:
    """The one error boundary: every failure is one line on stderr (JSON with --json) and the
    exit code of the table in docs/CLI.md."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    as_json = wants_json(args)
    try:
        cli.main(args=args, prog_name="blockcrypt", standalone_mode=False)
        return 0
    except BlockcryptError as e:
        return report_error(error_code(e), str(e), e.exit_code, as_json)
    except click.exceptions.Abort:
        return report_error("Aborted", "aborted: nothing was changed", 130, as_json)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        return report_error("UsageError", e.format_message() + hint, e.exit_code, as_json)
    except click.ClickException as e:
        return report_error("UsageError" if e.exit_code == 2 else "Error", e.format_message(), e.exit_code,
                            as_json)
    except KeyboardInterrupt:
        return report_error("Interrupted", "interrupted", 130, as_json)
    except OSError as e:
        return report_error("OSError", f"{e.strerror or e}{(': ' + e.filename) if e.filename else ''}", 1,
                            as_json)


if __name__ == "__main__":
    sys.exit(main())
