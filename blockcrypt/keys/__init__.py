"""Key-encryption-key providers behind one interface (base.py) and a registry.

Caveat: see base.py for the contract every provider meets.
"""
from .base import KekProvider, KeyStatus, WrappedKey  # noqa: F401
