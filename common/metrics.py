"""Prometheus metrics helpers. Each service defines its own metrics with the
``hlbook_`` prefix; ``serve`` exposes them over HTTP when a port is given."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = ["Counter", "Gauge", "Histogram", "serve", "BAD_INPUT"]

BAD_INPUT = Counter(
    "hlbook_bad_input_total",
    "Inputs rejected (malformed lines, unknown orders, bad frames), by service and reason",
    ["service", "reason"],
)


def serve(port: int | None, host: str = "127.0.0.1") -> None:
    """Expose /metrics on ``host:port``; no-op when port is None or 0."""
    if port:
        start_http_server(port, addr=host)
