"""Restarts and crashes: a restarted vault loses nothing; a vault killed with
SIGKILL in the middle of writes reopens with its store intact, every
acknowledged write present, and its audit chain verifying."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time

from blockcrypt.errors import BlockcryptError
from blockcrypt.vault.client import VaultClient
from vault_helpers import VaultProcess, make_vault, vault_cli
from vault_helpers import admin_token, raw

DEK = os.urandom(64)


def test_restart_loses_nothing(tmp_path):
    d = make_vault(tmp_path / "v", "--retention-days", "30", "--purge-protection")
    v = VaultProcess(d).start()
    try:
        c = VaultClient.for_admin(d)
        c.create_key("r1")
        c.rotate_key("r1")
        c.create_key("r2", tags={"a": "b"})
        c.update_key("r2", enabled=False)
        c.create_key("r3")
        c.delete_key("r3")
        kid, wrapped = c.wrap("r1", None, DEK)
        ident = json.loads(vault_cli("identity", "create", "app", "--dir", d, "--json").stdout)
        vault_cli("policy", "set", "--dir", d, "--identity", "app", "--permissions", "get,unwrapKey")
        token = admin_token(v)
        before = {"keys": c.list_keys(), "versions": c.list_versions("r1"), "deleted": c.list_deleted(),
                  "r2": c.get_key("r2")}
        port = v.port
        v.stop()
        assert not (d / "serve.json").exists()
        v.start(listen=f"127.0.0.1:{port}")
        c2 = VaultClient.for_admin(d)
        after = {"keys": c2.list_keys(), "versions": c2.list_versions("r1"), "deleted": c2.list_deleted(),
                 "r2": c2.get_key("r2")}
        assert after == before
        assert c2.unwrap("r1", kid.rsplit("/", 1)[1], wrapped) == DEK
        # the token from before the restart is still good (signed with a master-key derived key)
        assert raw(v, "GET", "/keys?api-version=7.5", token=token)[0] == 200
        app = VaultClient(v.url, tenant_id=ident["tenantId"], client_id=ident["clientId"],
                          client_secret=ident["clientSecret"], ca_file=str(d / "ca.pem"))
        assert app.unwrap("r1", kid.rsplit("/", 1)[1], wrapped) == DEK
        res = json.loads(vault_cli("audit", "verify", "--dir", d, "--json").stdout)
        assert res["ok"]
        ops = [json.loads(x)["operation"] for x in vault_cli("audit", "--dir", d, "--json").stdout.splitlines()]
        assert ops.count("VaultStart") == 2 and ops.count("VaultStop") == 1
    finally:
        v.stop()


def test_kill9_during_writes(tmp_path):
    d = make_vault(tmp_path / "v")
    v = VaultProcess(d).start()
    try:
        c = VaultClient.for_admin(d, timeout_seconds=5)
        c.create_key("base")
        kid, wrapped = c.wrap("base", None, DEK)
        port = v.port
        for rnd in range(3):
            acked_keys: list[str] = []
            acked_tag: dict[str, int] = {}
            stop = threading.Event()

            def creator(tid):
                i = 0
                while not stop.is_set():
                    name = f"c{rnd}-{tid}-{i}"
                    try:
                        c.create_key(name)
                    except BlockcryptError:
                        return
                    acked_keys.append(name)
                    i += 1

            def updater():
                i = 0
                while not stop.is_set():
                    try:
                        c.update_key("base", tags={"n": str(i)})
                        c.wrap("base", None, DEK, disk_id=f"disk-{i}")
                    except BlockcryptError:
                        return
                    acked_tag["base"] = i
                    i += 1
            threads = [threading.Thread(target=creator, args=(t,)) for t in range(2)]
            threads.append(threading.Thread(target=updater))
            for t in threads:
                t.start()
            time.sleep(1.5 + rnd * 0.37)
            v.proc.send_signal(signal.SIGKILL)
            v.proc.wait(10)
            stop.set()
            for t in threads:
                t.join(30)
            v.stop()
            assert acked_keys and acked_tag, "the writers made no progress before the kill"

            conn = sqlite3.connect(str(d / "vault.db"))
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            conn.close()
            res = json.loads(vault_cli("audit", "verify", "--dir", d, "--json").stdout)
            assert res["ok"], res

            # every key version in the store has its KeyCreate audit record (they commit together)
            conn = sqlite3.connect(str(d / "vault.db"))
            versions = {r[0] for r in conn.execute("SELECT version FROM key_versions")}
            conn.close()
            recs = [json.loads(x) for x in vault_cli("audit", "--dir", d, "--json").stdout.splitlines()]
            audited = {r.get("version") for r in recs if r.get("operation") == "KeyCreate" and r.get("status") == 200}
            assert versions <= audited

            v.start(listen=f"127.0.0.1:{port}")
            names = {it["kid"].rsplit("/", 1)[1] for it in c.list_keys()}
            assert set(acked_keys) <= names
            assert int(c.get_key("base").get("tags", {}).get("n", -1)) >= acked_tag["base"]
            assert c.unwrap("base", kid.rsplit("/", 1)[1], wrapped) == DEK
    finally:
        v.stop()
