"""An open disk's data path: any-range I/O over a backing store and a sector layer.

- ``volume``     the Volume: sector spans, read-modify-write, discard, flush, revoke/restore
- ``rangelock``  locks over sector ranges
- ``gate``       what serves while a key is revoked

Caveat: the data plane: it imports format/, crypto/ and storage/ only, never the
catalog, the key providers or a front end (the layering test says so).
"""
from .rangelock import RangeLock  # noqa: F401
from .volume import Volume  # noqa: F401
