"""systemd's readiness protocol (sd_notify) without libsystemd: one AF_UNIX datagram of
``KEY=VALUE`` lines to the socket named by ``$NOTIFY_SOCKET``.

``notify("READY=1")`` when a service serves, ``notify("STOPPING=1")`` when it starts to
shut down, ``notify("STATUS=...")`` for a line ``systemctl status`` shows. A name that
starts with ``@`` is an abstract socket (a NUL byte in its place), as systemd documents.

Caveats: without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=`` is not ``notify``)
every call does nothing and returns False; a send that fails is reported by the return
value, never raised: readiness must not take a service down.
"""
from __future__ import annotations

import os
import socket


def _address() -> str | bytes | None:
    name = os.environ.get("NOTIFY_SOCKET")
    if not name:
        return None
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None  # vsock and other schemes are not for a host daemon


def notify(*lines: str) -> bool:
    """Send ``lines`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``) in one datagram."""
    addr = _address()
    if addr is None or not lines:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), addr)
        return True
    except OSError:
        return False


def under_journal() -> bool:
    """Whether stderr is connected to the systemd journal (``$JOURNAL_STREAM`` names the
    device and inode of stderr, so a redirected stderr does not count)."""
    js = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = js.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)
