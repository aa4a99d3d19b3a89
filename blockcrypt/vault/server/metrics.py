"""The vault's Prometheus metrics: requests by operation (the audit's operation name:
KeyUnwrap, KeyWrap, TokenIssue, ...) and HTTP status, their duration, and the
connections open now; served on a loopback address by _util/metricsweb.py.

The service calls :meth:`VaultMetrics.observe` once per answered request, where it
writes that request's audit record.

Caveat: counters start at zero when the vault starts; labels carry operation names and
status codes only (no key names, no identities), so their number stays small.
"""
from __future__ import annotations


class VaultMetrics:
    def __init__(self, server=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.requests = Counter("blockcrypt_vault_requests", "requests answered, by operation and HTTP status",
                                ["operation", "status"], registry=self.registry)
        self.duration = Histogram("blockcrypt_vault_request_duration_seconds",
                                  "time from a request's first byte to its answer, by operation", ["operation"],
                                  registry=self.registry,
                                  buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.connections = Gauge("blockcrypt_vault_connections", "connections open now", registry=self.registry)
        self.server = server
        self.connections.set_function(self._connections)

    def _connections(self) -> float:
        s = self.server
        return float(len(getattr(s, "_conns", ()))) if s is not None else 0.0

    def observe(self, operation: str | None, status, seconds: float | None = None) -> None:
        op = str(operation or "Unknown")[:64]
        self.requests.labels(op, str(status or 0)).inc()
        if seconds is not None:
            self.duration.labels(op).observe(max(0.0, seconds))


def start(listen: str, server, allow_remote: bool = False):
    """Metrics for ``server`` at ``listen``; returns (VaultMetrics, URL, stop)."""
    from ..._util import metricsweb
    m = VaultMetrics(server)
    url, stop = metricsweb.start(listen, m.registry, allow_remote)
    return m, url, stop
