"""An open disk's data path: the binding over the C volume engine (native/engine).

- ``volume``  the Volume: any-range I/O, discard, flush, revoke/restore, counters;
              the engine does range locks, read-modify-write and the revocation gate
- ``temp``    TempVolume: a mount's temp disk, headerless sectors, plain or under an
              ephemeral key the engine draws itself

Caveat: the data plane: it imports format/, crypto/ and storage/ only, never the
catalog, the key providers or a front end (the layering test says so).
"""
from .temp import TempVolume  # noqa: F401
from .volume import Volume, io_counters  # noqa: F401
