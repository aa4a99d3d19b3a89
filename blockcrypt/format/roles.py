"""Layer roles: which place in a disk's layer stack a header layer holds, and the
binding of a wrapped DEK to its disk and role.

The role says where the layer sits, not where its key comes from (the layer's
provider says that):

    ROLE_DATA   1  the outer AES-256-XTS layer (the customer layer of a double-encrypted
                   disk; the only layer of a single-layer disk, platform or customer key)
    ROLE_INFRA  2  the inner infrastructure layer of double encryption (platform-keyed,
                   another algorithm and mode)

Caveat: the numbers are on disk; the names are what `disk show --json` prints.
"""
from __future__ import annotations

import hashlib

ROLE_DATA = 1
ROLE_INFRA = 2
ROLE_NAMES = {ROLE_DATA: "data", ROLE_INFRA: "infrastructure"}


def binding_digest(disk_id: bytes, role: int) -> bytes:
    """The context a wrapped DEK is bound to: this disk and this layer role."""
    return hashlib.sha256(b"blockcrypt/v1/binding\0" + disk_id + bytes([role])).digest()


def binding_context(disk_id: bytes, role: int) -> bytes:
    """Associated data for the KEK wrap (AEAD AAD, or a digest inside the wrapped plaintext)."""
    return b"blockcrypt/v1/dek\0" + disk_id + bytes([role])
