"""One error hierarchy for blockcrypt.

Every error a user can meet derives from :class:`BlockcryptError`. The class
docstring is the message template (formatted with the keyword arguments given
at raise time), ``exit_code`` is what the CLI exits with, and ``errno`` is what
the FUSE boundary answers. Programmer errors (bad lengths, misuse of an API)
raise ``ValueError``/``TypeError`` at once and are not part of this tree.

Caveat: messages are built from names, ids and paths only; never pass key
bytes (or anything derived from them) as a format argument.
"""
from __future__ import annotations

import errno as _errno


class BlockcryptError(Exception):
    """{msg}"""

    exit_code = 1
    errno = _errno.EIO

    def __init__(self, msg: str | None = None, **kw):
        self.kw = dict(kw)
        if msg is not None:
            self.kw.setdefault("msg", msg)
        try:
            text = (self.__doc__ or "{msg}").strip().format(**self.kw)
        except (KeyError, IndexError):
            text = self.kw.get("msg") or self.__class__.__name__
        super().__init__(text)

    @property
    def message(self) -> str:
        return str(self)


# --- usage / input -----------------------------------------------------------

class UsageError(BlockcryptError):
    """{msg}"""

    exit_code = 2
    errno = _errno.EINVAL


class BadSize(UsageError):
    """invalid size {value!r}: {why} (use a number with K, M, G or T, e.g. 10G)"""


class NotFound(BlockcryptError):
    """{kind} {name!r} not found"""

    exit_code = 3
    errno = _errno.ENOENT


class AlreadyExists(BlockcryptError):
    """{kind} {name!r} already exists"""

    exit_code = 4
    errno = _errno.EEXIST


class Refused(BlockcryptError):
    """{msg}"""

    exit_code = 5
    errno = _errno.EPERM


class ReadOnly(BlockcryptError):
    """{kind} {name!r} is read-only"""

    exit_code = 5
    errno = _errno.EROFS


class Busy(BlockcryptError):
    """{msg}"""

    exit_code = 6
    errno = _errno.EBUSY


# extended attributes of disk files (issue 16: libvirt's DAC driver keeps owners in them)

class XattrUnsupported(UsageError):
    """extended attribute {name!r}: only the user. and trusted. namespaces are kept on disk files"""

    errno = _errno.EOPNOTSUPP


class XattrMissing(NotFound):
    """{kind} has no extended attribute {xname!r}"""

    errno = _errno.ENODATA


class XattrExists(AlreadyExists):
    """{kind} already has an extended attribute {xname!r}"""


class XattrTooLarge(UsageError):
    """extended attribute {name!r} does not fit: {limit}"""

    errno = _errno.ENOSPC


class ConfirmationNeeded(UsageError):
    """refusing to {action} unasked: there is no terminal to ask on; pass --yes to confirm"""


# --- environment ---------------------------------------------------------------

class StateError(BlockcryptError):
    """state directory {path}: {why}"""

    exit_code = 10


class MountError(BlockcryptError):
    """{msg}"""

    exit_code = 13


class NativeMissing(BlockcryptError):
    """the native extension {module} is not built ({why}); build it with `make build` (or `pip install -e .`)"""

    exit_code = 11


class OutOfRange(BlockcryptError):
    """{kind} {name!r}: {msg}"""

    exit_code = 2
    errno = _errno.EFBIG


class NoSpace(BlockcryptError):
    """no space left on the backing file system for {name!r}"""

    exit_code = 12
    errno = _errno.ENOSPC


class VaultDirError(StateError):
    """vault directory {path}: {why} (--dir or $BLOCKCRYPT_VAULT_DIR names the vault's directory; the default is the state directory's path + '-vault')"""


# --- data ----------------------------------------------------------------------

class CorruptHeader(BlockcryptError):
    """disk {name!r} is corrupt: {why}"""

    exit_code = 20
    errno = _errno.EIO


class UnsupportedFormat(BlockcryptError):
    """disk {name!r} uses an unsupported format: {why}"""

    exit_code = 21
    errno = _errno.EIO


class IntegrityError(BlockcryptError):
    """integrity check failed: {msg}"""

    exit_code = 22
    errno = _errno.EIO


# --- keys ------------------------------------------------------------------------

class KeyError_(BlockcryptError):
    """key {key_id}: {msg}"""

    exit_code = 30
    errno = _errno.EIO
    #: True when the data plane may retry and keep serving from a cached DEK.
    transient = False
    #: the Azure-like reason string shown in `status`
    reason = "KeyUnavailable"


class KeyUnavailable(KeyError_):
    """key {key_id} is unreachable: {msg} (will retry)"""

    transient = True
    reason = "KeyProviderUnavailable"


class KeyAccessDenied(KeyError_):
    """access to key {key_id} denied: {msg}"""

    exit_code = 31
    reason = "KeyAccessDenied"


class KeyDisabled(KeyError_):
    """key {key_id} is disabled"""

    exit_code = 32
    reason = "KeyDisabled"


class KeyExpired(KeyError_):
    """key {key_id} is expired or not yet valid"""

    exit_code = 33
    reason = "KeyExpired"


class KeyDeleted(KeyError_):
    """key {key_id} is deleted (recoverable until {recoverable_until})"""

    exit_code = 34
    reason = "KeyDeleted"


class KeyPurged(KeyError_):
    """key {key_id} is purged: data under it cannot be recovered"""

    exit_code = 35
    reason = "KeyPurged"


class KeyIntegrityError(KeyError_):
    """key {key_id}: wrapped key failed its integrity check ({msg})"""

    exit_code = 36
    reason = "KeyIntegrityFailure"


class KeyStoreError(KeyError_):
    """platform key store {path}: {why}"""

    exit_code = 37

    def __init__(self, msg=None, **kw):
        kw.setdefault("key_id", "platform")
        super().__init__(msg, **kw)


class KeyNotFound(KeyError_):
    """key {key_id} was not found in its vault: check the key name and the vault URL (`blockcrypt vault key list` lists the keys, `vault key list --deleted` the soft-deleted ones)"""

    exit_code = 38
    reason = "KeyNotFound"


# backing up and moving platform keys (issue 16)

class KeyNotInStore(KeyError_):
    """platform key {version} is not in this key store; import it with `blockcrypt platform-key import`"""

    exit_code = 46
    reason = "KeyNotFound"

    def __init__(self, msg=None, **kw):
        kw.setdefault("key_id", f"platform/{kw.get('version')}")
        super().__init__(msg, **kw)


class KeyBackupError(KeyError_):
    """cannot read the platform-key backup: {why}"""

    exit_code = 47

    def __init__(self, msg=None, **kw):
        kw.setdefault("key_id", "platform")
        super().__init__(msg, **kw)


class PlatformKeyConflict(KeyError_):
    """platform key {version} of the backup differs from this store's platform key {version}; nothing was imported{hint}"""

    exit_code = 39
    reason = "KeyConflict"

    def __init__(self, msg=None, **kw):
        kw.setdefault("key_id", f"platform/{kw.get('version')}")
        kw.setdefault("hint", "")
        super().__init__(msg, **kw)


# --- the key vault -------------------------------------------------------------------

class VaultRequestError(BlockcryptError):
    """{msg}"""

    exit_code = 40

    def __init__(self, msg: str, *, status: int = 0, code: str = "", inner: str | None = None):
        super().__init__(msg)
        self.status, self.code, self.inner = status, code, inner


class VaultApiError(BlockcryptError):
    """{msg}"""

    exit_code = 41

    def __init__(self, status: int, code: str, msg: str, inner: str | None = None):
        super().__init__(msg)
        self.status = status
        self.code = code
        self.inner = inner

    def body(self) -> dict:
        """The Azure-shaped error body the vault service answers with."""
        err = {"code": self.code, "message": str(self)}
        if self.inner:
            err["innererror"] = {"code": self.inner}
        return {"error": err}


class TokenInvalid(BlockcryptError):
    """{msg}"""

    exit_code = 42


class AuditBroken(BlockcryptError):
    """audit log BROKEN at record {seq}: {why}"""

    exit_code = 22


# --- what `blockcrypt status` exits with (issue 16; for monitoring scripts) ---------------
# `status` prints the whole picture first, then the worst finding as one error line.

class StatusFinding(BlockcryptError):
    """{msg}"""

    def __init__(self, found: list[str]):
        """``found``: one line a finding of this kind (what and where), the first one shown."""
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        super().__init__(finding=found[0], more=more)


class StatusMountDead(StatusFinding):
    """{finding}{more}; clean up with `blockcrypt umount MOUNTPOINT` and mount again"""

    exit_code = 50


class StatusDiskStopped(StatusFinding):
    """{finding}{more}; see its keyError and the mount log"""

    exit_code = 51


class StatusDiskCorrupt(StatusFinding):
    """{finding}{more}; run `blockcrypt disk verify NAME`"""

    exit_code = 52


class StatusServingOnGrace(StatusFinding):
    """{finding}{more}; bring the key vault back before the grace period ends"""

    exit_code = 53


class VaultNotFound(VaultRequestError):
    """{msg}"""

    exit_code = 43


class VaultForbidden(VaultRequestError):
    """{msg}"""

    exit_code = 44


class VaultAudienceMismatch(KeyAccessDenied):
    """vault {url} issues tokens for {audience}, not for {url}: use {audience} in the key URL and --url (localhost and 127.0.0.1 are different token audiences; the vault's own URL is in its serve.json)"""

    exit_code = 45
    reason = "VaultAudienceMismatch"


#: exit codes that are not an error class here: what the CLI's documentation table lists
#: beside the classes (docs/CLI.md; tests/cli/test_contract.py checks both)
OTHER_EXIT_CODES = {
    0: "success",
    1: "a failure outside this hierarchy, e.g. a file the system refused (code `OSError`); the message says what",
    2: "bad usage: an unknown command or option, a missing or invalid argument (code `UsageError`, as the class)",
    130: "interrupted by Ctrl-C (code `Interrupted`) or answered no at a confirmation (code `Aborted`)",
}
