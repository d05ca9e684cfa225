"""Prometheus metrics of the ingest service."""

from __future__ import annotations

from hlbook.common.metrics import Counter, Gauge

LINES = Counter("hlbook_ingest_lines_total", "Node lines read", ["stream"])
BAD_LINES = Counter("hlbook_ingest_bad_lines_total", "Node lines skipped, by reason", ["stream", "reason"])
FILE_EVENTS = Counter("hlbook_ingest_file_events_total", "Hourly file rotations and truncations", ["stream", "event"])
BLOCKS = Counter("hlbook_ingest_blocks_total", "Blocks published")
BLOCK_ANOMALIES = Counter(
    "hlbook_ingest_block_anomalies_total",
    "Blocks missing (gap), closed incomplete or by timeout, or lines arriving after their block closed (late_row, duplicate)",
    ["kind"],
)
MESSAGES = Counter("hlbook_ingest_messages_total", "Messages published, by topic kind", ["kind"])
UNPAIRED_FILLS = Counter("hlbook_ingest_unpaired_fills_total", "Fills whose tid had no counterpart in the block")
HEAD = Gauge("hlbook_ingest_head_height", "Height of the last published block")
WAITING = Gauge("hlbook_ingest_waiting_for_files", "1 while no node file was found where --data-dir and --mode say they are")
HEAD_TIME = Gauge("hlbook_ingest_head_time_seconds", "Block time (epoch s) of the last published block: the replay clock in hlbook replay")
LAG = Gauge("hlbook_ingest_lag_seconds", "Wall clock minus block time of the last published block")
BOOKS_DELAY = Gauge("hlbook_ingest_books_delay_seconds",
                    "Wall clock minus the node's local_time (when it wrote the block) as the last block's books went out: "
                    "hlbook's own delay, without the chain's (block time to the node's write)")
REPLAY_REQUESTS = Counter("hlbook_ingest_replay_requests_total", "Replay requests, by outcome", ["outcome"])
STALLED = Gauge("hlbook_ingest_stream_stalled", "1 while a stream is not waited for: it missed several blocks in a row", ["stream"])
USER_SUBSCRIPTIONS = Gauge("hlbook_ingest_user_subscriptions", "Per-user topics currently subscribed downstream")
REPLAY_END = Gauge("hlbook_ingest_replay_end_height", "A replay's last block (--until-height, or the last before --until-time once found)")
