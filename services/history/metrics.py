"""Prometheus metrics of the history service."""

from __future__ import annotations

from hlbook.common.metrics import Counter, Gauge, Histogram

BLOCKS = Counter("hlbook_history_blocks_total", "Blocks stored, by source (live: ingest's HIST|, backfill: the node's files)", ["source"])
ROWS = Counter("hlbook_history_rows_total", "Rows written, by table", ["table"])
DELETED = Counter("hlbook_history_deleted_rows_total", "Rows removed by retention (--history-days, orders per user, 5,000 candles a series)", ["table"])
BAD_LINES = Counter("hlbook_history_bad_lines_total", "Node lines the backfill skipped, by stream and reason", ["stream", "reason"])
MISSING = Counter("hlbook_history_missing_blocks_total", "Heights in the files' range that no file holds (counted as held: nothing can fill them)")
BACKFILL_BYTES = Counter("hlbook_history_backfill_bytes_total", "Bytes of node files read by the backfill")
STORE_ERRORS = Counter("hlbook_history_store_errors_total", "Commits the store refused (a full disk): their blocks are read again from the node's files")
HEIGHT = Gauge("hlbook_history_height", "Newest block held")
LAG = Gauge("hlbook_history_lag_seconds", "Wall clock minus the block time of the newest block held")
HOLES = Gauge("hlbook_history_holes", "Heights between the oldest and the newest held that are not held (the backfill's work)")
DB_BYTES = Gauge("hlbook_history_db_bytes", "Size of the store on disk (database and write-ahead log)")
QUERIES = Counter("hlbook_history_queries_total", "Queries, by op and result", ["op", "result"])
QUERY_SECONDS = Histogram("hlbook_history_query_seconds", "Time to answer a query", ["op"],
                          buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))
