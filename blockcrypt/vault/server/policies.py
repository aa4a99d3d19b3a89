"""Access policies: which key operations an identity may perform.

Permission names are Azure's access-policy key permissions (``get``, ``list``,
``create``, ``update``, ``import``, ``delete``, ``recover``, ``purge``,
``rotate``, ``wrapKey``, ``unwrapKey``, ``encrypt``, ``decrypt``); ``all``
grants every one. The admin identity made at init holds all permissions
implicitly. A policy is per vault (not per key), as in Azure's vault access
policies.

Caveats: there is no RBAC and no per-key scoping; ``policy set`` replaces the
identity's whole permission set.
"""
from __future__ import annotations

import json

from ...errors import UsageError
from .identities import find_identity
from .store import Store

PERMISSIONS = ("get", "list", "create", "update", "import", "delete", "recover", "purge", "rotate",
               "wrapKey", "unwrapKey", "encrypt", "decrypt")
_CANON = {p.lower(): p for p in PERMISSIONS}


def parse_permissions(text: str) -> list[str]:
    out: list[str] = []
    for raw in (text or "").replace(" ", "").split(","):
        if not raw:
            continue
        if raw.lower() == "all":
            return list(PERMISSIONS)
        p = _CANON.get(raw.lower())
        if p is None:
            raise UsageError(f"unknown permission {raw!r} (one of {', '.join(PERMISSIONS)}, or all)")
        if p not in out:
            out.append(p)
    return out


def set_policy(store: Store, identity: str, permissions: list[str]) -> dict:
    ident = find_identity(store, identity)
    with store.tx() as c:
        if permissions:
            c.execute("INSERT INTO policies (client_id, permissions) VALUES (?, ?) "
                      "ON CONFLICT (client_id) DO UPDATE SET permissions = excluded.permissions",
                      (ident["client_id"], json.dumps(permissions)))
        else:
            c.execute("DELETE FROM policies WHERE client_id = ?", (ident["client_id"],))
    return {**ident, "permissions": permissions}


def permissions_of(store: Store, client_id: str) -> set[str]:
    with store.read() as c:
        r = c.execute("SELECT permissions FROM policies WHERE client_id = ?", (client_id,)).fetchone()
    if r is None:
        return set()
    if not isinstance(perms := json.loads(r["permissions"]), list):
        raise UsageError("corrupt policy row")
    return set(perms)


def allowed(store: Store, identity: dict, permission: str) -> bool:
    if identity.get("admin"):
        return True
    return permission in permissions_of(store, identity["client_id"])
