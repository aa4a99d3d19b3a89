"""Hash-chained, append-only audit log of every vault request.

Each record is a JSON object (``seq``, ``time``, ``identity``, ``client_id``,
``operation``, ``key``, ``version``, ``status``, ``result``, ``disk_id``,
``request_id``, ``remote``, ``detail``; absent fields are omitted) stored in
the ``audit`` table with::

    hash = HMAC-SHA-256(audit key, prev_hash_hex || "\\n" || canonical JSON of the record)

where ``prev_hash`` of record 1 is 64 zeros, canonical JSON is sorted keys, no
spaces, and the audit key is derived from ``master.key`` (HKDF, its own label):
whoever can edit ``vault.db`` but not read the master key cannot recompute the
chain. Records written before the chain was keyed (vaults of an older release)
keep their plain SHA-256 links; ``meta.audit_keyed_from`` names the first keyed
record and carries its own MAC, so it cannot be moved to unkey the chain. Records are appended inside the caller's write transaction, so a
record and the change it describes commit (or vanish) together.

Records of requests that change nothing (reads, wrap/unwrap, refusals) go through
:class:`GroupCommit`: the records of concurrent requests are appended in one
transaction, so one fsync makes a whole group durable, and each request is
answered only once the transaction holding its record has committed (the audit
never loses an answered operation). The chain is the same as one record per
transaction: records get their ``seq`` and link in the order they are appended.

:func:`verify` walks the chain and names the first record that was edited,
removed (a gap in ``seq``), reordered, or whose stored hash does not match.

:func:`prune` (``vault audit prune --before DATE``) deletes the oldest records,
those before DATE, once the whole chain verifies, and puts in their place one
checkpoint row: ``seq`` and ``hash`` of the last pruned record, and a record
``{"operation": "AuditCheckpoint", "seq", "time", "pruned", "lastHash",
"before"}`` whose MAC (the audit key, its own label) sits in the row's
``prev_hash`` column as ``ckpt:HEX``. The record after it links to ``lastHash``
as it always did, so :func:`verify` starts from a valid checkpoint instead of
from record 1: an edited checkpoint fails its MAC; a removed one leaves the
chain starting at a record that is not 1; a record edited, removed or slipped in
before or after it breaks the links as before. The prune itself is the next
record (``AuditPrune``), in the same transaction.

Caveats: the chain proves order and integrity relative to its last record; an
attacker who can write ``vault.db`` can still cut records off the end: anchor
the head (``vault audit verify`` prints it) elsewhere to detect that. A pruned
record is gone for good: export the records first if they must be kept; the
checkpoint proves how many there were and what the chain's head was then, not
what they said.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import threading

from datetime import datetime, timezone

from ..._util.clock import iso_ms
from ...errors import AuditBroken, UsageError
from .store import Store

GENESIS = "0" * 64


def _canon(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _hash(prev_hash: str, record: dict, key: bytes | None = None) -> str:
    data = (prev_hash + "\n" + _canon(record)).encode()
    if key is None:  # records from before the chain was keyed
        return hashlib.sha256(data).hexdigest()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


KEYED_FROM = "audit_keyed_from"


def _keyed_from_mac(key: bytes, seq: int) -> str:
    return hmac.new(key, f"{KEYED_FROM}={seq}".encode(), hashlib.sha256).hexdigest()


def keyed_from(conn: sqlite3.Connection, key: bytes) -> int | None:
    """The first record the chain keys (None: the mark was tampered with). A vault of an older
    release gets the mark now: its records so far stay plain SHA-256, every later one is keyed."""
    row = conn.execute("SELECT v FROM meta WHERE k = ?", (KEYED_FROM,)).fetchone()
    if row is None:
        last = conn.execute("SELECT MAX(seq) FROM audit").fetchone()[0] or 0
        seq = last + 1
        conn.execute("INSERT OR IGNORE INTO meta (k, v) VALUES (?, ?)",
                     (KEYED_FROM, f"{seq}:{_keyed_from_mac(key, seq)}"))
        return seq
    seq_s, _, mac = row[0].partition(":")
    if not seq_s.isdigit() or not hmac.compare_digest(mac, _keyed_from_mac(key, int(seq_s))):
        return None
    return int(seq_s)


def append(conn: sqlite3.Connection, fields: dict, key: bytes) -> dict:
    """Append one record within the caller's open write transaction; returns it. ``key`` is
    the store's ``audit_key``."""
    return append_many(conn, [fields], key)[0]


def append_many(conn: sqlite3.Connection, many: list[dict], key: bytes) -> list[dict]:
    """Append records in order within the caller's open write transaction, as as many
    :func:`append` calls would (the same seqs, links and MACs), with one look-up of the
    chain's head and one INSERT statement for them all; returns them."""
    start = keyed_from(conn, key)
    last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (last[0], last[1]) if last else (0, GENESIS)
    rows, out = [], []
    for fields in many:
        seq += 1
        record = {k: v for k, v in fields.items() if v is not None and v != ""}
        record["seq"] = seq
        record.setdefault("time", iso_ms())
        h = _hash(prev, record, key if start is None or seq >= start else None)
        rows.append((seq, _canon(record), prev, h))
        out.append(record)
        prev = h
    conn.executemany("INSERT INTO audit (seq, record, prev_hash, hash) VALUES (?, ?, ?, ?)", rows)
    return out


class GroupCommit:
    """Durable audit appends from many threads, one transaction (one fsync) per group.

    :meth:`append` queues a record and returns once a transaction holding it has committed.
    A caller that finds no commit under way leads: it takes every queued record, appends them
    in queue order in one transaction and commits, while records of requests arriving
    meanwhile queue for the next group. When it is done it wakes the callers of its group and
    hands the lead to the first caller still queued, if any (each caller waits on an event of
    its own: no herd of waiters wakes at every commit). No thread, no timer: an idle vault
    commits each record alone, a busy one groups as many records as arrive during one commit.
    A failed commit fails every record of its group (each caller gets the error); later groups
    are tried afresh."""

    _LEAD = object()

    def __init__(self, store: Store):
        self.store = store
        self._lock = threading.Lock()
        self._queue: list[list] = []    # [records, event, outcome] of callers not yet committed
        self._leading = False
        self.groups = 0                 # transactions committed (tests, benchmarks)
        self.appended = 0               # records committed

    def append(self, fields: dict) -> None:
        """Append one record; returns once it is durable, or raises the commit's error. Called
        inside this thread's open write transaction, the record joins that one instead (a group
        must never commit or vanish with a transaction it does not own)."""
        self.append_all([fields])

    def append_all(self, records: list[dict]) -> None:
        """Append records, in order and in the same group (one request's), as :meth:`append`."""
        if self.store.in_tx():
            with self.store.tx() as c:
                append_many(c, records, self.store.audit_key)
            return
        entry = [records, threading.Event(), None]
        with self._lock:
            self._queue.append(entry)
            lead = not self._leading
            self._leading = True
        if not lead:
            entry[1].wait()
            if entry[2] is not self._LEAD:   # committed (None) or failed (the error)
                if entry[2] is not None:
                    raise entry[2]
                return
        self._lead()
        if entry[2] is not None and entry[2] is not self._LEAD:
            raise entry[2]

    def _lead(self) -> None:
        with self._lock:
            group, self._queue = self._queue, []
        err = None
        try:
            with self.store.tx() as c:
                append_many(c, [f for records, _, _ in group for f in records], self.store.audit_key)
        except BaseException as e:
            err = e
        with self._lock:
            if err is None:
                self.groups += 1
                self.appended += sum(len(records) for records, _, _ in group)
            nxt = self._queue[0] if self._queue else None
            if nxt is None:
                self._leading = False
            else:
                nxt[2] = self._LEAD
        for entry in group:
            entry[2] = err
            entry[1].set()
        if nxt is not None:
            nxt[1].set()


def records(store: Store, key: str | None = None, limit: int | None = None) -> list[dict]:
    with store.read() as c:
        rows = c.execute("SELECT record FROM audit ORDER BY seq").fetchall()
    out = []
    for r in rows:
        try:
            rec = json.loads(r["record"])
        except ValueError:
            rec = {"seq": None, "operation": "<unreadable record>"}
        if key is None or rec.get("key") == key:
            out.append(rec)
    return out[-limit:] if limit else out


CHECKPOINT_OP = "AuditCheckpoint"
_CKPT_PREFIX = "ckpt:"


def _checkpoint_mac(key: bytes, record: dict) -> str:
    return _CKPT_PREFIX + hmac.new(key, b"blockcrypt-vault audit checkpoint v1\n" + _canon(record).encode(),
                                   hashlib.sha256).hexdigest()


def _checkpoint(row, key: bytes) -> tuple[dict | None, str | None]:
    """(checkpoint record, None) for a valid checkpoint row, (None, why) for a forged one,
    (None, None) for an ordinary record."""
    if not str(row["prev_hash"]).startswith(_CKPT_PREFIX):
        return None, None
    try:
        rec = json.loads(row["record"])
    except ValueError:
        return None, f"the checkpoint at record {row['seq']} is not valid JSON"
    if not isinstance(rec, dict) or not hmac.compare_digest(_checkpoint_mac(key, rec), row["prev_hash"]):
        return None, f"the checkpoint at record {row['seq']} was edited (its MAC does not match)"
    if rec.get("operation") != CHECKPOINT_OP or rec.get("seq") != row["seq"] or rec.get("lastHash") != row["hash"]:
        return None, f"the checkpoint at record {row['seq']} was moved or its link changed"
    return rec, None


def verify(store: Store) -> dict:
    """Check the whole chain. Returns {ok, records, head, bad_seq, why, unkeyed, pruned}: ``records``
    the records kept, ``pruned`` how many a checkpoint stands for (see prune)."""
    with store.tx() as c:
        start = keyed_from(c, store.audit_key)
        rows = c.execute("SELECT seq, record, prev_hash, hash FROM audit ORDER BY seq").fetchall()
    return _verify_rows(rows, start, store.audit_key)


def _verify_rows(rows, start: int | None, key: bytes) -> dict:
    if start is None:
        return {"ok": False, "records": len(rows), "bad_seq": 1, "head": None, "unkeyed": None, "pruned": None,
                "why": f"the chain's {KEYED_FROM} mark was edited (its MAC does not match)"}
    prev = GENESIS
    expect_seq = 1
    pruned = 0
    if rows:
        ckpt, why = _checkpoint(rows[0], key)
        if why:
            return {"ok": False, "records": len(rows), "bad_seq": rows[0]["seq"], "why": why, "head": None,
                    "unkeyed": None, "pruned": None}
        if ckpt is not None:
            pruned, prev, expect_seq = rows[0]["seq"], rows[0]["hash"], rows[0]["seq"] + 1
            rows = rows[1:]
    for row in rows:
        seq = row["seq"]
        bad = None
        try:
            rec = json.loads(row["record"])
        except ValueError:
            rec, bad = None, "record is not valid JSON"
        if bad is None and str(row["prev_hash"]).startswith(_CKPT_PREFIX):
            bad = f"record {seq} is a checkpoint after the start of the chain"
        if bad is None and seq != expect_seq:
            bad = (f"record {expect_seq} is missing" if seq > expect_seq else f"record {seq} is out of order")
        elif bad is None and rec.get("seq") != seq:
            bad = f"record {seq} carries seq {rec.get('seq')!r} (moved or reordered)"
        elif bad is None and row["prev_hash"] != prev:
            bad = f"record {seq} does not link to the record before it (removed or reordered)"
        elif bad is None and _hash(prev, rec, key if seq >= start else None) != row["hash"]:
            bad = f"record {seq} was edited (its hash does not match its content)"
        if bad:
            return {"ok": False, "records": len(rows), "bad_seq": min(seq, expect_seq), "why": bad,
                    "head": None, "unkeyed": _unkeyed(rows, start), "pruned": pruned}
        prev = row["hash"]
        expect_seq = seq + 1
    return {"ok": True, "records": len(rows), "head": prev, "bad_seq": None, "why": None,
            "unkeyed": _unkeyed(rows, start), "pruned": pruned}


def _unkeyed(rows, start: int) -> int:
    return sum(1 for r in rows if r["seq"] < start)


def parse_before(text: str) -> datetime:
    """``--before``: an ISO 8601 date (``2026-12-01``, midnight UTC) or UTC time
    (``2026-12-01T16:30:00Z``, or with an explicit offset)."""
    t = (text or "").strip()
    try:
        if len(t) == 10:
            return datetime.strptime(t, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        d = datetime.fromisoformat(t[:-1] + "+00:00" if t.endswith(("Z", "z")) else t)
    except ValueError:
        d = None
    if d is None or d.tzinfo is None:
        raise UsageError(f"--before {text!r} is not an ISO 8601 date or UTC time: give e.g. 2026-12-01 or "
                         "2026-12-01T16:30:00Z")
    return d.astimezone(timezone.utc)


def _record_time(rec: dict) -> datetime | None:
    try:
        return datetime.fromisoformat(str(rec["time"]).replace("Z", "+00:00")).astimezone(timezone.utc)
    except (KeyError, ValueError):
        return None


def prune(store: Store, before: datetime, *, identity: str = "local") -> dict:
    """Delete the records older than ``before`` (the longest run from the start of the chain whose
    times are all earlier) and leave a signed checkpoint in their place (module docstring).
    Refused (AuditBroken) when the chain does not verify: a prune must not erase the evidence
    of a tampered record. Returns {pruned, prunedTotal, records, checkpointSeq, head, before}."""
    key = store.audit_key
    before_s = before.strftime("%Y-%m-%dT%H:%M:%S.") + f"{before.microsecond // 1000:03d}Z"
    with store.tx() as c:
        start = keyed_from(c, key)
        rows = c.execute("SELECT seq, record, prev_hash, hash FROM audit ORDER BY seq").fetchall()
        res = _verify_rows(rows, start, key)
        if not res["ok"]:
            raise AuditBroken(seq=res["bad_seq"], why=res["why"] + "; nothing was pruned")
        already = res["pruned"]
        last = None
        for row in rows:
            if str(row["prev_hash"]).startswith(_CKPT_PREFIX):
                continue
            t = _record_time(json.loads(row["record"]))
            if t is None or t >= before:
                break
            last = row
        pruned_now = 0
        if last is not None:
            total = last["seq"]
            pruned_now = total - already
            rec = {"seq": total, "operation": CHECKPOINT_OP, "time": iso_ms(), "identity": identity,
                   "pruned": total, "lastHash": last["hash"], "before": before_s}
            c.execute("DELETE FROM audit WHERE seq <= ?", (total,))
            c.execute("INSERT INTO audit (seq, record, prev_hash, hash) VALUES (?, ?, ?, ?)",
                      (total, _canon(rec), _checkpoint_mac(key, rec), last["hash"]))
        append(c, {"identity": identity, "operation": "AuditPrune", "status": 200, "result": "ok",
                   "detail": f"pruned {pruned_now} records before {before_s}"}, key)
        total = last["seq"] if last is not None else already
        kept = c.execute("SELECT COUNT(*) FROM audit").fetchone()[0] - (1 if total else 0)
        head = c.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()[0]
    return {"pruned": pruned_now, "prunedTotal": total, "records": kept, "checkpointSeq": total or None,
            "head": head, "before": before_s}
