"""Prometheus metrics helpers. Each service defines its own metrics with the
``hlbook_`` prefix; ``serve`` exposes them over HTTP when a port is given."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = ["Counter", "Gauge", "Histogram", "serve", "BAD_INPUT", "REPLIES_DROPPED"]

BAD_INPUT = Counter(
    "hlbook_bad_input_total",
    "Inputs rejected (malformed lines, unknown orders, bad frames), by service and reason",
    ["service", "reason"],
)

REPLIES_DROPPED = Counter(
    "hlbook_replies_dropped_total",
    "Replies a ROUTER could not queue (the asker's queue full, or the asker gone), by service: the request times out",
    ["service"],
)


def serve(port: int | None, host: str = "127.0.0.1") -> None:
    """Expose /metrics on ``host:port``; no-op when port is None or 0."""
    if port:
        start_http_server(port, addr=host)
