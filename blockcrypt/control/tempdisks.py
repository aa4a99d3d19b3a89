"""Temp disks: the host-local scratch disks a mount offers (``mount --temp-disk NAME:SIZE``,
or the catalog setting ``temp_disks``), as the seeds' temporary disk of a VM.

A temp disk is not a catalog disk: it has no header, no DEK and no name in the catalog;
it lives only while its mount lives, as a sparse file in the mount's temp directory
(``--temp-dir``, the setting ``temp_dir``, default ``STATE/temp``). Without encryption at
host its sectors are stored as they are (plain), as the seeds say of a temporary disk
without end-to-end encryption; with it (``mount --encryption-at-host``, the setting
``encryption_at_host``) they are AES-256-XTS under an ephemeral key that exists only in
the mount daemon's engine. The serving side is blockcrypt/mount/temp_source.py.

This module only parses and checks what the user wrote: ``NAME:SIZE`` specs (a list in
the setting, separated by commas), the on/off value, the directory.

Caveat: the settings are read when a mount starts, never by a running mount: changing
them takes a remount (as a VM is deallocated and reallocated to change encryption at host).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .._util.units import format_size, parse_size
from ..catalog import check_name
from ..errors import BadSize, UsageError

#: temp disks are served with this sector size (the engine's default)
TEMP_SECTOR_SIZE = 4096
TRUE_WORDS = ("true", "on", "yes", "1")
FALSE_WORDS = ("false", "off", "no", "0", "")


@dataclass(frozen=True)
class TempDiskSpec:
    name: str
    size: int      # bytes, a multiple of TEMP_SECTOR_SIZE

    def __str__(self) -> str:
        return f"{self.name}:{format_size(self.size)}"


def parse_spec(text: str) -> TempDiskSpec:
    """``NAME:SIZE`` (``scratch:10G``) -> a TempDiskSpec, or a one-line UsageError/BadSize."""
    name, sep, size_text = str(text).strip().partition(":")
    if not sep or not name or not size_text:
        raise UsageError(f"invalid temp disk {text!r}: use NAME:SIZE, e.g. scratch:10G")
    check_name("temp disk", name)
    size = parse_size(size_text)
    if size % TEMP_SECTOR_SIZE:
        raise BadSize(value=size_text, why=f"a temp disk is a whole number of {TEMP_SECTOR_SIZE}-byte sectors")
    return TempDiskSpec(name, size)


def parse_specs(texts) -> list[TempDiskSpec]:
    """Several specs (an iterable, or the setting's comma-separated text); names must differ."""
    if isinstance(texts, str):
        texts = [t for t in texts.split(",") if t.strip()]
    specs = [parse_spec(t) for t in texts]
    seen = set()
    for s in specs:
        if s.name in seen:
            raise UsageError(f"temp disk {s.name!r} is given twice")
        seen.add(s.name)
    return specs


def parse_on_off(text) -> bool:
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in TRUE_WORDS:
        return True
    if t in FALSE_WORDS:
        return False
    raise ValueError(text)


def check_temp_dir(text: str) -> str:
    """An absolute path (the daemon runs in /), or "" for the default STATE/temp."""
    t = str(text).strip()
    if t and not os.path.isabs(t):
        raise ValueError(text)
    return t
