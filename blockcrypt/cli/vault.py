"""The ``vault`` click group: init, serve, identity, policy, audit (local, on
the vault directory) and key (over HTTPS as the admin identity made at init).

The main group adds it as ``blockcrypt vault``. Every command takes ``--dir``
(default: ``$BLOCKCRYPT_VAULT_DIR``, else ``STATE-vault`` beside the state
directory, i.e. ``/var/lib/blockcrypt-vault``) and ``--json``.

Caveats: identity, policy and audit commands open ``vault.db`` directly and so
must run on the vault's host as a user who can read the directory; changes
take effect on the running service at its next request. A failure reaches the
one error boundary (cli/main.py): one line ``blockcrypt: error: ...``, the error's exit code.
"""
from __future__ import annotations

import contextlib
import functools
import os

import click

from .._util.clock import iso_z
from ..errors import AuditBroken, StateError, UsageError, VaultDirError
from .options import Ctx, confirm, yes_opt
from .options import emit as _emit
from .options import json_opt as JSON_OPTION
from .output import json_line

#: the vault directory when neither --dir nor $BLOCKCRYPT_VAULT_DIR names one: beside the state
#: directory (/var/lib/blockcrypt -> /var/lib/blockcrypt-vault)
DEFAULT_VAULT_SUFFIX = "-vault"


def default_vault_dir(state_path=None) -> str:
    from ..control.state import resolve_path
    return str(resolve_path(state_path)) + DEFAULT_VAULT_SUFFIX


@contextlib.contextmanager
def _store(vault_dir):
    """The vault's store (vault.db) for a local command (identity, policy, audit), closed after it."""
    from ..vault.server.store import open_store
    store = open_store(vault_dir)
    try:
        yield store
    finally:
        store.close()


def _dir_default(ctx: click.Context, param, value):
    if value:
        return value
    c = ctx.find_object(Ctx)
    return default_vault_dir(c.state_path if c else None)


DIR_HELP = ("vault directory (default: $BLOCKCRYPT_VAULT_DIR, else the state directory's path + "
            "'-vault': /var/lib/blockcrypt-vault)")
DIR_OPTION = click.option("--dir", "vault_dir", envvar="BLOCKCRYPT_VAULT_DIR", callback=_dir_default,
                          type=click.Path(file_okay=False), help=DIR_HELP)


def friendly(fn):
    """ValueError from argument parsing below click (permissions, URLs) is a usage error; a
    StateError about the vault directory says "vault directory" and how to name another."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except ValueError as e:
            raise UsageError(str(e)) from None
        except StateError as e:
            vd = kw.get("vault_dir")
            if type(e) is StateError and vd and os.path.abspath(str(e.kw.get("path", ""))) == os.path.abspath(vd):
                raise VaultDirError(path=vd, why=e.kw.get("why", "")) from None
            raise
    return wrapper


def _ts(t) -> str:
    return "-" if t in (None, "") else iso_z(t)


@click.group()
def vault():
    """The key vault: Azure Key Vault keys API over HTTPS."""


@vault.command("init")
@DIR_OPTION
@click.option("--sku", type=click.Choice(["standard", "premium"]), default="standard", show_default=True,
              help="premium also offers RSA-HSM keys (a PKCS#11 token at serve time)")
@click.option("--retention-days", type=int, default=90, show_default=True, help="soft-delete retention, 7..90")
@click.option("--purge-protection", is_flag=True, help="refuse purges until the retention period lapses")
@click.option("--san", multiple=True, help="extra host name or IP for the server certificate")
@click.option("--cert", "cert_file", type=click.Path(dir_okay=False), help="use this server certificate chain (PEM)")
@click.option("--key", "key_file", type=click.Path(dir_okay=False), help="... and this private key (PEM)")
@JSON_OPTION
@friendly
def init_cmd(vault_dir, sku, retention_days, purge_protection, san, cert_file, key_file, as_json):
    """Create a vault: store, master key, CA + server certificate, admin identity."""
    from ..vault.admin import init_vault
    creds = init_vault(vault_dir, sku=sku, retention_days=retention_days, purge_protection=purge_protection,
                       sans=tuple(san), cert_file=cert_file, key_file=key_file)
    info = {"dir": os.path.abspath(vault_dir), "sku": sku, "retention_days": retention_days,
            "purge_protection": purge_protection, "tenant_id": creds["tenant_id"],
            "admin_client_id": creds["client_id"], "admin_credentials": f"{vault_dir}/admin.json",
            "ca": f"{vault_dir}/ca.pem"}
    _emit(info, as_json, f"vault created in {vault_dir} (sku {sku}, retention {retention_days} days, purge "
                         f"protection {'on' if purge_protection else 'off'}); admin credentials in "
                         f"{vault_dir}/admin.json, CA in {vault_dir}/ca.pem")


@vault.command("serve")
@DIR_OPTION
@click.option("--listen", required=True, help="HOST:PORT to listen on (port 0 picks a free port)")
@click.option("--token-ttl-seconds", type=click.IntRange(5, 86400), default=600, show_default=True,
              help="lifetime of the bearer tokens the vault issues")
@click.option("--public-url", help="base URL clients use, if not https://LISTEN")
@click.option("--hsm-module", envvar="BLOCKCRYPT_VAULT_HSM_MODULE", help="PKCS#11 module for RSA-HSM keys (premium)")
@click.option("--hsm-token", envvar="BLOCKCRYPT_VAULT_HSM_TOKEN", help="PKCS#11 token label")
@click.option("--hsm-pin-file", envvar="BLOCKCRYPT_VAULT_HSM_PIN_FILE", type=click.Path(dir_okay=False),
              help="file holding the token user PIN")
@click.option("--max-connections", type=click.IntRange(1, 100000), default=512, show_default=True,
              help="connections served at once; more are closed at accept")
@click.option("--max-per-client", type=click.IntRange(1, 100000), default=64, show_default=True,
              help="connections from one client address")
@click.option("--request-timeout", type=click.FloatRange(0.5, 3600), default=30, show_default=True,
              help="seconds a request's headers and body may take to arrive")
@click.option("--verbose", is_flag=True, help="log every HTTP request on stderr (the audit has them anyway)")
@click.option("--metrics", "metrics_listen", metavar="HOST:PORT",
              help="serve Prometheus metrics at http://HOST:PORT/metrics, loopback only (port 0 picks one)")
@click.option("--metrics-allow-remote", is_flag=True,
              help="allow a --metrics address that is not loopback (the endpoint has no authentication)")
@JSON_OPTION
@friendly
def serve_cmd(vault_dir, listen, token_ttl_seconds, public_url, hsm_module, hsm_token, hsm_pin_file,
              max_connections, max_per_client, request_timeout, verbose, metrics_listen, metrics_allow_remote,
              as_json):
    """Serve the vault over HTTPS until SIGTERM/SIGINT (prints and writes its URL to serve.json;
    --json: one line {"event": "listening", "url", "pid"} once listening)."""
    from ..vault.server.service import parse_listen, serve
    parse_listen(listen)
    hsm = None
    if hsm_module:
        from ..vault.server.hsm_keys import open_hsm
        if not hsm_token or not hsm_pin_file:
            raise UsageError("--hsm-module needs --hsm-token and --hsm-pin-file")
        hsm = open_hsm(hsm_module, hsm_token, hsm_pin_file)
    ready = (lambda url: json_line({"event": "listening", "url": url, "pid": os.getpid()})) if as_json else None
    serve(vault_dir, listen, token_ttl_seconds=token_ttl_seconds, public_url=public_url, hsm=hsm, verbose=verbose,
          max_connections=max_connections, max_per_client=max_per_client, request_timeout=request_timeout,
          metrics_listen=metrics_listen, metrics_allow_remote=metrics_allow_remote, ready=ready,
          announce=not as_json)


# -- identities and policies --------------------------------------------------------------

def _local_audit(store, operation: str, detail: str) -> None:
    from ..vault.server import audit
    with store.tx() as c:
        audit.append(c, {"identity": "local", "operation": operation, "status": 200, "result": "ok",
                         "detail": detail}, store.audit_key)


@vault.group("identity")
def identity_grp():
    """Identities (client id + secret) that get bearer tokens from the vault."""


@identity_grp.command("create")
@click.argument("name")
@DIR_OPTION
@JSON_OPTION
@friendly
def identity_create(name, vault_dir, as_json):
    """Create an identity; its secret is shown once, here."""
    from ..vault.server.identities import create_identity
    with _store(vault_dir) as store:
        ident = create_identity(store, name)
        _local_audit(store, "IdentityCreate", f"{name} {ident['client_id']}")
        ident["tenant_id"] = store.config.tenant_id
    _emit(ident, as_json, f"identity {name}\nclient_id: {ident['client_id']}\nclient_secret: "
                          f"{ident['client_secret']}\ntenant_id: {ident['tenant_id']}\n"
                          "(the secret is shown only now; it is stored hashed)")


@identity_grp.command("list")
@DIR_OPTION
@JSON_OPTION
@friendly
def identity_list(vault_dir, as_json):
    """List the identities and their permissions (never secrets)."""
    from ..vault.server.identities import list_identities
    with _store(vault_dir) as store:
        rows = list_identities(store)
    lines = [f"{r['name']:<20} {r['client_id']}  "
             f"{'admin (all)' if r['admin'] else ','.join(r['permissions']) or '(no permissions)'}" for r in rows]
    _emit(rows, as_json, "\n".join(lines))


@identity_grp.command("delete")
@click.argument("name")
@DIR_OPTION
@yes_opt
@JSON_OPTION
@friendly
def identity_delete(name, vault_dir, yes, as_json):
    """Delete an identity: its tokens stop working at once (disk encryption sets using it lose their key)."""
    from ..vault.server.identities import delete_identity, find_identity
    with _store(vault_dir) as store:
        find_identity(store, name)
        confirm(f"delete vault identity {name} (whatever uses it loses access to its keys)", yes)
        ident = delete_identity(store, name)
        _local_audit(store, "IdentityDelete", f"{ident['name']} {ident['client_id']}")
    _emit({"deleted": ident["name"], "clientId": ident["client_id"]}, as_json,
          f"identity {ident['name']} deleted; its tokens no longer work")


@vault.group("policy")
def policy_grp():
    """Access policies: key permissions per identity."""


@policy_grp.command("set")
@click.option("--identity", required=True, help="identity name or client id")
@click.option("--permissions", required=True, help="comma list, e.g. get,wrapKey,unwrapKey (or all, or '')")
@DIR_OPTION
@JSON_OPTION
@friendly
def policy_set(identity, permissions, vault_dir, as_json):
    """Set an identity's key permissions (replaces what it had)."""
    from ..vault.server.policies import parse_permissions, set_policy
    perms = parse_permissions(permissions)
    with _store(vault_dir) as store:
        out = set_policy(store, identity, perms)
        _local_audit(store, "PolicySet", f"{out['name']} {','.join(perms) or '(none)'}")
    _emit(out, as_json, f"identity {out['name']}: {','.join(perms) or '(no permissions)'}")


@policy_grp.command("show")
@click.option("--identity", required=True, help="identity name or client id")
@DIR_OPTION
@JSON_OPTION
@friendly
def policy_show(identity, vault_dir, as_json):
    """Show an identity's key permissions."""
    from ..vault.server.identities import find_identity
    from ..vault.server.policies import PERMISSIONS, permissions_of
    with _store(vault_dir) as store:
        ident = find_identity(store, identity)
        perms = list(PERMISSIONS) if ident["admin"] else sorted(permissions_of(store, ident["client_id"]))
    _emit({**ident, "permissions": perms}, as_json, f"identity {ident['name']}: {','.join(perms) or '(none)'}")


# -- audit ----------------------------------------------------------------------------------

@vault.group("audit", invoke_without_command=True)
@DIR_OPTION
@click.option("--key", "key_name", help="only records about this key")
@click.option("--limit", type=click.IntRange(1), help="only the last N records")
@JSON_OPTION
@click.pass_context
@friendly
def audit_grp(ctx, vault_dir, key_name, limit, as_json):
    """Show the audit log (or `audit verify` to check its hash chain); --json: JSON Lines, a record a line."""
    ctx.meta["blockcrypt.audit"] = {"vault_dir": vault_dir, "as_json": as_json}
    if ctx.invoked_subcommand is not None:
        return
    from ..vault.server import audit
    with _store(vault_dir) as store:
        recs = audit.records(store, key=key_name, limit=limit)
    if as_json:  # a log: JSON Lines, one record a line (docs/CLI.md)
        for r in recs:
            json_line(r)
        return
    for r in recs:
        kv = r.get("key", "") + ("/" + r["version"] if r.get("version") else "")
        ctx_s = f" disk={r['disk_id']}" if r.get("disk_id") else ""
        click.echo(f"{r.get('seq'):>6} {r.get('time', '-')} {r.get('identity', '-'):<14} "
                   f"{r.get('operation', '-'):<18} {kv or '-':<48} {r.get('status', '-')} "
                   f"{r.get('result', '-')}{ctx_s}")


@audit_grp.command("verify")
@click.option("--dir", "vault_dir", envvar="BLOCKCRYPT_VAULT_DIR", type=click.Path(file_okay=False),
              help=DIR_HELP + "; also accepted before `verify`")
@JSON_OPTION
@click.pass_context
@friendly
def audit_verify(ctx, vault_dir, as_json):
    """Check the hash chain; names the first edited, removed or reordered record."""
    outer = ctx.meta.get("blockcrypt.audit", {})
    vault_dir = vault_dir or outer.get("vault_dir")
    from ..vault.server import audit
    with _store(vault_dir) as store:
        res = audit.verify(store)
    as_json = as_json or outer.get("as_json")
    if as_json:
        _emit(res, True)
    elif res["ok"]:
        click.echo(f"audit log intact: {res['records']} records, head {res['head']} (keyed chain; "
                   "keep the head elsewhere to detect a cut tail)"
                   + (f"; the first {res['unkeyed']} records predate the keyed chain" if res["unkeyed"] else "")
                   + (f"; {res['pruned']} earlier records pruned behind a signed checkpoint"
                      if res.get("pruned") else ""))
    if not res["ok"]:
        raise AuditBroken(seq=res["bad_seq"], why=res["why"])


@audit_grp.command("prune")
@click.option("--before", "before", required=True, metavar="DATE",
              help="delete the records older than this ISO 8601 date or UTC time "
                   "(2026-12-01 or 2026-12-01T16:30:00Z)")
@click.option("--dir", "vault_dir", envvar="BLOCKCRYPT_VAULT_DIR", type=click.Path(file_okay=False),
              help=DIR_HELP + "; also accepted before `prune`")
@yes_opt
@JSON_OPTION
@click.pass_context
@friendly
def audit_prune(ctx, before, vault_dir, yes, as_json):
    """Delete the audit records older than DATE; a signed checkpoint keeps the chain verifiable.

    The chain must verify first (nothing is pruned otherwise). Export the records first
    (`vault audit --json`) if they must be kept."""
    outer = ctx.meta.get("blockcrypt.audit", {})
    vault_dir = vault_dir or outer.get("vault_dir")
    as_json = as_json or outer.get("as_json")
    from ..vault.server import audit
    when = audit.parse_before(before)
    confirm(f"delete the audit records of {vault_dir} older than {when.strftime('%Y-%m-%dT%H:%M:%SZ')} "
            "for good", yes)
    with _store(vault_dir) as store:
        res = audit.prune(store, when)
    _emit(res, as_json, f"pruned {res['pruned']} audit records older than {res['before']} "
                        f"({res['prunedTotal']} in all, behind the checkpoint at record {res['checkpointSeq']}); "
                        f"{res['records']} records kept, head {res['head']}"
          if res["checkpointSeq"] else f"no audit record is older than {res['before']}; nothing pruned")


# -- keys over HTTPS --------------------------------------------------------------------------

def _client(vault_dir, url):
    from ..vault.client import VaultClient
    return VaultClient.for_admin(vault_dir, url)


URL_OPTION = click.option("--url", envvar="BLOCKCRYPT_VAULT_URL",
                          help="vault URL (default: $BLOCKCRYPT_VAULT_URL, else the running vault's serve.json)")


def _key_line(b: dict) -> str:
    k, a = b.get("key", {}), b.get("attributes", {})
    state = "enabled" if a.get("enabled") else "disabled"
    extra = ""
    if a.get("nbf"):
        extra += f" nbf={_ts(a['nbf'])}"
    if a.get("exp"):
        extra += f" exp={_ts(a['exp'])}"
    if b.get("deletedDate"):
        extra += f" deleted={_ts(b['deletedDate'])} purge={_ts(b['scheduledPurgeDate'])}"
    n_bits = len(k.get("n", "")) * 6 // 8 * 8 if k.get("n") else 0
    size = f" {((n_bits + 1023) // 1024) * 1024}-bit" if n_bits else ""
    return f"{k.get('kid', b.get('kid', '?'))} {k.get('kty', '')}{size} {state}{extra}"


@vault.group("key")
def key_grp():
    """Keys, over HTTPS as the vault's admin identity."""


@key_grp.command("create")
@click.argument("name")
@click.option("--kty", type=click.Choice(["RSA", "RSA-HSM"]), default="RSA", show_default=True,
              help="RSA (software) or RSA-HSM (in the premium vault's PKCS#11 token)")
@click.option("--size", "size_bits", type=int, default=2048, show_default=True, help="2048, 3072 or 4096")
@click.option("--tag", multiple=True, help="NAME=VALUE (repeatable)")
@click.option("--disabled", is_flag=True, help="create the key disabled")
@DIR_OPTION
@URL_OPTION
@JSON_OPTION
@friendly
def key_create(name, kty, size_bits, tag, disabled, vault_dir, url, as_json):
    """Create a key (or a new version of it) and show it (never its private part)."""
    tags = {}
    for t in tag:
        k, sep, v = t.partition("=")
        if not sep or not k:
            raise UsageError(f"--tag must be NAME=VALUE, not {t!r}")
        tags[k] = v
    b = _client(vault_dir, url).create_key(name, kty=kty, key_size=size_bits, tags=tags, enabled=not disabled)
    _emit(b, as_json, _key_line(b))


@key_grp.command("list")
@click.option("--deleted", is_flag=True, help="list soft-deleted keys instead")
@DIR_OPTION
@URL_OPTION
@JSON_OPTION
@friendly
def key_list(deleted, vault_dir, url, as_json):
    """List the keys (--deleted: the soft-deleted ones, with their purge dates)."""
    c = _client(vault_dir, url)
    items = c.list_deleted() if deleted else c.list_keys()
    lines = []
    for it in items:
        a = it.get("attributes", {})
        line = f"{it['kid'].rsplit('/', 1)[-1]:<32} {'enabled' if a.get('enabled') else 'disabled'}"
        if deleted:
            line += f" deleted={_ts(it.get('deletedDate'))} purge={_ts(it.get('scheduledPurgeDate'))}"
        lines.append(line)
    _emit(items, as_json, "\n".join(lines) if lines else "(no keys)")


@key_grp.command("show")
@click.argument("name")
@click.option("--version", help="a version (default: the current one)")
@click.option("--versions", "all_versions", is_flag=True, help="list every version")
@DIR_OPTION
@URL_OPTION
@JSON_OPTION
@friendly
def key_show(name, version, all_versions, vault_dir, url, as_json):
    """Show a key's current version (or one, or all of them)."""
    c = _client(vault_dir, url)
    if all_versions:
        items = c.list_versions(name)
        _emit(items, as_json, "\n".join(
            f"{it['kid']} {'enabled' if it['attributes'].get('enabled') else 'disabled'} "
            f"created={_ts(it['attributes'].get('created'))}" for it in items))
        return
    b = c.call("GET", f"/keys/{name}/{version or ''}")
    _emit(b, as_json, _key_line(b))


def _simple(cmd_name: str, help_text: str, fn, with_version: bool = False, ask: str | None = None):
    @click.argument("name")
    @DIR_OPTION
    @URL_OPTION
    @JSON_OPTION
    @friendly
    def cmd(name, vault_dir, url, as_json, version=None, yes=False):
        client = _client(vault_dir, url)
        if ask:
            client.get_deleted(name)  # a missing key fails here, before the question
            confirm(ask.format(name=name), yes)
        b = fn(client, name, version)
        if b is None:
            _emit({"name": name, "purged": True}, as_json, f"key {name} purged")
        else:
            _emit(b, as_json, _key_line(b))
    cmd.__doc__ = help_text
    if with_version:
        cmd = click.option("--version", help="a version (default: the current one)")(cmd)
    if ask:
        cmd = yes_opt(cmd)
    key_grp.command(cmd_name)(cmd)


_simple("rotate", "Make a new current version of the key.", lambda c, n, v: c.rotate_key(n))
def _set_enabled(cmd_name: str, enabled: bool, help_text: str):
    """``disable``/``enable``: every version of the key (the kill switch must not need to know
    versions: disks wrapped under an older version stop too), or one with ``--version``."""
    @click.argument("name")
    @click.option("--version", help="only this version (default: every version of the key)")
    @DIR_OPTION
    @URL_OPTION
    @JSON_OPTION
    @friendly
    def cmd(name, version, vault_dir, url, as_json):
        c = _client(vault_dir, url)
        versions = [version] if version else [it["kid"].rsplit("/", 1)[1] for it in c.list_versions(name)]
        done = []
        for v in versions:
            b = c.update_key(name, v, enabled=enabled)
            done.append({"version": v, "kid": b["key"]["kid"], "enabled": b["attributes"]["enabled"]})
        out = b if version else c.call("GET", f"/keys/{name}/")
        out = dict(out, versions=done)
        what = "enabled" if enabled else "disabled"
        _emit(out, as_json, "\n".join(f"{what} {d['kid']}" for d in done)
              + f"\n{what} {len(done)} version(s) of key {name}")
    cmd.__doc__ = help_text
    key_grp.command(cmd_name)(cmd)


_set_enabled("disable", False, "Disable every version of the key (or one, with --version): every "
                               "operation on it is refused, and disks under it stop.")
_set_enabled("enable", True, "Enable every version of the key (or one, with --version).")
_simple("delete", "Soft-delete the key (recoverable until its scheduled purge date).",
        lambda c, n, v: c.delete_key(n))
_simple("recover", "Recover a soft-deleted key.", lambda c, n, v: c.recover_key(n))
_simple("purge", "Purge a soft-deleted key for good (refused under purge protection).",
        lambda c, n, v: c.purge_key(n), ask="purge key {name} for good (data under it can never be read again)")

