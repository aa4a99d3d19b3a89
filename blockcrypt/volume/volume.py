"""An open disk: read and write any byte range of its plaintext, through the C engine.

The engine (native/engine, module ``blockcrypt._engine``) does the work: one
storage call and one sector-layer call per request, read-modify-write of
partial sectors under a range lock, holes that read as zeros, discard, flush,
the revocation gate and per-disk counters; every call releases the GIL. This
class is the binding the control plane uses (``disk copy``, ``check``, the
fusepy front end, tests): it validates arguments, keeps the names, and turns
the engine's errno into the domain error (EROFS -> ReadOnly, EFBIG ->
OutOfRange, ENOSPC -> NoSpace, EBADMSG -> IntegrityError, a revoked disk -> the
key error that stopped it). The libfuse 3 session serves the same engine
volume without any of this Python in a request.

``layers`` is a list of ``(algorithm, key)``, outermost first: today
``[("aes-xts-plain64", dek)]``, ``[("null", b"")]`` (benchmarks), or for double
encryption ``[("aes-xts-plain64", dek), ("xchacha20-poly1305", dek32, disk_id)]``
(its metadata area comes from the header's layout). The engine
copies the key into locked memory; the caller drops its copy at once.

A disk of a family (snapshots, images, disks made from them) is a chain of files;
``chain_below`` follows the parent ids of the headers and the engine's overlay
(native/engine/bc_storage_cow.c) serves the chain as one store.

Caveats: the DEK lives only inside the engine (wiped on close or revocation);
the null layer writes plaintext into the disk file; control/disks.py
``open_volume`` does the catalog lookup, header read and DEK unwrap before.
"""
from __future__ import annotations

import errno

import os

from ..errors import Busy, CorruptHeader, IntegrityError, NativeMissing, NoSpace, OutOfRange, ReadOnly
from ..format import Layout, read_header
from ..format.layout import MAP_AREA_OFFSET, MAX_CHAIN_FILES
from ..storage import LocalFileBacking

CACHE_MODES = ("buffered", "none")


def file_path(dir_path: str, file_id: bytes) -> str:
    """The backing file of ``file_id`` in a disks directory (files are named by their id)."""
    return os.path.join(dir_path, f"{file_id.hex()}.img")


def chain_below(path: str, header, name: str = "?") -> list[tuple[str, int, object]]:
    """The overlay chain under the file at ``path`` (its header ``header``): the parent's file,
    the grandparent's, ... as (path, map_chunks, header), nearest first; [] for a file that
    is not in a chain or is the first of its family."""
    out, h, d = [], header, os.path.dirname(path)
    while h.overlay and h.parent_id is not None:
        ppath = file_path(d, h.parent_id)
        try:
            with LocalFileBacking(ppath, writable=False) as b:
                ph = read_header(b, name)
        except FileNotFoundError:
            raise CorruptHeader(name=name, why=f"a file of its chain is missing ({ppath})") from None
        if ph.own_file_id != h.parent_id or ph.binding_id != h.binding_id:
            raise CorruptHeader(name=name, why=f"the chain file {ppath} belongs to another family")
        out.append((ppath, ph.map_chunks if ph.overlay else 0, ph))
        if len(out) >= MAX_CHAIN_FILES:
            raise CorruptHeader(name=name, why="its chain is deeper than 255 files (or loops)")
        h = ph
    return out


def _storage_kw(path: str, header, name: str) -> dict:
    """The engine's storage arguments: the top file's journal, and the chain below it."""
    kw = {"journal_off": Layout.of(header).journal_off}
    lowers = chain_below(path, header, name)
    if lowers:
        kw.update(lowers=[(p, mc, Layout.of(h).journal_off) for p, mc, h in lowers], map_chunks=header.map_chunks,
                  map_off=MAP_AREA_OFFSET, chunk_bytes=header.chunk_bytes)
    return kw


def _engine():
    try:
        from .. import _engine  # type: ignore[attr-defined]
    except ImportError as e:  # pragma: no cover - exercised by the CLI error test
        raise NativeMissing(module="blockcrypt._engine", why=str(e)) from None
    return _engine


def settle_journal(path: str, header) -> int:
    """Write what a file's metadata journal holds into its table (FORMAT.md, "The metadata
    journal"), so that code reading or writing the table directly sees every write; the
    sectors the log held (0 for a file without a journal)."""
    lay = Layout.of(header)
    if not lay.journal_off:
        return 0
    return _engine().journal_checkpoint(path, meta_off=lay.meta_area_off, meta_bytes=lay.meta_bytes,
                                        journal_off=lay.journal_off)


class Volume:
    def __init__(self, path: str, header, layers, *, name: str | None = None, kind: str | None = None,
                 read_only: bool | None = None, cache: str = "buffered"):
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}")
        self.name = name or header.name
        self.disk_id = header.disk_id_hex
        self.path = path
        self.kind = kind or header.kind
        self.read_only = bool(header.read_only) if read_only is None else bool(read_only)
        self.sector_size = header.sector_size
        self.layout = Layout.of(header)
        self.cipher_name = layers[0][0] if layers else "none"
        self.cache = cache
        self._key_error = None
        chain = _storage_kw(path, header, self.name)
        #: the files that hold this volume's data: its own, then its chain's (nearest first)
        self.files = [path] + [low[0] for low in chain.get("lowers", ())]
        try:
            self.engine = _engine().Volume(path, size=header.size, sector_size=header.sector_size,
                                           data_off=header.data_offset, meta_off=self.layout.meta_area_off,
                                           read_only=self.read_only,
                                           layers=list(layers), cache=cache, **chain)
        except FileNotFoundError:
            raise CorruptHeader(name=self.name, why=f"disk file {path} is missing") from None
        except OSError as e:
            if e.errno == errno.EBUSY:  # the engine's writer lock (native/engine/bc_storage_local.c)
                raise Busy(f"disk {self.name!r} is open for writing by another process (a mount, another "
                           f"state directory or another host sharing {path}); close it there first") from None
            if e.errno == errno.EINVAL:
                raise CorruptHeader(name=self.name, why=f"disk file {path} is not a regular file") from None
            raise

    def switch(self, path: str) -> None:
        """Go on in another top file (a snapshot froze this one): the engine waits for the
        requests in flight, flushes, and serves from ``path`` and its chain from then on."""
        with LocalFileBacking(path, writable=False) as b:
            h = read_header(b, self.name)
        chain = _storage_kw(path, h, self.name)
        try:
            self.engine.set_storage(path, **chain)
        except OSError as e:
            self._raise(e)
        self.path = path
        self.files = [path] + [low[0] for low in chain.get("lowers", ())]

    # -- errors -----------------------------------------------------------------------
    def _raise(self, e: OSError):
        code = e.errno
        if self._key_error is not None and self.engine.gate is not None:
            raise self._key_error from None
        if code in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(name=self.name) from None
        if code == errno.EROFS:
            raise ReadOnly(kind=self.kind, name=self.name) from None
        if code == errno.EFBIG:
            raise OutOfRange(kind=self.kind, name=self.name, msg="write past the end of the disk") from None
        if code == errno.EBADMSG:
            raise IntegrityError(msg=f"disk {self.name!r}: a sector failed its tag check (tampered?)") from None
        raise e

    # -- geometry -----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.engine.size

    def header(self):
        """The disk's header as the backing holds it now."""
        with LocalFileBacking(self.path, writable=False) as b:
            return read_header(b, self.name)

    def refresh(self) -> None:
        """Re-read the header (after `disk resize` elsewhere) and take its size."""
        self.engine.resize(self.header().size)

    # -- key availability (revocation) ------------------------------------------------
    @property
    def key_error(self):
        """The KeyError_ that stopped this disk, or None while its key is available."""
        return self._key_error if self.engine.gate is not None else None

    def revoke(self, err) -> None:
        """Stop serving I/O: the engine waits for requests in flight, wipes the keys, and
        every later request fails with ``err`` (EIO through FUSE)."""
        self._key_error = err
        self.engine.revoke(getattr(err, "errno", errno.EIO) or errno.EIO, str(err))

    def restore(self, layers) -> None:
        """Serve I/O again with a fresh layer stack (the key is back: the caller unwrapped it)."""
        self.engine.set_layers(list(layers))
        self._key_error = None

    # -- I/O -------------------------------------------------------------------------
    def read(self, plain_off: int, length: int) -> bytes:
        if plain_off < 0 or length < 0:
            raise ValueError("negative offset or length")
        try:
            return self.engine.read(plain_off, length)
        except OSError as e:
            self._raise(e)

    def _check_write(self, plain_off: int, length: int) -> None:
        if self.read_only:
            raise ReadOnly(kind=self.kind, name=self.name)
        if plain_off < 0 or length < 0:
            raise ValueError("negative offset or length")
        size = self.size
        if plain_off + length > size:
            raise OutOfRange(kind=self.kind, name=self.name,
                             msg=f"write past the end of the disk ({plain_off + length} > {size} bytes)")

    def write(self, plain_off: int, data) -> int:
        n = len(data)
        self._check_write(plain_off, n)
        if n == 0:
            return 0
        try:
            return self.engine.write(plain_off, data)
        except OSError as e:
            self._raise(e)

    def discard(self, plain_off: int, length: int) -> None:
        """Punch the range: whole sectors become holes (read as zeros); partial edges are zeroed."""
        self._check_write(plain_off, length)
        if length:
            try:
                self.engine.discard(plain_off, length)
            except OSError as e:
                self._raise(e)

    def zero_range(self, plain_off: int, length: int) -> None:
        self._check_write(plain_off, length)
        if length:
            try:
                self.engine.zero_range(plain_off, length)
            except OSError as e:
                self._raise(e)

    def flush(self) -> None:
        try:
            self.engine.flush()
        except OSError as e:
            self._raise(e)

    def blocks_used(self) -> int:
        return self.engine.blocks_used()

    def stats(self) -> dict:
        return self.engine.stats()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def io_counters(vol: Volume) -> dict:
    """A volume's engine counters for `status --json` (camelCase; the latency histogram as
    counts per power-of-two microseconds, bucket i: up to 2**i us; ``integrityLastSector``:
    the last sector that failed its tag, None while none has)."""
    st = vol.stats()
    bad = st.get("integrity_errors", 0)
    return {"reads": st["reads"], "writes": st["writes"], "discards": st["discards"], "flushes": st["flushes"],
            "errors": st["errors"], "integrityErrors": bad,
            "integrityLastSector": st.get("integrity_last_sector") if bad else None,
            "bytesRead": st["bytes_read"], "bytesWritten": st["bytes_written"],
            "latencyUsLog2": list(st["lat_us_hist"])}
