"""Prometheus metrics of a book shard (``hlbook_book_`` prefix)."""

from __future__ import annotations

from hlbook.common.metrics import Counter, Gauge, Histogram

BLOCKS = Counter("hlbook_book_blocks_total", "Blocks the shard finished")
DIFFS = Counter("hlbook_book_diffs_total", "Book diffs applied")
HEIGHT = Gauge("hlbook_book_height", "Last block the shard finished")
COINS = Gauge("hlbook_book_coins", "Owned coins by state", ["state"])
ORDERS = Gauge("hlbook_book_orders", "Resting orders held by the shard")
GAPS = Counter("hlbook_book_gaps_total", "Lost messages detected, by topic kind", ["kind"])
REPLAYS = Counter("hlbook_book_replays_total", "Replay requests to ingest, by result", ["result"])
SNAPSHOTS = Counter("hlbook_book_snapshots_total", "Node snapshots fetched, by purpose and result", ["purpose", "result"])
OUT_OF_SYNC = Counter("hlbook_book_out_of_sync_total", "Diffs that did not fit a book, by reason", ["reason"])
RESETS = Counter("hlbook_book_resets_total", "RESET messages published, by reason", ["reason"])
VALIDATIONS = Counter("hlbook_book_validations_total", "Validation rounds, by result (compared, skipped_height, failed)", ["result"])
MISMATCHES = Counter("hlbook_book_validation_mismatches_total", "Coins found different from the node's snapshot, by reason", ["reason"])
PUBLISHED = Counter("hlbook_book_published_total", "Messages published, by topic kind", ["kind"])
QUERIES = Counter("hlbook_book_queries_total", "Queries answered, by op and result", ["op", "result"])
INIT_RESTARTS = Counter("hlbook_book_init_restarts_total", "Initialisations started over")
JOBS = Counter("hlbook_book_jobs_total", "Forked child jobs (l4 renders, scans, validations), by kind and event", ["kind", "event"])
JOB_SECONDS = Histogram("hlbook_book_job_seconds", "Time from fork to a child's result", ["kind"],
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
L4_SNAPSHOTS = Counter("hlbook_book_l4_snapshots_total", "l4 snapshot requests: rendered in the loop (inline), "
                       "by a new child (forked) or answered by a render already under way (shared)", ["how"])
COINS_ADDED = Counter("hlbook_book_coins_added_total", "Coins that got orders without being in the snapshot (new listings, or a damaged coin name)")
CHECKPOINTS = Counter("hlbook_book_checkpoints_total", "L4 checkpoints written, by result", ["result"])
CHECKPOINT_BYTES = Gauge("hlbook_book_checkpoint_bytes", "Size of the last checkpoint written (compressed)")
