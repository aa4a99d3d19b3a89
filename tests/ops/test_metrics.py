"""Prometheus metrics (issue 16), scraped over HTTP as Prometheus would: the mount daemon's
per-disk counters move while fio writes and reads a real disk file on the mount (ops, bytes,
the latency histogram); a customer-key disk shows its key state (1 and 0 with the reason),
its last key check, grace seconds and revocations; the vault counts requests by operation
and status after real HTTPS requests. Loopback only unless allowed."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from blockcrypt.control import des, disks
from support.fusehelpers import Mount, bc, cleanup_tree, direct_io, need, until
from support.vaultproc import PY, VaultProcess, make_vault

MiB = 1 << 20


def scrape(url: str) -> dict:
    """{(sample name, frozenset(labels)): value} of one scrape."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(m: dict, name: str, **labels) -> float:
    hits = [v for (n, ls), v in m.items() if n == name and all((k, v2) in ls for k, v2 in labels.items())]
    assert len(hits) == 1, (name, labels, len(hits))
    return hits[0]


def test_mount_metrics_move_while_fio_runs(root, state):
    need("fio")
    disks.create(state, "d", 64 * MiB)
    mp = root / "mnt"
    mp.mkdir()
    m = Mount(state, mp, metrics="127.0.0.1:0").start()
    try:
        url = m.info["metricsUrl"]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        st = json.loads(bc(state, "status", "--json").stdout)
        assert st["mounts"][0]["metricsUrl"] == url
        fio = subprocess.Popen(["fio", "--name=w", f"--filename={m.disk('d')}", "--rw=randrw", "--bs=4k",
                                "--direct=1", "--size=32M", "--time_based", "--runtime=6", "--ioengine=psync"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.5)
            a = scrape(url)
            time.sleep(2)
            b = scrape(url)
        finally:
            out, err = fio.communicate(timeout=60)
        assert fio.returncode == 0, err
        lab = dict(disk="d", dir="disks")
        for name in ("blockcrypt_disk_reads_total", "blockcrypt_disk_writes_total",
                     "blockcrypt_disk_read_bytes_total", "blockcrypt_disk_written_bytes_total"):
            assert sample(b, name, **lab) > sample(a, name, **lab) > 0, name
        inf_a = sample(a, "blockcrypt_disk_request_latency_seconds_bucket", le="+Inf", **lab)
        inf_b = sample(b, "blockcrypt_disk_request_latency_seconds_bucket", le="+Inf", **lab)
        assert inf_b > inf_a > 0
        buckets = sorted((float(dict(ls)["le"]), v) for (n, ls), v in b.items()
                         if n == "blockcrypt_disk_request_latency_seconds_bucket" and dict(ls).get("disk") == "d")
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)   # cumulative
        assert sample(b, "blockcrypt_disk_state", state="open", **lab) == 1
        assert sample(b, "blockcrypt_disk_state", state="KeyUnavailable", **lab) == 0
        assert sample(b, "blockcrypt_disk_key_available", reason="", **lab) == 1
        assert sample(b, "blockcrypt_disk_integrity_errors_total", **lab) == 0
        assert sample(b, "blockcrypt_mount_info", mountpoint=str(mp)) == 1
    finally:
        cleanup_tree(root, state)


def test_customer_key_metrics_and_revocation(root, state, vault, key_name):
    state.catalog.set_setting("key_check_interval", "0.5")
    state.catalog.set_setting("key_grace_period", "120")
    des.create(state, "des1", f"{vault.url}/keys/{key_name}", vault_dir=str(vault.dir), grant=True)
    des.create_disk(state, "vm", 8 * MiB, "des1")
    mp = root / "mnt"
    mp.mkdir()
    m = Mount(state, mp, metrics="127.0.0.1:0").start()
    fd = os.open(m.disk("vm"), os.O_RDWR | os.O_DIRECT)
    try:
        url = m.info["metricsUrl"]
        lab = dict(disk="vm", dir="disks")
        until(lambda: any(n == "blockcrypt_disk_key_last_check_timestamp_seconds" for n, _ in scrape(url)), 5)
        a = scrape(url)
        assert abs(sample(a, "blockcrypt_disk_key_last_check_timestamp_seconds", **lab) - time.time()) < 5
        assert sample(a, "blockcrypt_disk_key_grace_seconds_left", **lab) == 120
        assert sample(a, "blockcrypt_disk_key_revocations_total", **lab) == 0
        assert sample(a, "blockcrypt_key_checks_total", des="des1", result="ok") >= 1
        vault.key("disable", key_name)
        assert until(lambda: direct_io(fd, True) == errno.EIO, 3) is not None
        b = scrape(url)
        assert sample(b, "blockcrypt_disk_key_available", reason="KeyDisabled", **lab) == 0
        assert sample(b, "blockcrypt_disk_state", state="KeyUnavailable", **lab) == 1
        assert sample(b, "blockcrypt_disk_key_revocations_total", **lab) == 1
        assert sample(b, "blockcrypt_disk_key_grace_seconds_left", **lab) == 0
        assert sample(b, "blockcrypt_key_checks_total", des="des1", result="KeyDisabled") >= 1
        vault.key("enable", key_name)
        assert until(lambda: direct_io(fd, True) == 0, 3) is not None
        c = scrape(url)
        assert sample(c, "blockcrypt_disk_key_restores_total", **lab) == 1
        assert sample(c, "blockcrypt_disk_key_available", reason="", **lab) == 1
    finally:
        os.close(fd)
        vault.key("enable", key_name, check=False)
        cleanup_tree(root, state)


def test_vault_metrics_count_requests_by_operation_and_status(tmp_path):
    v = VaultProcess(make_vault(tmp_path / "vault"), extra=("--metrics", "127.0.0.1:0")).start()
    try:
        info = json.loads((v.dir / "serve.json").read_text())
        url = info["metrics"]
        assert url.startswith("http://127.0.0.1:")
        before = scrape(url)
        v.key("create", "k1")
        v.key("show", "k1")
        missing = v.key("show", "nope", check=False)
        assert missing.returncode != 0
        after = scrape(url)
        assert sample(after, "blockcrypt_vault_requests_total", operation="KeyCreate", status="200") == 1
        assert sample(after, "blockcrypt_vault_requests_total", operation="KeyGet", status="200") >= 1
        assert sample(after, "blockcrypt_vault_requests_total", operation="KeyGet", status="404") >= 1
        assert sample(after, "blockcrypt_vault_requests_total", operation="TokenIssue", status="200") >= 1
        assert not any(n == "blockcrypt_vault_requests_total" and ("operation", "KeyCreate") in ls
                       for n, ls in before)
        assert sample(after, "blockcrypt_vault_request_duration_seconds_count", operation="KeyCreate") == 1
    finally:
        v.stop()


def test_metrics_refuse_a_non_loopback_address(root, state):
    mp = root / "mnt"
    mp.mkdir()
    r = bc(state, "mount", mp, "--metrics", "0.0.0.0:9464", check=False)
    assert r.returncode == 2 and "not a loopback address" in r.stderr and len(r.stderr.splitlines()) == 1
    r = bc(state, "config", "set", "metrics_listen", "10.1.2.3:9464", check=False)
    assert r.returncode == 2 and "loopback" in r.stderr
    bc(state, "config", "set", "metrics_listen", "127.0.0.1:0")
    m = Mount(state, mp).start()       # the setting turns it on
    try:
        assert scrape(m.info["metricsUrl"])
    finally:
        cleanup_tree(root, state)
    p = subprocess.run([PY, "-m", "blockcrypt", "vault",
                        "serve", "--dir", str(root / "novault"), "--listen", "127.0.0.1:0", "--metrics", "0.0.0.0:1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not a loopback address" in p.stderr
