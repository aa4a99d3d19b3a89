"""`blockcrypt platform-key export` and `platform-key import`: back up the platform keys,
restore them, move disks to another host (docs/OPERATIONS.md, "Backup, restore and moving
hosts"). They join the `platform-key` group of cli/main.py.

Caveat: a front end over control/platformkeys.py; the passphrase is read from a file (never
from the command line, where `ps` would show it).
"""
from __future__ import annotations

import click

from ..errors import UsageError
from .options import Ctx, confirm, emit, json_opt, out_file_opt, pass_ctx, yes_opt


@click.command("export")
@out_file_opt("the backup")
@click.option("--passphrase-file", type=click.Path(exists=True, dir_okay=False),
              help="file whose first line (12 characters or more) seals the backup "
                   "(Argon2id or scrypt, then AES-256-GCM)")
@click.option("--version", "versions", type=int, multiple=True, metavar="N",
              help="export only version N (repeatable; default: every version of the store)")
@click.option("--yes-i-understand", "yes", is_flag=True,
              help="without --passphrase-file: write the keys in clear (whoever holds the file can read "
                   "every platform-key disk of this host)")
@json_opt
@pass_ctx
def pk_export(c: Ctx, out, passphrase_file, versions, yes, as_json):
    """Back up the platform key store to a file, sealed under a passphrase (or raw, 0600)."""
    if not passphrase_file and not yes:
        raise UsageError("export needs --passphrase-file FILE to seal the keys, or --yes-i-understand to "
                         "write them in clear")
    from ..control.platformkeys import export_keys
    r = export_keys(c.state, out, passphrase_file=passphrase_file, versions=list(versions) or None)
    listed = ", ".join(f"platform/{v}" for v in r["versions"])
    how = "sealed under the passphrase" if r["protection"] == "passphrase" else "IN CLEAR"
    emit(r, as_json, f"wrote {listed} to {out} (mode 0600, {how})")


@click.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--passphrase-file", type=click.Path(exists=True, dir_okay=False),
              help="file whose first line is the backup's passphrase")
@click.option("--replace-unused", is_flag=True,
              help="replace a version this store holds with another key when no disk here uses it "
                   "(a store just made by `blockcrypt init` on a host being restored)")
@yes_opt
@json_opt
@pass_ctx
def pk_import(c: Ctx, file, passphrase_file, replace_unused, yes, as_json):
    """Add the platform keys of a backup to this store (idempotent; a different key under a
    version this store holds is refused)."""
    if replace_unused:
        confirm("replace the platform keys of this store that no disk uses with the backup's", yes)
    from ..control.platformkeys import import_keys
    r = import_keys(c.state, file, passphrase_file=passphrase_file, replace_unused=replace_unused)
    parts = [f"{k} {', '.join(f'platform/{v}' for v in r[k])}" for k in ("added", "replaced", "unchanged") if r[k]]
    emit(r, as_json, f"imported {file}: " + "; ".join(parts) + f"; current platform/{r['current']}")


def register(group) -> None:
    """Add export and import to the `platform-key` group."""
    for cmd in (pk_export, pk_import):
        group.add_command(cmd)
