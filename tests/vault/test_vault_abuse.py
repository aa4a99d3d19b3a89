"""Issue 15, M7: the vault under slow and flooding clients: a request deadline frees the
threads of clients that trickle bytes, a connection cap keeps a flood off the fd limit, and
good clients keep being served (real `vault serve` over HTTPS on 127.0.0.1)."""
from __future__ import annotations

import socket
import ssl
import threading
import time

from blockcrypt.vault.client import VaultClient

TIMEOUT_S = 2.0


def _tls(port, ca):
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(s, server_hostname="127.0.0.1")


def _closed_by_server(sock, within_s):
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True
    except socket.timeout:
        return False


def test_tricklers_are_cut_and_good_clients_served(vault_factory):
    v = vault_factory(serve_args=("--request-timeout", str(TIMEOUT_S)))
    ca = v.dir / "ca.pem"
    stop = threading.Event()
    cut = []

    def trickle():
        s = _tls(v.port, ca)
        try:
            for b in b"GET /keys?api-version=7.4 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
                if stop.is_set():
                    return
                s.send(bytes([b]))
                time.sleep(0.25)
        except (OSError, ssl.SSLError):
            cut.append(time.monotonic())
        finally:
            s.close()
    t0 = time.monotonic()
    slow = [threading.Thread(target=trickle) for _ in range(20)]
    for t in slow:
        t.start()
    c = VaultClient.for_admin(v.dir)
    worst = 0.0
    while time.monotonic() - t0 < TIMEOUT_S + 2:
        a = time.monotonic()
        c.list_keys()
        worst = max(worst, time.monotonic() - a)
    stop.set()
    for t in slow:
        t.join(10)
    assert worst < 1.0, f"a good request took {worst:.2f} s beside 20 slow clients"
    assert len(cut) == 20, f"{len(cut)} of 20 trickling clients were cut"
    assert max(cut) - t0 < TIMEOUT_S + 2.0


def test_connection_cap_closes_the_flood_and_recovers(vault_factory):
    v = vault_factory(serve_args=("--request-timeout", str(TIMEOUT_S), "--max-connections", "8"))
    idle = [socket.create_connection(("127.0.0.1", v.port)) for _ in range(8)]
    time.sleep(0.3)
    extra = socket.create_connection(("127.0.0.1", v.port))
    assert _closed_by_server(extra, 1.0), "the connection over the cap was not closed at once"
    extra.close()
    # the idle flood is cut at the deadline; then good clients are served again
    assert all(_closed_by_server(s, TIMEOUT_S + 2) for s in idle)
    for s in idle:
        s.close()
    assert isinstance(VaultClient.for_admin(v.dir).list_keys(), list)
