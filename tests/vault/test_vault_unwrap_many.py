"""Issue 14: the vault's batch unwrap (``POST /keys/NAME/VERSION/unwrapkeys``, keyops.unwrap_many)
against a real `vault serve` over HTTPS: the right keys under concurrency, one audit record per
unwrap (with its disk id, durable before the answer, also across a SIGKILL), the chain verifies;
a refused key refuses the whole request with the error a single unwrap gets (also once the
server holds the loaded key); a value that does not decrypt fails alone; bad bodies are a 400."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from blockcrypt.errors import (BlockcryptError, KeyAccessDenied, KeyDeleted, KeyDisabled, KeyIntegrityError,
                               KeyUnavailable)
from blockcrypt.vault.client import BatchUnsupported, VaultClient
from vault_helpers import VaultProcess, admin_token, identity_token, kill9_under_load, make_vault, raw, vault_cli


def _records(d, key=None) -> list[dict]:
    args = ("--key", key) if key else ()
    return [json.loads(x) for x in vault_cli("audit", "--dir", d, *args, "--json").stdout.splitlines()]


def _wrapped(c, key: str, n: int) -> tuple[str, list[bytes], list[bytes]]:
    plains = [os.urandom(96) for _ in range(n)]
    blobs = [c.wrap(key, None, p)[1] for p in plains]
    return c.get_key(key)["key"]["kid"].rsplit("/", 1)[1], plains, blobs


@pytest.fixture
def served(tmp_path):
    d = make_vault(tmp_path / "v", "--retention-days", "7", "--purge-protection")
    v = VaultProcess(d).start()
    yield v
    v.stop()


def test_concurrent_batches_give_the_right_keys_and_one_record_per_unwrap(served):
    c = VaultClient.for_admin(served.dir, timeout_seconds=30)
    c.create_key("k")
    ver, plains, blobs = _wrapped(c, "k", 40)
    errors, got = [], {}

    def worker(t):
        try:
            for rnd in range(3):   # each thread: 3 requests of 40 unwraps, its own disk ids
                ids = [f"t{t}-r{rnd}-d{i}" for i in range(40)]
                out = c.unwrap_many("k", ver, list(zip(blobs, ids)))
                got.update(zip(ids, out))
        except Exception as e:   # reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert len(got) == 600
    for ident, plain in got.items():
        assert plain == plains[int(ident.rsplit("-d", 1)[1])]
    served.stop()   # then read the store: the records were durable before the answers
    res = json.loads(vault_cli("audit", "verify", "--dir", served.dir, "--json").stdout)
    assert res["ok"], res
    recs = _records(served.dir)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    batch = [r for r in recs if r.get("operation") == "KeyUnwrap" and r["path"].endswith("/unwrapkeys")]
    assert sorted(r["diskId"] for r in batch) == sorted(got)      # one record per unwrap, none twice
    assert all(r["status"] == 200 and r["version"] == ver and r["batch"] == 40 and r["identity"] == "admin"
               for r in batch)


def test_a_value_that_does_not_decrypt_fails_alone(served):
    c = VaultClient.for_admin(served.dir)
    c.create_key("k")
    ver, plains, blobs = _wrapped(c, "k", 3)
    tampered = bytes([blobs[1][0] ^ 1]) + blobs[1][1:]
    out = c.unwrap_many("k", ver, [(blobs[0], "a"), (tampered, "b"), (blobs[2], "c"), (b"short", "d")])
    assert out[0] == plains[0] and out[2] == plains[2]
    assert isinstance(out[1], KeyIntegrityError) and isinstance(out[3], KeyIntegrityError)
    with pytest.raises(KeyIntegrityError):   # what a single unwrap of it says
        c.unwrap("k", ver, tampered)
    recs = {r["diskId"]: r for r in _records(served.dir, "k") if r["path"].endswith("/unwrapkeys")}
    assert {d: recs[d]["status"] for d in "abcd"} == {"a": 200, "b": 400, "c": 200, "d": 400}
    assert recs["b"]["result"] == "BadParameter"


def test_a_refused_key_refuses_the_batch_as_a_single_unwrap(served):
    c = VaultClient.for_admin(served.dir)
    c.create_key("k")
    ver, plains, blobs = _wrapped(c, "k", 2)
    items = [(b, f"d{i}") for i, b in enumerate(blobs)]
    assert c.unwrap_many("k", ver, items) == plains   # the server now holds the loaded key
    c.update_key("k", ver, enabled=False)
    for call in (lambda: c.unwrap_many("k", ver, items), lambda: c.unwrap("k", ver, blobs[0])):
        with pytest.raises(KeyDisabled):
            call()
    c.update_key("k", ver, enabled=True)
    assert c.unwrap_many("k", ver, items) == plains

    ident = json.loads(vault_cli("identity", "create", "wrapper", "--dir", served.dir, "--json").stdout)
    vault_cli("policy", "set", "--dir", served.dir, "--identity", "wrapper", "--permissions", "get,wrapKey")
    other = VaultClient(served.url, tenant_id=c.tenant_id, client_id=ident["clientId"],
                        client_secret=ident["clientSecret"], ca_file=str(served.dir / "ca.pem"))
    for call in (lambda: other.unwrap_many("k", ver, items), lambda: other.unwrap("k", ver, blobs[0])):
        with pytest.raises(KeyAccessDenied):
            call()

    c.delete_key("k")
    for call in (lambda: c.unwrap_many("k", ver, items), lambda: c.unwrap("k", ver, blobs[0])):
        with pytest.raises(KeyDeleted):
            call()
    refused = [r for r in _records(served.dir, "k") if r["path"].endswith("/unwrapkeys") and r["status"] != 200]
    assert [(r["status"], r["result"]) for r in refused] == [(403, "KeyDisabled"), (403, "AccessDenied"),
                                                             (404, "KeyNotFound")]


def test_bad_bodies_are_a_400_and_the_client_falls_back(served):
    c = VaultClient.for_admin(served.dir)
    c.create_key("k")
    ver, _, blobs = _wrapped(c, "k", 1)
    tok = admin_token(served)
    path = f"/keys/k/{ver}/unwrapkeys?api-version=7.5"
    value = blobs[0].hex()   # any string: the body is refused before the values are read
    for body in ({"alg": "RSA-OAEP-256"}, {"alg": "RSA-OAEP-256", "items": []},
                 {"alg": "RSA-OAEP-256", "items": [{"value": value}] * 101},
                 {"alg": "RSA-OAEP-256", "items": ["x"]}, {"alg": "RSA1_5", "items": [{"value": value}]}):
        st, _, doc = raw(served, "POST", path, json.dumps(body).encode(),
                         {"Content-Type": "application/json"}, token=tok)
        assert st == 400 and doc["error"]["code"] == "BadParameter", (body, doc)
    with pytest.raises(BatchUnsupported):   # a request the vault refuses as such: unwrap one by one
        c.unwrap_many("k", ver, [(blobs[0], None)] * 101)
    st, _, doc = raw(served, "POST", path, json.dumps({"alg": "RSA-OAEP-256", "items": [{"value": "x"}]}).encode(),
                     {"Content-Type": "application/json"})
    assert st == 401   # no token, no batch
    nobody = json.loads(vault_cli("identity", "create", "nobody", "--dir", served.dir, "--json").stdout)
    st, _, doc = raw(served, "POST", path, json.dumps({"alg": "RSA-OAEP-256", "items": [{"value": "x"}]}).encode(),
                     {"Content-Type": "application/json"}, token=identity_token(served, nobody))
    assert st == 403 and doc["error"]["innererror"]["code"] == "AccessDenied"


def test_sigkill_loses_no_answered_batch_unwrap(served):
    """Every unwrap of every answered unwrapkeys request has its record in the store after a
    SIGKILL of the server in the middle of the load."""
    c = VaultClient.for_admin(served.dir, timeout_seconds=5)
    c.create_key("k")
    ver, _, blobs = _wrapped(c, "k", 8)
    answered: list[str] = []
    stop = threading.Event()

    def worker(t):
        i = 0
        while not stop.is_set():
            ids = [f"k{t}-{i}-{j}" for j in range(len(blobs))]
            try:
                c.unwrap_many("k", ver, list(zip(blobs, ids)))
            except (BlockcryptError, BatchUnsupported):
                return
            answered.extend(ids)
            i += 1
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    while len(answered) < 400:
        assert time.monotonic() - t0 < 60, "the load did not get going"
        time.sleep(0.01)
    kill9_under_load(served, stop, threads)
    assert json.loads(vault_cli("audit", "verify", "--dir", served.dir, "--json").stdout)["ok"]
    audited = {r.get("diskId") for r in _records(served.dir) if r.get("operation") == "KeyUnwrap"
               and r.get("status") == 200}
    missing = set(answered) - audited
    assert not missing, sorted(missing)[:5]
    with pytest.raises(KeyUnavailable):   # and the client says the vault is away, as for one unwrap
        c.unwrap_many("k", ver, [(blobs[0], "after")])
