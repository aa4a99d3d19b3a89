"""The mount daemon's Prometheus metrics: a collector that reads, at each scrape, what the
front end and the key monitor know (no bookkeeping on the I/O path), served on a loopback
address by _util/metricsweb.py.

Per disk (labels ``disk``, ``dir``, ``disk_id``): the engine's counters (reads, writes,
discards, flushes, errors, bytes read and written, integrity failures = tampered or
damaged sectors found) and its request-latency histogram (log2 buckets of microseconds,
exposed in seconds: ``le`` = 2^i us); open handles and size; the one state
(``blockcrypt_disk_state{state=...} 1``); key availability (``blockcrypt_disk_key_available``
1/0 with a ``reason`` label); for customer-key disks the last key check (Unix time),
grace seconds left (the full grace period while the key answers, the time left during an
outage, 0 once stopped), revocations, restores and rotations (key version changes the
monitor saw). Per mount: its info, key checks by DES and result, unwraps the checks made.

Caveats: engine counters start at zero when a disk is opened (Prometheus' rate() takes a
reset in its stride); the engine keeps no latency sum, so the histogram has buckets and
no ``_sum``/``_count`` (the request counters give the count); key-monitor counters of a
disk survive its close only when they moved.
"""
from __future__ import annotations

import logging

log = logging.getLogger("blockcrypt.mount.metrics")

LABELS = ["disk", "dir", "disk_id"]
STATES = ("open", "KeyUnavailable", "ServingOnGrace", "Corrupt", "failed")
COUNTERS = (("reads", "reads", "read requests served"),
            ("writes", "writes", "write requests served"),
            ("discards", "discards", "discard (punch hole) requests"),
            ("flushes", "flushes", "flush (fsync) requests"),
            ("io_errors", "errors", "requests the engine answered with an error"),
            ("read_bytes", "bytesRead", "bytes read"),
            ("written_bytes", "bytesWritten", "bytes written"),
            ("integrity_errors", "integrityErrors", "requests that met a sector failing its integrity tag "
                                                    "(tampered with or damaged at rest)"))


class MountCollector:
    def __init__(self, fs, st, entry: dict):
        self.fs, self.st, self.entry = fs, st, entry

    def describe(self):
        return []  # collected on demand; nothing to register up front

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        e = self.entry
        info = GaugeMetricFamily("blockcrypt_mount_info", "this mount (value 1)",
                                 labels=["mount_id", "mountpoint", "state_dir", "frontend", "cipher"])
        info.add_metric([e["id"], e["mountpoint"], e["state"], e["frontend"], e["cipher"]], 1)
        yield info
        try:
            disks = self.fs.disk_status()["disks"]
        except Exception as ex:  # a scrape must never hurt the mount
            log.warning("metrics: disk status failed: %s", ex)
            disks = []
        mon = getattr(self.fs, "key_monitor", None)
        fam = {k: CounterMetricFamily(f"blockcrypt_disk_{k}", doc, labels=LABELS) for k, _, doc in COUNTERS}
        hist = HistogramMetricFamily("blockcrypt_disk_request_latency_seconds",
                                     "request latency in the engine (log2 buckets of microseconds)", labels=LABELS)
        handles = GaugeMetricFamily("blockcrypt_disk_open_handles", "open file handles", labels=LABELS)
        size = GaugeMetricFamily("blockcrypt_disk_size_bytes", "logical size", labels=LABELS)
        state = GaugeMetricFamily("blockcrypt_disk_state", "the disk's one state (1 for the current one)",
                                  labels=LABELS + ["state"])
        key_ok = GaugeMetricFamily("blockcrypt_disk_key_available",
                                   "1 while the disk's key serves it, 0 when stopped (reason: why)",
                                   labels=LABELS + ["reason"])
        last = GaugeMetricFamily("blockcrypt_disk_key_last_check_timestamp_seconds",
                                 "Unix time of the last key check (customer-key disks)", labels=LABELS)
        grace = GaugeMetricFamily("blockcrypt_disk_key_grace_seconds_left",
                                  "seconds the disk may still serve from its cached key if the key provider "
                                  "stays unreachable (customer-key disks)", labels=LABELS)
        revs = CounterMetricFamily("blockcrypt_disk_key_revocations", "times a key revocation stopped the disk",
                                   labels=LABELS)
        rests = CounterMetricFamily("blockcrypt_disk_key_restores", "times the disk was restored after a revocation",
                                    labels=LABELS)
        rots = CounterMetricFamily("blockcrypt_disk_key_rotations",
                                   "key version changes of the disk's DEK wrap seen by the key monitor", labels=LABELS)
        grace_period = None
        for d in disks:
            lv = [d.get("name", ""), d.get("dir", "disks"), d.get("id", "")]
            st = d.get("state", "failed")
            for s in STATES:
                state.add_metric(lv + [s], 1 if s == st else 0)
            k = d.get("keyError") or {}
            available = st not in ("KeyUnavailable", "failed") and d.get("serving", False)
            key_ok.add_metric(lv + ["" if available else k.get("reason", st)], 1 if available else 0)
            io = d.get("io")
            if io is None:
                continue  # failed to open: no counters
            for k_, src, _ in COUNTERS:
                fam[k_].add_metric(lv, io.get(src, 0))
            buckets, acc = [], 0
            for i, n in enumerate(io.get("latencyUsLog2", [])):
                acc += n
                buckets.append((repr((1 << i) / 1e6), acc))
            buckets.append(("+Inf", acc))
            hist.add_metric(lv, buckets, None)
            handles.add_metric(lv, d.get("openHandles", 0))
            size.add_metric(lv, d.get("sizeBytes", 0))
            ki = mon.disk_info(d["id"]) if mon is not None and d.get("id") else None
            if ki:
                if ki.get("lastCheck"):
                    last.add_metric(lv, ki["lastCheck"])
                if ki.get("graceSecondsLeft") is not None:
                    left = ki["graceSecondsLeft"]
                elif st == "KeyUnavailable":
                    left = 0.0
                else:
                    if grace_period is None:
                        grace_period = _grace_period(self.st)
                    left = grace_period
                grace.add_metric(lv, left)
                revs.add_metric(lv, ki.get("revocations", 0))
                rests.add_metric(lv, ki.get("restores", 0))
                rots.add_metric(lv, ki.get("rotations", 0))
        yield from fam.values()
        yield from (hist, handles, size, state, key_ok, last, grace, revs, rests, rots)
        checks = CounterMetricFamily("blockcrypt_key_checks", "key checks by the key monitor, one per key and "
                                     "interval", labels=["des", "result"])
        unwraps = CounterMetricFamily("blockcrypt_key_check_unwraps", "unwraps the key checks asked the key "
                                      "providers for")
        if mon is not None:
            with mon.lock:
                items, n = list(mon.checks.items()), mon.unwraps
            for (des_name, result), v in items:
                checks.add_metric([des_name, result], v)
            unwraps.add_metric([], n)
        yield checks
        yield unwraps


def _grace_period(st) -> float:
    from ..control.settings import get
    try:
        return float(get(st, "key_grace_period"))
    except Exception:
        return 0.0


def start_metrics(fs, st, entry: dict, listen: str, allow_remote: bool = False):
    """Serve this mount's metrics at ``listen``; returns (URL, stop)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client import ProcessCollector
    from .._util import metricsweb
    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    reg.register(MountCollector(fs, st, entry))
    return metricsweb.start(listen, reg, allow_remote)
