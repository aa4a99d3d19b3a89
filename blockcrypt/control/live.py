"""Talking to the live mount of a state directory: move an open disk to its new top file.

A snapshot freezes the file a disk is served from; a daemon that has the disk open
must stop writing that file before the snapshot is handed out. The daemon
(mount/switch.py) listens on an abstract UNIX socket named after the state
directory (one live mount per state directory, so one listener) and answers one
JSON line per request:

    {"op": "sync", "name": NAME}   -> {"ok": true, "open": bool, "switched": bool}
    {"op": "open", "name": NAME}   -> {"ok": true, "open": bool}

``sync``: if the disk is open and the catalog names another top file for it, the
daemon switches the open volume to it (the engine waits for requests in flight and
flushes first) before answering.

Caveat: no listener (no live mount, or a killed one) means nothing is open; the
daemon also re-checks its open disks against the catalog every second, so a
command that died between its catalog commit and its request is caught up.
"""
from __future__ import annotations

import hashlib
import json
import socket

from ..errors import Busy

TIMEOUT_S = 30.0


def address(state_path) -> bytes:
    digest = hashlib.sha256(str(state_path).encode()).hexdigest()[:32]
    return b"\0blockcrypt-live-" + digest.encode()


def _ask(st, req: dict) -> dict | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(TIMEOUT_S)
    try:
        try:
            s.connect(address(st.path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # no live mount
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            part = s.recv(65536)
            if not part:
                break
            buf += part
    except OSError as e:
        raise Busy(f"the live mount did not answer ({e}); retry, or unmount it") from None
    finally:
        s.close()
    try:
        ans = json.loads(buf or b"{}")
    except ValueError:
        ans = {}
    if not ans.get("ok"):
        raise Busy(f"the live mount could not move disk {req.get('name')!r} to its new file: "
                   f"{ans.get('error', 'no answer')}")
    return ans


def request(st, name: str) -> bool:
    """Have the live mount (if any) serve disk ``name`` from its catalog top file now.
    True if it had the disk open."""
    ans = _ask(st, {"op": "sync", "name": name})
    return bool(ans and ans.get("open"))


def is_open(st, name: str) -> bool:
    ans = _ask(st, {"op": "open", "name": name})
    return bool(ans and ans.get("open"))
