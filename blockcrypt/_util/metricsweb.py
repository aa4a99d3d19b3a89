"""The Prometheus endpoint that the mount daemon and the vault share: parse a ``HOST:PORT``,
refuse an address that is not loopback unless allowed, and serve a registry's text
exposition at ``/metrics`` (prometheus_client's own HTTP server, in a daemon thread).

``parse_listen("127.0.0.1:9464")`` -> ("127.0.0.1", 9464); ``check_loopback`` raises
UsageError for ``0.0.0.0:9464`` or ``10.0.0.5:9464`` unless ``allow_remote``; ``start``
returns the server (its real port when 0 was asked) and a function that stops it.

Caveats: plain HTTP with no authentication, which is why loopback is the default: put a
reverse proxy with TLS in front to scrape from elsewhere, or pass the explicit
allow-remote option; metrics carry disk names and ids, never key material.
"""
from __future__ import annotations

import ipaddress

from ..errors import UsageError


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = str(text).strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"invalid metrics address {text!r}: use HOST:PORT, e.g. 127.0.0.1:9464 (port 0 picks one)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(text: str, allow_remote: bool = False) -> tuple[str, int]:
    """(host, port) of a metrics address; a non-loopback host needs ``allow_remote``."""
    host, port = parse_listen(text)
    if not allow_remote and not is_loopback(host):
        raise UsageError(f"metrics address {text!r} is not a loopback address: the endpoint has no "
                         f"authentication; use 127.0.0.1:PORT, or allow it explicitly (--metrics-allow-remote)")
    return host, port


def start(text: str, registry, allow_remote: bool = False):
    """Serve ``registry`` at http://HOST:PORT/metrics; returns (url, stop)."""
    from prometheus_client import start_http_server
    host, port = check_listen(text, allow_remote)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise UsageError(f"cannot serve metrics on {text}: {e.strerror or e}") from None
    real = server.server_address[1]
    shown = f"[{host}]" if ":" in host else host

    def stop():
        server.shutdown()
        server.server_close()
        thread.join(5)
    return f"http://{shown}:{real}/metrics", stop


__all__ = ["parse_listen", "is_loopback", "check_listen", "start"]
