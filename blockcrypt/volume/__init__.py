"""An open disk's data path: the binding over the C volume engine (native/engine).

- ``volume``  the Volume: any-range I/O, discard, flush, revoke/restore, counters;
              the engine does range locks, read-modify-write and the revocation gate

Caveat: the data plane: it imports format/, crypto/ and storage/ only, never the
catalog, the key providers or a front end (the layering test says so).
"""
from .volume import Volume, io_counters  # noqa: F401
