"""DEK envelopes: a new DEK, and wrap / unwrap / rewrap of one layer of a disk header.

A header layer carries the wrapped DEK, the versioned KEK id it is wrapped
under, and a digest of its binding (disk id + layer role; a family member's
family id, ``Header.binding_id``, since all members share one DEK lineage). Every path that
touches a wrapped DEK goes through here, so the binding is checked in one place
and a re-wrap (rotation, or a move to another provider) is one function.

Caveat: DEKs are returned as ``bytes``; callers drop them as soon as the sector
layer holds the key. Nothing here logs.
"""
from __future__ import annotations

import os

from ..errors import CorruptHeader
from ..format import Header, Layer, binding_context, binding_digest
from .base import WrappedKey

DEK_BYTES = 64          # AES-256-XTS: two 256-bit keys
DATA_ALG = "aes-xts-plain64"
INFRA_ALG = "xchacha20-poly1305"   # the infrastructure layer of double encryption
INFRA_DEK_BYTES = 32


def new_dek(data_alg: str = DATA_ALG) -> bytes:
    if data_alg == INFRA_ALG:
        return os.urandom(INFRA_DEK_BYTES)
    while True:
        dek = os.urandom(DEK_BYTES)
        if dek[:32] != dek[32:]:  # XTS refuses equal halves
            return dek


def wrapped_of(layer: Layer) -> WrappedKey:
    return WrappedKey(layer.provider, layer.kek_id, layer.wrap_alg, layer.wrapped_dek)


def layer_from(role: int, wk: WrappedKey, disk_id: bytes, data_alg: str = DATA_ALG) -> Layer:
    return Layer(role, wk.provider, wk.kek_id, wk.algorithm, data_alg, wk.blob, binding_digest(disk_id, role))


def wrap_new_layer(keys, provider: str, kek_ref: str | None, disk_id: bytes, role: int,
                   data_alg: str = DATA_ALG) -> Layer:
    """A fresh DEK for ``role`` of disk ``disk_id``, wrapped by ``provider``'s key ``kek_ref``."""
    prov = keys.get(provider)
    dek = new_dek(data_alg)
    try:
        wk = prov.wrap(kek_ref or prov.default_ref(), dek, binding_context(disk_id, role), disk_id=disk_id.hex())
    finally:
        del dek
    return layer_from(role, wk, disk_id, data_alg)


def _checked_layer(h: Header, role: int) -> Layer:
    layer = h.layer(role)
    if layer is None:
        raise CorruptHeader(name=h.name, why=f"no key for layer role {role}")
    if layer.binding != binding_digest(h.binding_id, role):
        raise CorruptHeader(name=h.name, why="the wrapped key is bound to another disk")
    return layer


def unwrap_layer(keys, h: Header, role: int) -> bytes:
    """The DEK of layer ``role`` of header ``h`` (``keys``: a ProviderRegistry)."""
    layer = _checked_layer(h, role)
    return keys.get(layer.provider).unwrap(wrapped_of(layer), binding_context(h.binding_id, role),
                                           disk_id=h.disk_id_hex)


def rewrap_layer(keys, h: Header, role: int, provider: str, to_ref: str) -> Layer:
    """Layer ``role`` of ``h`` with its DEK re-wrapped under ``provider``'s ``to_ref``.

    Within one provider this is the provider's rewrap (a vault may do it without
    returning the DEK); across providers (platform key -> customer key) it is an
    unwrap and a wrap."""
    layer = _checked_layer(h, role)
    ctx = binding_context(h.binding_id, role)
    if provider == layer.provider:
        wk = keys.get(provider).rewrap(wrapped_of(layer), ctx, to_ref, disk_id=h.disk_id_hex)
    else:
        dek = keys.get(layer.provider).unwrap(wrapped_of(layer), ctx, disk_id=h.disk_id_hex)
        try:
            wk = keys.get(provider).wrap(to_ref, dek, ctx, disk_id=h.disk_id_hex)
        finally:
            del dek
    return layer_from(role, wk, h.binding_id, layer.data_alg)


def rewrap_layers(keys, jobs, workers: int = 4, pool=None) -> list:
    """Re-wrap many layers: ``jobs`` is ``[(header, role, provider, to_ref)]``; returns one
    result per job, in order: the new Layer, or the BlockcryptError that job failed with.

    Jobs that stay within their provider go to its ``rewrap_many`` together (one call per
    provider: transit sends them in one request, the vault unwraps them in parallel and wraps
    them with the target version's public key, others re-wrap one by one); jobs that move a
    layer to another provider are an unwrap and a wrap each. Both use ``pool`` (a
    ThreadPoolExecutor the caller keeps across calls), or one of ``workers`` threads made here."""
    from concurrent.futures import ThreadPoolExecutor

    from ..errors import BlockcryptError
    if pool is None and workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(jobs)), thread_name_prefix="rewrap") as own:
            return rewrap_layers(keys, jobs, workers, pool=own)
    out: list = [None] * len(jobs)
    same: dict[str, list[int]] = {}
    moves: list[int] = []
    for i, (h, role, provider, to_ref) in enumerate(jobs):
        try:
            layer = _checked_layer(h, role)
        except BlockcryptError as e:
            out[i] = e
            continue
        (same.setdefault(provider, []) if provider == layer.provider else moves).append(i)
    for provider, idx in same.items():
        items = []
        for i in idx:
            h, role, _, to_ref = jobs[i]
            items.append((wrapped_of(h.layer(role)), binding_context(h.binding_id, role), to_ref, h.disk_id_hex))
        for i, wk in zip(idx, keys.get(provider).rewrap_many(items, pool=pool)):
            h, role = jobs[i][0], jobs[i][1]
            out[i] = wk if isinstance(wk, BaseException) else layer_from(role, wk, h.binding_id,
                                                                         h.layer(role).data_alg)

    def move(i):
        try:
            return rewrap_layer(keys, *jobs[i])
        except BlockcryptError as e:
            return e
    results = pool.map(move, moves) if pool is not None and len(moves) > 1 else map(move, moves)
    for i, r in zip(moves, results):
        out[i] = r
    return out
