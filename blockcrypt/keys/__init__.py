"""Key-encryption-key providers behind one interface (base.py), a static registry
(registry.py), the built-ins (providers/) and DEK envelopes (envelope.py: new DEKs,
and wrap/unwrap/rewrap of a disk header's layer).

Caveat: see base.py for the contract every provider meets.
"""
from .base import KekProvider, KeyStatus, WrappedKey  # noqa: F401
