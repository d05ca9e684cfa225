"""Prometheus metrics of a gateway (``hlbook_gateway_`` prefix), served on its own ``/metrics``."""

from __future__ import annotations

from hlbook.common.metrics import Counter, Gauge, Histogram

CONNECTIONS = Gauge("hlbook_gateway_connections", "Open WebSocket connections")
SUBSCRIPTIONS = Gauge("hlbook_gateway_subscriptions", "Client subscriptions, by type", ["type"])
FEEDS = Gauge("hlbook_gateway_feeds", "Feeds with at least one subscriber (each encoded once per update)")
REFUSED = Counter("hlbook_gateway_refused_total", "Connections refused at the handshake, by reason", ["reason"])
CLOSED = Counter("hlbook_gateway_closed_total", "Connections closed, by reason", ["reason"])
REQUESTS = Counter("hlbook_gateway_requests_total", "Client requests, by method", ["method"])
ERRORS = Counter("hlbook_gateway_errors_total", "Error messages sent to clients, by reason", ["reason"])
SENT = Counter("hlbook_gateway_messages_sent_total", "Feed messages queued to clients, by channel", ["channel"])
ENCODED = Counter("hlbook_gateway_messages_encoded_total", "Feed messages encoded (once for all their subscribers), by channel", ["channel"])
CONFLATED = Counter("hlbook_gateway_conflated_total", "Feed messages replaced by a newer one before a slow client got them")
UPSTREAM = Counter("hlbook_gateway_upstream_messages_total", "Messages received from ingest and shards, by topic kind", ["kind"])
GAPS = Counter("hlbook_gateway_upstream_gaps_total", "Lost upstream messages detected (prev chain), by topic kind", ["kind"])
L4_RESYNCS = Counter("hlbook_gateway_l4_resyncs_total", "l4Book feeds that sent every subscriber a fresh snapshot (lost update, shard reset)")
REPAIRS = Counter("hlbook_gateway_upstream_repairs_total", "Lost trades/user messages recovered from ingest's replay, by kind and result", ["kind", "result"])
L4_SNAPSHOTS = Counter("hlbook_gateway_l4_snapshots_total", "l4Book snapshots fetched from shards, by result", ["result"])
INFO = Counter("hlbook_gateway_info_requests_total", "Info requests (POST /info and WS post), by type and result", ["type", "result"])
SHARDS_LIVE = Gauge("hlbook_gateway_shards_live", "Shards heard from in the last seconds")
LAG = Gauge("hlbook_gateway_lag_seconds", "Wall clock minus the block time of the newest block every live shard finished (the node's own delay included)")
USERS = Gauge("hlbook_gateway_followed_users", "Users followed by some client (each has a bounded store)")
PAST = Counter("hlbook_gateway_past_requests_total", "Point-in-time book requests (l4Snapshot, l2Book with a time), by type and "
               "outcome (ok, busy, off, too_old, too_new, too_far, timeout, damaged, error)", ["type", "outcome"])
PAST_SECONDS = Histogram("hlbook_gateway_past_seconds", "Time a point-in-time book took to rebuild (answered requests)",
                         buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))
