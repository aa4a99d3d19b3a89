/*
 * py_engine.h — the seam between the two halves of the CPython module blockcrypt._engine:
 * py_engine.c (module init, the Volume type over bc_volume) and py_session.c (the
 * Session type over bc_session).
 *
 * Python API (validation of names, sizes and keys lives in Python; errors from the
 * engine arrive as OSError(errno, strerror) and the caller maps them to domain errors):
 *
 *   Volume(path, *, size, sector_size, data_off=1048576, meta_off=0, read_only=False,
 *          layers=[("aes-xts-plain64", key64)], cache="buffered"|"none",
 *          lowers=None, map_chunks=0, map_off=0, chunk_bytes=65536)
 *     lowers: the overlay chain below path, nearest first, as (path, map_chunks) pairs
 *     (bc_storage_cow.c); map_chunks is path's own bitmap length; None: a plain file.
 *     layers, outermost first: ("aes-xts-plain64", key64), ("aes-xts-plain64", None) (an
 *     ephemeral random key drawn inside the engine, never visible), ("null", b""), or
 *     ("xchacha20-poly1305", key32, disk_id16): the infrastructure layer (role 2 in its
 *     associated data), innermost only, BC_AEAD_META_BYTES = 96 bytes of metadata per
 *     sector at meta_off (docs/FORMAT.md); a sector whose tag fails reads as
 *     OSError(EBADMSG)
 *     .read(off, length) -> bytes        .readinto(off, buffer) -> int
 *     .write(off, data) -> int           .discard(off, length)   .zero_range(off, length)
 *     .flush()   .resize(size)   .blocks_used() -> int   .stats() -> dict
 *     .revoke(errno, reason)   .gate -> None | (errno, reason)   .set_layers(layers)
 *     .set_storage(path, *, lowers=None, map_chunks=0, map_off=0, chunk_bytes=65536)
 *         serve from another file or chain (a snapshot froze the old one): flushes first
 *     .size  .sector_size  .read_only   .close()   (context manager too)
 *     Every I/O call releases the GIL for the whole engine call.
 *
 *   Session(mountpoint, *, statfs_path, allow_other=False, max_threads=0,
 *           open_disk=callable(name) -> Volume, closed=callable(name),
 *           lookup_miss=callable(name))
 *     .set_disk(name, size, mode, uid, gid, read_only, backing_path)
 *     .remove_disk(name)   .disk_state(name) -> dict(handles, errors, lastErrno)
 *     .loop()  (blocks with the GIL released until unmounted or .exit())
 *     .exit()  .close()
 *     The hooks run with the GIL taken in the calling libfuse thread (open and
 *     lookup only, never a data request); an exception with an int .errno answers
 *     that errno, any other exception EIO.
 */
#ifndef BC_PY_ENGINE_H
#define BC_PY_ENGINE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "engine/bc_engine.h"

/* The engine volume inside a blockcrypt._engine.Volume (borrowed: the caller
 * bc_volume_ref()s it to keep it), or NULL with TypeError/ValueError set. */
struct bc_volume *bc_py_volume_get(PyObject *obj);

/* Add the Session type to the module; 0 or -1 with an exception set. */
int bc_py_session_register(PyObject *module);

#endif
