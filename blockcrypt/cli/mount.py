"""`blockcrypt mount`, `blockcrypt umount` and `blockcrypt status` (click commands).

Each takes the state directory from the group's context object.

Caveat: a front end only; the logic lives in blockcrypt.mount.daemon.
"""
from __future__ import annotations

import time

import click

from .._util.units import format_size
from .options import emit, json_opt


def _state(ctx: click.Context):
    return ctx.find_object(object).state


@click.command("mount")
@click.argument("mountpoint", type=click.Path())
@click.option("--foreground", "-f", is_flag=True, help="serve in this process until unmounted (logs on stderr)")
@click.option("--allow-other", is_flag=True,
              help="let other users reach the mount; disk files become root:disk 0660")
@click.option("--frontend", type=click.Choice(["native", "fusepy"]), default="native", show_default=True,
              envvar="BLOCKCRYPT_FRONTEND",
              help="native: the libfuse 3 session in C (no Python in a request); fusepy: the simple Python one")
@click.option("--backing-cache", type=click.Choice(["buffered", "none"]), default="buffered", show_default=True,
              help="none: O_DIRECT on the disk files (no double caching, as QEMU's cache=none)")
@click.option("--bench-null-cipher", is_flag=True,
              help="BENCHMARKS ONLY: serve disks WITHOUT encryption (writes plaintext into the disk files)")
@click.option("--temp-disk", "temp_disks", multiple=True, metavar="NAME:SIZE",
              help="a host-local scratch disk served as temp/NAME, gone at unmount (repeatable; "
                   "default: the temp_disks setting)")
@click.option("--temp-dir", type=click.Path(), help="where the temp disk files live (default: the temp_dir "
              "setting, else STATE/temp)")
@click.option("--encryption-at-host/--no-encryption-at-host", default=None,
              help="temp disks under an ephemeral key that only this mount's memory holds; without it they "
                   "are PLAIN sectors on this host (default: the encryption_at_host setting)")
@click.option("--metrics", metavar="HOST:PORT", default=None,
              help="serve Prometheus metrics at http://HOST:PORT/metrics, loopback only (port 0 picks one; "
                   "'off' for none; default: the metrics_listen setting, empty = off)")
@click.option("--metrics-allow-remote", is_flag=True,
              help="allow a --metrics address that is not loopback (the endpoint has no authentication)")
@json_opt
@click.pass_context
def mount_cmd(ctx, mountpoint, foreground, allow_other, frontend, backing_cache, bench_null_cipher, temp_disks,
              temp_dir, encryption_at_host, metrics, metrics_allow_remote, as_json):
    """Mount every disk of the catalog as MOUNTPOINT/disks/<name>, and the mount's temp disks as
    MOUNTPOINT/temp/<name>."""
    from ..mount import daemon as mount
    st = _state(ctx)
    if bench_null_cipher:
        click.echo("blockcrypt: WARNING: --bench-null-cipher serves disks WITHOUT encryption; "
                   "use scratch disks only", err=True)
    r = mount.mount(st, mountpoint, foreground=foreground, allow_other=allow_other,
                    null_cipher=bench_null_cipher, frontend=frontend, backing_cache=backing_cache,
                    temp_disks=list(temp_disks) or None, temp_dir=temp_dir, encryption_at_host=encryption_at_host,
                    metrics=metrics, metrics_allow_remote=metrics_allow_remote)
    if foreground:
        return
    temp = ""
    if r.get("tempDisks"):
        temp = (f"; temp disks in {r['mountpoint']}/temp/ "
                + ("(encryption at host: ephemeral key)" if r.get("encryptionAtHost")
                   else "(NOT ENCRYPTED: plain sectors on this host; --encryption-at-host encrypts them)"))
    emit(r, as_json, f"mounted {st.path} at {r['mountpoint']} (id {r['id']}, pid {r['pid']}); "
                      f"disks are in {r['mountpoint']}/disks/{temp}, log in {r['log']}"
                      + (f", metrics at {r['metricsUrl']}" if r.get("metricsUrl") else ""))


@click.command("umount")
@click.argument("mountpoint", type=click.Path())
@json_opt
@click.pass_context
def umount_cmd(ctx, mountpoint, as_json):
    """Flush every open disk and unmount MOUNTPOINT."""
    from ..mount import daemon as mount
    r = mount.umount(_state(ctx), mountpoint)
    emit(r, as_json, f"unmounted {r['mountpoint']}")


def _age(t) -> str:
    if not isinstance(t, (int, float)):
        return "?"
    s = int(time.time() - t)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@click.command("status")
@json_opt
@click.pass_context
def status_cmd(ctx, as_json):
    """List the mounts of this state directory and the state of each open disk: open,
    KeyUnavailable (reason), ServingOnGrace (seconds left) or Corrupt. Exits 0 when all is
    well, else with the worst finding: 50 a mount is dead (daemon gone or mount point stale),
    51 a disk is stopped (key unavailable, or it failed to open), 52 a disk is corrupt,
    53 a disk serves on its grace period (docs/OPERATIONS.md)."""
    from ..mount import daemon as mount
    st = _state(ctx)
    mounts = mount.status(st)
    found = mount.problems(mounts)
    if as_json:
        emit({"state": str(st.path), "mounts": mounts,
              "exitCode": found.exit_code if found else 0}, True, "")
    elif not mounts:
        click.echo(f"no mounts of {st.path}")
    for m in mounts if not as_json else ():
        cipher = m.get("cipher", "?")
        click.echo(f"mount {m['id']}  {m['state']}  pid {m.get('pid')}  up {_age(m.get('started'))}  "
                   f"{m.get('mountpoint')}  cipher {cipher}"
                   + ("  allow-other" if m.get("allowOther") else ""))
        click.echo("  encryption at host: " + ("on" if m.get("encryptionAtHost") else "off"))
        if m.get("metricsUrl"):
            click.echo(f"  metrics: {m['metricsUrl']}")
        for t in m.get("tempDisks") or []:
            click.echo(f"  temp disk {t['name']}  {format_size(t['sizeBytes'])}  {t['encryption']}  {t['path']}")
        disks = m.get("disks") or []
        if not disks:
            click.echo("  no open disks")
        for d in disks:
            click.echo("  " + _disk_line(d))
    if found:
        raise found


def _disk_line(d: dict) -> str:
    state = d.get("state")
    k = d.get("keyError") or {}
    if state == "ServingOnGrace":
        return (f"disk {d['name']}  ServingOnGrace ({d.get('graceSecondsLeft', 0)} s left)  {k.get('message', '')}  "
                f"{d.get('openHandles', 0)} handle(s)")
    if state == "KeyUnavailable" and "error" not in d:
        tail = "  serving until the next mount" if d.get("serving") else "  stopped"
        return (f"disk {d['name']}  KeyUnavailable ({k.get('reason')})  {k.get('message')}{tail}  "
                f"{d.get('openHandles', 0)} handle(s)")
    if state in ("open", "Corrupt") and "error" not in d:
        err = d.get("lastError")
        return (f"disk {d['name']}  {state}  {d['openHandles']} handle(s)  {d['cipher']}  "
                f"{d['sizeBytes']} bytes{'  read-only' if d.get('readOnly') else ''}"
                + (f"  integrity failures {d.get('integrityErrors')}" if d.get("integrityErrors") else "")
                + f"  errors {d.get('errors', 0)}"
                + (f" (last: {err['errno']} {err['message']})" if err else ""))
    e = d.get("error") or {}
    return f"disk {d['name']}  {state} (failed to open)  {e.get('errno', '')} {e.get('message', '')}"
