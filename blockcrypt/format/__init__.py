"""On-disk format: the header (header.py: pure pack/parse), its copies over a
backing (headerio.py), every offset translation (layout.py) and layer roles
with the DEK binding (roles.py).

Caveat: nothing here imports FUSE, the CLI, SQLite or any key provider.
"""
from .header import FORMAT_VERSION, Header, Layer  # noqa: F401
from .headerio import header_copy_state, read_header, write_header, write_headers  # noqa: F401
from .layout import DATA_OFFSET, Layout, sector_span  # noqa: F401
from .roles import ROLE_DATA, ROLE_INFRA, ROLE_NAMES, binding_context, binding_digest  # noqa: F401
