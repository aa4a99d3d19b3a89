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

:func:`verify` walks the chain and names the first record that was edited,
removed (a gap in ``seq``), reordered, or whose stored hash does not match.

Caveats: the chain proves order and integrity relative to its last record; an
attacker who can write ``vault.db`` can still cut records off the end: anchor
the head (``vault audit verify`` prints it) elsewhere to detect that. Records are never pruned.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3

from ..._util.clock import iso_ms
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
    start = keyed_from(conn, key)
    last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
    record = {k: v for k, v in fields.items() if v is not None and v != ""}
    record["seq"] = seq
    record.setdefault("time", iso_ms())
    h = _hash(prev, record, key if start is None or seq >= start else None)
    conn.execute("INSERT INTO audit (seq, record, prev_hash, hash) VALUES (?, ?, ?, ?)",
                 (seq, _canon(record), prev, h))
    return record


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


def verify(store: Store) -> dict:
    """Check the whole chain. Returns {ok, records, head, bad_seq, why}."""
    with store.tx() as c:
        start = keyed_from(c, store.audit_key)
        rows = c.execute("SELECT seq, record, prev_hash, hash FROM audit ORDER BY seq").fetchall()
    if start is None:
        return {"ok": False, "records": len(rows), "bad_seq": 1, "head": None, "unkeyed": None,
                "why": f"the chain's {KEYED_FROM} mark was edited (its MAC does not match)"}
    prev = GENESIS
    expect_seq = 1
    for row in rows:
        seq = row["seq"]
        bad = None
        try:
            rec = json.loads(row["record"])
        except ValueError:
            rec, bad = None, "record is not valid JSON"
        if bad is None and seq != expect_seq:
            bad = (f"record {expect_seq} is missing" if seq > expect_seq else f"record {seq} is out of order")
        elif bad is None and rec.get("seq") != seq:
            bad = f"record {seq} carries seq {rec.get('seq')!r} (moved or reordered)"
        elif bad is None and row["prev_hash"] != prev:
            bad = f"record {seq} does not link to the record before it (removed or reordered)"
        elif bad is None and _hash(prev, rec, store.audit_key if seq >= start else None) != row["hash"]:
            bad = f"record {seq} was edited (its hash does not match its content)"
        if bad:
            return {"ok": False, "records": len(rows), "bad_seq": min(seq, expect_seq), "why": bad,
                    "head": None, "unkeyed": min(start - 1, len(rows))}
        prev = row["hash"]
        expect_seq = seq + 1
    return {"ok": True, "records": len(rows), "head": prev, "bad_seq": None, "why": None,
            "unkeyed": min(start - 1, len(rows))}
