"""Backing stores behind one protocol (base.py), chosen by the scheme of a location.

A location is a plain path (the local sparse file) or ``SCHEME://...``; SCHEMES
maps each scheme to its class, so a distributed store (``rbd://pool/image``,
over librbd) is one module and one line here.

Caveat: only the local file exists today.
"""
from __future__ import annotations

from .base import Backing  # noqa: F401
from .local import LocalFileBacking, is_enospc  # noqa: F401

SCHEMES = {"file": LocalFileBacking}


def open_backing(location: str, writable: bool = True, **kw) -> Backing:
    scheme, sep, rest = str(location).partition("://")
    if not sep:
        scheme, rest = "file", str(location)
    cls = SCHEMES.get(scheme)
    if cls is None:
        raise ValueError(f"unknown backing store scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    return cls(rest, writable, **kw)
