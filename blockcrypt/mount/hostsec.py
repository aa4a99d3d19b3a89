"""Host hardening of the mount daemon: nothing of a disk's plaintext or keys may reach the
host's media through a core dump, and no other process of the same user may read the
daemon's memory.

``harden()`` runs first thing in the daemon (both front ends): RLIMIT_CORE 0 (soft and
hard, so nothing in the process can raise it again) and ``prctl(PR_SET_DUMPABLE, 0)``
(the kernel then writes no core even through a ``core_pattern`` pipe, which ignores
RLIMIT_CORE, and refuses ptrace attach and /proc/PID/mem to any process without
CAP_SYS_PTRACE, even one of the same user). It returns what it achieved, for the log and the status file.

Key and plaintext memory is the engine's business: the XTS key lives in an mlock'ed,
MADV_DONTDUMP page, the AEAD key in sodium_malloc'd memory, the per-thread plaintext
scratch is mlock'ed; all are wiped on close and revocation (docs/KEYS.md).

Caveats: Linux does not show the dumpable flag in /proc/PID/status; /proc/PID/limits
shows the core limit, and the kernel's refusal of /proc/PID/mem to a process without
CAP_SYS_PTRACE shows the flag (tests/fuse/test_host_hardening.py does both). Best effort
where the kernel says no (a seccomp profile refusing prctl): the
result says so and the daemon logs it; a child the daemon runs (the on_revoke hook)
execs and gets the kernel's defaults back, which is fine: it holds no key.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource

log = logging.getLogger("blockcrypt.mount")

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def harden() -> dict:
    """Core dumps off and the process non-dumpable. Returns {"dumpable": bool, "coreLimit": int}."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as e:
        log.warning("cannot set RLIMIT_CORE to 0: %s", e)
    libc = _libc()
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed: %s", ctypes.get_errno())
    return {"dumpable": bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)),
            "coreLimit": resource.getrlimit(resource.RLIMIT_CORE)[0]}

