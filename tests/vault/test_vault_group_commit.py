"""Issue 14: the vault's audit group commit (vault/server/audit.py GroupCommit) and reads that
never wait for a commit (store.py's reader pool): concurrent requests' records share one
transaction, every answered request's record is durable before its answer (also across a
SIGKILL of the server), and the HMAC chain verifies."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

from blockcrypt.errors import BlockcryptError
from blockcrypt.vault.client import VaultClient
from blockcrypt.vault.server import audit
from blockcrypt.vault.server.store import Store
from vault_helpers import VaultProcess, make_vault, vault_cli

DEK = os.urandom(64)


def _wait(pred, timeout_s=10.0):
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout_s, "timed out"
        time.sleep(0.005)


def _start_unwrappers(d, timeout_s, unwraps) -> list[threading.Thread]:
    """Six threads, each calling ``unwraps(t, unwrap)`` with its number t and an ``unwrap(disk_id)``
    of a DEK wrapped under a new key of the vault in ``d``; started, not joined."""
    c = VaultClient.for_admin(d, timeout_seconds=timeout_s)
    c.create_key("k")
    kid, wrapped = c.wrap("k", None, DEK)
    ver = kid.rsplit("/", 1)[1]

    def unwrap(disk_id):
        return c.unwrap("k", ver, wrapped, disk_id=disk_id)
    threads = [threading.Thread(target=unwraps, args=(t, unwrap)) for t in range(6)]
    for t in threads:
        t.start()
    return threads


def _audited_unwraps(d) -> tuple[list[dict], set]:
    """The audit records of the vault in ``d`` (its chain verified first) and the disk ids of
    its answered unwraps."""
    res = json.loads(vault_cli("audit", "verify", "--dir", d, "--json").stdout)
    assert res["ok"], res
    recs = [json.loads(x) for x in vault_cli("audit", "--dir", d, "--json").stdout.splitlines()]
    return recs, {r.get("diskId") for r in recs if r.get("operation") == "KeyUnwrap" and r.get("status") == 200}


def test_records_queued_during_a_commit_share_the_next_one(tmp_path):
    d = make_vault(tmp_path / "v")
    store = Store(d)
    try:
        gc = audit.GroupCommit(store)
        base = gc.groups
        errors = []

        def one(i):
            try:
                gc.append({"identity": "t", "operation": "Test", "status": 200, "result": "ok", "detail": str(i)})
            except Exception as e:   # pragma: no cover - reported below
                errors.append(e)
        with store.tx():   # a commit under way elsewhere: the first leader waits for the store
            first = threading.Thread(target=one, args=(0,))
            first.start()
            _wait(lambda: gc._leading)
            rest = [threading.Thread(target=one, args=(i,)) for i in range(1, 8)]
            for t in rest:
                t.start()
            _wait(lambda: len(gc._queue) == 7)
            # reads of other threads go on meanwhile, on connections of their own
            seen = []

            def reader():
                with store.read() as c:
                    seen.append(c.execute("SELECT COUNT(*) FROM identities").fetchone()[0])
            r = threading.Thread(target=reader)
            r.start()
            r.join(5)
            assert seen and seen[0] >= 1
        for t in [first, *rest]:
            t.join(10)
        assert not errors
        assert gc.groups - base == 2 and gc.appended == 8     # the leader alone, then the 7 together
        res = audit.verify(store)
        assert res["ok"], res
        details = [r.get("detail") for r in audit.records(store) if r.get("operation") == "Test"]
        assert sorted(details, key=int) == [str(i) for i in range(8)]
    finally:
        store.close()


def test_a_failed_group_fails_each_of_its_callers_and_the_next_group_commits(tmp_path, monkeypatch):
    d = make_vault(tmp_path / "v")
    store = Store(d)
    try:
        gc = audit.GroupCommit(store)
        real = audit.append_many

        def append_many(c, many, k):   # what a group commit appends with
            if any(f.get("detail") == "boom" for f in many):
                raise OSError("disk full")
            return real(c, many, k)
        monkeypatch.setattr(audit, "append_many", append_many)
        try:
            gc.append({"identity": "t", "operation": "Test", "detail": "boom"})
        except OSError as e:
            assert "disk full" in str(e)
        else:
            raise AssertionError("the failed commit was not reported")
        gc.append({"identity": "t", "operation": "Test", "detail": "after"})
        recs = [r.get("detail") for r in audit.records(store) if r.get("operation") == "Test"]
        assert recs == ["after"] and audit.verify(store)["ok"]
    finally:
        store.close()


def test_concurrent_unwraps_all_audited_and_chain_verifies(tmp_path):
    d = make_vault(tmp_path / "v")
    v = VaultProcess(d).start()
    try:
        done: list[str] = []

        def worker(t, unwrap):
            for i in range(40):
                assert unwrap(f"w{t}-{i}") == DEK
                done.append(f"w{t}-{i}")
        for t in _start_unwrappers(d, 10, worker):
            t.join(120)
        assert len(done) == 240
    finally:
        v.stop()
    recs, audited = _audited_unwraps(d)
    assert set(done) <= audited
    seqs = [r["seq"] for r in recs]
    assert seqs == list(range(1, len(seqs) + 1))


def test_sigkill_loses_no_answered_request(tmp_path):
    """Every unwrap the client got an answer for has its record in the store after a SIGKILL
    of the server in the middle of the load (the answer waits for the group's commit)."""
    d = make_vault(tmp_path / "v")
    v = VaultProcess(d).start()
    try:
        answered: list[str] = []
        stop = threading.Event()

        def worker(t, unwrap):
            i = 0
            while not stop.is_set():
                try:
                    unwrap(f"k{t}-{i}")
                except BlockcryptError:
                    return
                answered.append(f"k{t}-{i}")
                i += 1
        threads = _start_unwrappers(d, 5, worker)
        _wait(lambda: len(answered) > 150, 60)
        v.proc.send_signal(signal.SIGKILL)
        v.proc.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        v.stop()
    _recs, audited = _audited_unwraps(d)
    missing = set(answered) - audited
    assert not missing, sorted(missing)[:5]
