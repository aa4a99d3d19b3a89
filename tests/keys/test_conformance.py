"""The KEK provider contract (keys/base.py), run over every provider against its real key store.

Each case takes a ``harness`` (tests/keys/conftest.py): the provider, a key to wrap under and
the operator actions (rotate, stop the server, remove access, disable, delete). Cases:
round trip; another disk's (or role's) context -> integrity error; versioned KEK ids; rewrap
to a new version; status; the typed errors for unavailable vs denied vs disabled vs deleted;
no key byte in any message or log."""
from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import pytest

from blockcrypt.errors import (KeyAccessDenied, KeyDisabled, KeyError_, KeyIntegrityError,
                               KeyUnavailable)
from blockcrypt.format import ROLE_DATA, binding_context
from blockcrypt.keys.envelope import new_dek

DISK_A = bytes(range(16))
DISK_B = bytes(range(1, 17))


def ctx(disk=DISK_A, role=ROLE_DATA) -> bytes:
    return binding_context(disk, role)


def secret_forms(secret: bytes) -> list[bytes]:
    """The ways a key could leak into text: raw, hex (both cases), base64 (std and url-safe)."""
    forms = [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret),
             base64.urlsafe_b64encode(secret).rstrip(b"=")]
    # any 16-byte window of the key, as hex: a partial leak is a leak
    forms += [secret[i:i + 16].hex().encode() for i in range(0, len(secret) - 15, 16)]
    return forms


def assert_no_secret(text: bytes | str, secret: bytes, where: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    for f in secret_forms(secret):
        assert f not in data, f"key bytes found in {where}"


def read_logs(paths) -> bytes:
    out = b""
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else (sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [])
        for f in files:
            out += f.read_bytes()
    return out


def test_round_trip(harness):
    dek = new_dek()
    w = harness.prov.wrap(harness.ref, dek, ctx(), disk_id=DISK_A.hex())
    assert w.provider == harness.prov.NAME and w.kek_id and w.algorithm
    assert dek not in w.blob and dek[:32] not in w.blob and dek[32:] not in w.blob
    assert harness.prov.unwrap(w, ctx(), disk_id=DISK_A.hex()) == dek
    # two wraps of the same DEK differ (randomised wrap), and both unwrap
    w2 = harness.prov.wrap(harness.ref, dek, ctx())
    assert w2.blob != w.blob and harness.prov.unwrap(w2, ctx()) == dek


@pytest.mark.parametrize("other", ["disk", "role"])
def test_other_context_is_an_integrity_error(harness, other):
    dek = new_dek()
    w = harness.prov.wrap(harness.ref, dek, ctx())
    wrong = ctx(DISK_B) if other == "disk" else ctx(role=ROLE_DATA + 1)
    with pytest.raises(KeyIntegrityError) as ei:
        harness.prov.unwrap(w, wrong)
    assert not ei.value.transient
    assert_no_secret(str(ei.value), dek, "the integrity error")


def test_tampered_blob_is_an_integrity_error(harness):
    w = harness.prov.wrap(harness.ref, new_dek(), ctx())
    blob = bytearray(w.blob)
    blob[len(blob) // 2] ^= 0x40
    with pytest.raises(KeyIntegrityError):
        harness.prov.unwrap(type(w)(w.provider, w.kek_id, w.algorithm, bytes(blob)), ctx())


def test_versioned_kek_ids(harness):
    dek = new_dek()
    w1 = harness.prov.wrap(harness.ref, dek, ctx())
    new_ref = harness.rotate()
    w2 = harness.prov.wrap(new_ref, dek, ctx())
    assert w1.kek_id != w2.kek_id, "a new key version must give a new versioned KEK id"
    # wrapping under the unversioned reference now lands on the new version (or stays pinned,
    # for references that name a version): either way the id is versioned and stable
    w3 = harness.prov.wrap(harness.ref, dek, ctx())
    assert w3.kek_id in (w1.kek_id, w2.kek_id)
    # the old version still unwraps what it wrapped
    assert harness.prov.unwrap(w1, ctx()) == dek
    assert harness.prov.unwrap(w2, ctx()) == dek


def test_rewrap_to_a_new_version(harness):
    dek = new_dek()
    w1 = harness.prov.wrap(harness.ref, dek, ctx())
    new_ref = harness.rotate()
    w2 = harness.prov.rewrap(w1, ctx(), new_ref, disk_id=DISK_A.hex())
    assert w2.kek_id != w1.kek_id and w2.provider == w1.provider
    assert harness.prov.unwrap(w2, ctx()) == dek
    # the re-wrapped key is still bound to its disk
    with pytest.raises(KeyIntegrityError):
        harness.prov.unwrap(w2, ctx(DISK_B))


def test_status(harness):
    w = harness.prov.wrap(harness.ref, new_dek(), ctx())
    s = harness.prov.status(w.kek_id)
    assert s.usable and s.reason == "Enabled"
    assert s.kek_id == w.kek_id


def test_unavailable_is_transient(harness):
    dek = new_dek()
    w = harness.prov.wrap(harness.ref, dek, ctx())
    harness.stop()
    try:
        with pytest.raises(KeyUnavailable) as ei:
            harness.prov.unwrap(w, ctx())
        assert ei.value.transient
        s = harness.prov.status(w.kek_id)
        assert not s.usable and s.reason == "KeyProviderUnavailable"
    finally:
        harness.start()
    assert harness.prov.unwrap(w, ctx()) == dek


def test_access_denied(harness):
    dek = new_dek()
    w = harness.prov.wrap(harness.ref, dek, ctx())
    harness.deny()
    try:
        with pytest.raises(KeyAccessDenied) as ei:
            harness.prov.unwrap(w, ctx())
        assert not ei.value.transient
    finally:
        harness.allow()
    assert harness.prov.unwrap(w, ctx()) == dek


def test_disabled(harness):
    dek = new_dek()
    w = harness.prov.wrap(harness.ref, dek, ctx())
    harness.disable()
    try:
        with pytest.raises(KeyDisabled):
            harness.prov.unwrap(w, ctx())
        s = harness.prov.status(w.kek_id)
        assert not s.usable and s.reason == "KeyDisabled"
    finally:
        harness.enable()
    assert harness.prov.unwrap(w, ctx()) == dek


def test_deleted(harness):
    w = harness.prov.wrap(harness.ref, new_dek(), ctx())
    expected = harness.delete()
    with pytest.raises(expected) as ei:
        harness.prov.unwrap(w, ctx())
    assert not ei.value.transient
    s = harness.prov.status(w.kek_id)
    assert not s.usable and s.reason == expected.reason


def test_no_key_byte_in_any_message_or_log(harness, caplog):
    caplog.set_level(logging.DEBUG)
    dek = new_dek()
    messages = []
    w = harness.prov.wrap(harness.ref, dek, ctx(), disk_id=DISK_A.hex())
    harness.prov.unwrap(w, ctx(), disk_id=DISK_A.hex())
    messages.append(repr(w))
    for bad in (ctx(DISK_B), ctx(role=ROLE_DATA + 1)):
        try:
            harness.prov.unwrap(w, bad)
        except KeyError_ as e:
            messages += [str(e), repr(e), repr(e.kw)]
    messages.append(repr(harness.prov.status(w.kek_id)))
    text = "\n".join(messages) + "\n" + caplog.text
    assert_no_secret(text, dek, "an error message or log record")
    assert_no_secret(read_logs(harness.log_files), dek, "a log file")
    # a wrapped key's repr must not show the DEK either (it shows the blob, which is ciphertext)
    for secret in getattr(harness, "kek_secrets", lambda: [])():
        assert_no_secret(text, secret, "an error message or log record (KEK)")
        assert_no_secret(read_logs(harness.log_files), secret, "a log file (KEK)")
