"""Disk file format v1: the header area and its two checksummed copies.

A disk file is a 1 MiB header area followed by the data area::

    0            512 KiB                 1 MiB                      1 MiB + size
    +------------+-----------------------+--------------------------+
    | copy A     | copy B                | data area                |
    | (primary)  | (secondary)           | aes-xts-plain64 sectors  |
    +------------+-----------------------+--------------------------+

Each copy (little-endian; at most COPY_MAX bytes)::

    off  len  field
    0    8    magic: b"BLKCRYA\\x01" (copy A) or b"BLKCRYB\\x01" (copy B)
    8    2    format version (1)
    10   2    reserved (0)
    12   4    header length in bytes, checksum included
    16   8    sequence number (grows by one on every header write)
    24   8    required feature flags (an unknown bit refuses to open;
              bit 0: per-sector metadata, the infrastructure layer of double encryption;
              bit 1: overlay chain member, a chunk bitmap and a parent file)
    32   8    compatible feature flags (unknown bits are ignored)
    40   16   disk id (UUID bytes)
    56   8    logical size in bytes
    64   4    sector size in bytes (512 or 4096)
    68   4    flags: bit 0 read-only
    72   8    data offset in bytes (1 MiB)
    80   1    kind: 0 disk, 1 snapshot, 2 image
    81   1    layer count
    82   2    reserved (0)
    84   ...  name (str), data cipher (str), then the layers
    ...  32   SHA-256 of every byte before it

    str   = u16 length + UTF-8 bytes
    bytes = u16 length + bytes
    layer = u8 role, str provider, str kek id (versioned), str wrap algorithm,
            str data algorithm, bytes wrapped DEK, 32-byte binding digest
    overlay (only with required feature bit 1, after the layers; 76 bytes) =
            16 family id, 16 file id, 16 parent file id (zeros: none),
            u64 bitmap length in chunks, u32 chunk bytes, 16 source member id (zeros: none)

Writes go copy A first, then copy B, each fsynced, with the same sequence
number: a torn copy fails its checksum and the other copy is used, so a header
write is atomic. On open, the valid copy with the highest sequence number wins
and a damaged or stale copy is rewritten from it (when opened writable).

Caveat: this module is pure format: bytes in, bytes out (headerio.py reads
and writes the copies through a backing store); it knows nothing of keys
beyond the opaque wrapped blobs.
"""
from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass, field, replace

from ..errors import UnsupportedFormat
from .layout import COPY_MAX, DATA_OFFSET, FEATURE_META_JOURNAL, FEATURE_OVERLAY, FEATURE_SECTOR_META
from .roles import ROLE_INFRA, ROLE_NAMES

FORMAT_VERSION = 1
MAGIC_A = b"BLKCRYA\x01"
MAGIC_B = b"BLKCRYB\x01"

#: required feature bits this version understands: bit 0, per-sector metadata (the
#: infrastructure layer of double encryption; layout.py places it). Readers before it
#: refuse such a disk rather than read AEAD ciphertext as XTS.
KNOWN_REQUIRED = FEATURE_SECTOR_META | FEATURE_OVERLAY | FEATURE_META_JOURNAL
KIND_CODES = {"disk": 0, "snapshot": 1, "image": 2}
KIND_NAMES = {v: k for k, v in KIND_CODES.items()}


_FIXED = struct.Struct("<8sHHIQQQ16sQIIQBBH")
assert _FIXED.size == 84
#: after the layers when FEATURE_OVERLAY is set: family id, file id, parent file id (zeros:
#: none), bitmap length in chunks, chunk size in bytes, source member id (zeros: none)
_OVERLAY = struct.Struct("<16s16s16sQI16s")
assert _OVERLAY.size == 76


@dataclass(frozen=True)
class Layer:
    role: int
    provider: str
    kek_id: str
    wrap_alg: str
    data_alg: str
    wrapped_dek: bytes
    binding: bytes

    def to_json(self) -> dict:
        return {
            "role": ROLE_NAMES.get(self.role, str(self.role)),
            "provider": self.provider,
            "keyId": self.kek_id,
            "wrapAlgorithm": self.wrap_alg,
            "algorithm": self.data_alg,
        }


@dataclass(frozen=True)
class Header:
    disk_id: bytes
    name: str
    size: int
    sector_size: int
    cipher: str = "aes-xts-plain64"
    kind: str = "disk"
    read_only: bool = False
    layers: tuple = field(default_factory=tuple)
    seqno: int = 0
    required_features: int = 0
    compat_features: int = 0
    data_offset: int = DATA_OFFSET
    #: overlay chains (FEATURE_OVERLAY): the family's key lineage id, this file's id (its
    #: name in STATE/disks), the parent file's id (None: the family's first file), the
    #: length of this file's chunk bitmap, the chunk size, and the member it was made from
    family_id: bytes | None = None
    file_id: bytes | None = None
    parent_id: bytes | None = None
    map_chunks: int = 0
    chunk_bytes: int = 0
    source_id: bytes | None = None

    @property
    def disk_id_hex(self) -> str:
        return self.disk_id.hex()

    @property
    def overlay(self) -> bool:
        return bool(self.required_features & FEATURE_OVERLAY)

    @property
    def binding_id(self) -> bytes:
        """What wrapped DEKs and AEAD sectors are bound to: the family id of a family member
        (every member shares the DEK lineage), the disk id otherwise."""
        return self.family_id if self.overlay and self.family_id else self.disk_id

    @property
    def own_file_id(self) -> bytes:
        return self.file_id if self.overlay and self.file_id else self.disk_id

    def layer(self, role: int) -> Layer | None:
        for layer in self.layers:
            if layer.role == role:
                return layer
        return None

    def with_layer(self, new: Layer) -> "Header":
        layers = tuple(new if l.role == new.role else l for l in self.layers)
        if new.role not in [l.role for l in self.layers]:
            layers += (new,)
        return replace(self, layers=layers)

    def evolve(self, **kw) -> "Header":
        return replace(self, **kw)

    @staticmethod
    def new_id() -> bytes:
        return uuid.uuid4().bytes


def _put_str(out: bytearray, s: str) -> None:
    _put_bytes(out, s.encode("utf-8"))


def _put_bytes(out: bytearray, b: bytes) -> None:
    if len(b) > 0xFFFF:
        raise ValueError("header field too long")
    out += struct.pack("<H", len(b)) + b


class _Reader:
    def __init__(self, buf: bytes, off: int, end: int):
        self.buf, self.off, self.end = buf, off, end

    def take(self, n: int) -> bytes:
        if self.off + n > self.end:
            raise ValueError("field runs past the header end")
        b = self.buf[self.off:self.off + n]
        self.off += n
        return b

    def u8(self) -> int:
        return self.take(1)[0]

    def bytes_(self) -> bytes:
        (n,) = struct.unpack("<H", self.take(2))
        return self.take(n)

    def str_(self) -> str:
        return self.bytes_().decode("utf-8")


def pack(h: Header, magic: bytes) -> bytes:
    body = bytearray()
    _put_str(body, h.name)
    _put_str(body, h.cipher)
    for l in h.layers:
        body.append(l.role)
        _put_str(body, l.provider)
        _put_str(body, l.kek_id)
        _put_str(body, l.wrap_alg)
        _put_str(body, l.data_alg)
        _put_bytes(body, l.wrapped_dek)
        if len(l.binding) != 32:
            raise ValueError("binding digest must be 32 bytes")
        body += l.binding
    if h.required_features & FEATURE_OVERLAY:
        body += _OVERLAY.pack(h.family_id or bytes(16), h.file_id or bytes(16), h.parent_id or bytes(16),
                              h.map_chunks, h.chunk_bytes, h.source_id or bytes(16))
    total = _FIXED.size + len(body) + 32
    if total > COPY_MAX:
        raise ValueError("header too large")
    fixed = _FIXED.pack(
        magic, FORMAT_VERSION, 0, total, h.seqno, h.required_features, h.compat_features,
        h.disk_id, h.size, h.sector_size, 1 if h.read_only else 0, h.data_offset,
        KIND_CODES[h.kind], len(h.layers), 0,
    )
    raw = fixed + bytes(body)
    return raw + hashlib.sha256(raw).digest()


def unpack(buf: bytes, magic: bytes) -> Header:
    """Parse one copy. Raises ValueError on any damage, UnsupportedFormat on a newer format."""
    if len(buf) < _FIXED.size + 32:
        raise ValueError("short header")
    (mg, version, _r0, total, seqno, req, compat, disk_id, size, sector_size, flags,
     data_offset, kind, n_layers, _r1) = _FIXED.unpack_from(buf, 0)
    if mg != magic:
        raise ValueError("bad magic")
    if total < _FIXED.size + 32 or total > min(len(buf), COPY_MAX):
        raise ValueError("bad header length")
    raw = buf[:total - 32]
    if hashlib.sha256(raw).digest() != buf[total - 32:total]:
        raise ValueError("checksum mismatch")
    if version != FORMAT_VERSION:
        raise UnsupportedFormat(name="?", why=f"format version {version} (this blockcrypt reads {FORMAT_VERSION})")
    if req & ~KNOWN_REQUIRED:
        raise UnsupportedFormat(name="?", why=f"unknown required feature flags {req & ~KNOWN_REQUIRED:#x}")
    if sector_size not in (512, 4096) or data_offset != DATA_OFFSET or kind not in KIND_NAMES:
        raise ValueError("bad geometry")
    r = _Reader(buf, _FIXED.size, total - 32)
    name = r.str_()
    cipher = r.str_()
    layers = []
    for _ in range(n_layers):
        role = r.u8()
        provider, kek_id, wrap_alg, data_alg = r.str_(), r.str_(), r.str_(), r.str_()
        wrapped = r.bytes_()
        binding = r.take(32)
        layers.append(Layer(role, provider, kek_id, wrap_alg, data_alg, wrapped, binding))
    ov = {}
    if req & FEATURE_OVERLAY:
        fam, fid, parent, map_chunks, chunk_bytes, source = _OVERLAY.unpack(r.take(_OVERLAY.size))
        if chunk_bytes < sector_size or chunk_bytes & (chunk_bytes - 1) or chunk_bytes > (1 << 20):
            raise ValueError("bad chunk size")
        z = bytes(16)
        ov = dict(family_id=fam, file_id=fid, parent_id=None if parent == z else parent, map_chunks=map_chunks,
                  chunk_bytes=chunk_bytes, source_id=None if source == z else source)
    if r.off != total - 32:
        raise ValueError("trailing bytes in header")
    if bool(req & FEATURE_SECTOR_META) != any(l.role == ROLE_INFRA for l in layers):
        raise ValueError("an infrastructure layer needs the sector-metadata feature, and only it")
    if req & FEATURE_META_JOURNAL and not req & FEATURE_SECTOR_META:
        raise ValueError("the metadata journal needs the sector-metadata feature")
    return Header(disk_id=disk_id, name=name, size=size, sector_size=sector_size, cipher=cipher,
                  kind=KIND_NAMES[kind], read_only=bool(flags & 1), layers=tuple(layers),
                  seqno=seqno, required_features=req, compat_features=compat,
                  data_offset=data_offset, **ov)
