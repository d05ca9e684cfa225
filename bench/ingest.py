"""Ingest throughput: parse + join + publish on the real mainnet fixture,
replicated (block numbers renumbered) to at least --mb megabytes of order
statuses, against a baseline of a bare ``orjson.loads`` of the same lines
measured in the same run (file reading included in both).

    .venv/bin/python bench/ingest.py [--mb 200] [--users 10]

``--users`` subscribes that many per-user topics downstream (the busiest
users of the fixture), so per-user routing is part of the measured cost;
``--all-users`` subscribes the ``U|`` prefix (every user's events encoded).

Also printed: decoding the fixture's status lines alone, as ingest does
(``StatusHead``: orders left raw unless the status is not a rejection) against
decoding every order (``DECODERS["order_statuses"]``), best of 7 passes.
"""

from __future__ import annotations

import argparse
import re
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson
import zmq

from hlbook.common import nodefiles, topics
from hlbook.common.models import DECODERS, STATUS_HEADS, STREAMS
from hlbook.services.ingest.service import Ingest, IngestConfig

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "mainnet_btc_985148181_985148206.tar.gz"
HEIGHT = re.compile(rb'"block_number":(\d+)')


def replicate(src: Path, dst: Path, min_mb: int) -> tuple[int, int]:
    """Write the by-block fixture files again and again with fresh heights; return (first, last) height."""
    lines = {s: nodefiles.hour_files(src, s, "by-block")[0].read_bytes().splitlines(keepends=True) for s in STREAMS}
    first = int(HEIGHT.search(lines["order_statuses"][0]).group(1))
    per_copy = len(lines["order_statuses"])
    status_bytes = sum(map(len, lines["order_statuses"]))
    copies = max(1, -(-min_mb * 1_000_000 // status_bytes))
    when = time.gmtime(0)
    for stream, stream_lines in lines.items():
        out = nodefiles.stream_dir(dst, stream, "by-block") / time.strftime("%Y%m%d", when) / "0"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as fh:
            for copy in range(copies):
                for line in stream_lines:
                    height = int(HEIGHT.search(line, 0, 256).group(1)) + copy * per_copy
                    fh.write(HEIGHT.sub(b'"block_number":%d' % height, line, count=1))
    return first, first + copies * per_copy - 1


def baseline(data_dir: Path) -> tuple[float, int, int]:
    """Seconds to read and orjson.loads every line; status events; status bytes."""
    events = size = 0
    start = time.perf_counter()
    for stream in STREAMS:
        for path in nodefiles.hour_files(data_dir, stream, "by-block"):
            with open(path, "rb") as fh:
                for line in fh:
                    doc = orjson.loads(line)
                    if stream == "order_statuses":
                        events += len(doc["events"])
                        size += len(line)
    return time.perf_counter() - start, events, size


def decode_only(src: Path) -> tuple[float, float, int, float]:
    """(ms a line decoding every order, ms a line as ingest does, events a line, share of rejections)."""
    lines = nodefiles.hour_files(src, "order_statuses", "by-block")[0].read_bytes().splitlines()

    def best(decode: object) -> float:
        runs = []
        for _ in range(7):
            start = time.perf_counter()
            for line in lines:
                decode(line)  # type: ignore[operator]
            runs.append((time.perf_counter() - start) / len(lines))
        return min(runs) * 1000

    full = best(DECODERS["order_statuses"].decode)
    heads = best(lambda line: STATUS_HEADS.decode(line).resolve(None))
    events = [e for line in lines for e in STATUS_HEADS.decode(line).events]
    return full, heads, len(events) // len(lines), sum(e.rejected for e in events) / len(events)


def busiest_users(data_dir: Path, n: int) -> list[str]:
    path = nodefiles.hour_files(data_dir, "order_statuses", "by-block")[0]
    counts = Counter(re.findall(rb'"user":"(0x[0-9a-f]{40})"', path.read_bytes()))
    return [u.decode() for u, _ in counts.most_common(n)]


def run_ingest(data_dir: Path, first: int, last: int, users: list[str], all_users: bool = False) -> float:
    """Seconds for the real Ingest loop to read, join and publish every block."""
    tmp = tempfile.mkdtemp()
    cfg = IngestConfig(data_dir=str(data_dir), from_height=first, pub=f"ipc://{tmp}/pub", replay=f"ipc://{tmp}/replay")
    ctx = zmq.Context()
    ingest = Ingest(cfg, ctx)
    sub = ctx.socket(zmq.SUB)
    sub.connect(cfg.pub)
    for user in users:
        sub.subscribe(topics.user(user))
    if all_users:
        sub.subscribe(topics.USER_PREFIX)
    while ingest.subs.users != set(users) or (all_users and not ingest.subs.all_users):
        if ingest.pub.poll(100):  # wait for the subscriptions, reading nothing yet
            ingest.subs.handle(ingest.pub.recv())
    start = time.perf_counter()
    while ingest.store.head != last:
        ingest.step()
    elapsed = time.perf_counter() - start
    ingest.close()
    ctx.destroy(linger=0)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--all-users", action="store_true", help="a subscriber of every user topic (U| prefix)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        with tarfile.open(FIXTURE) as tar:
            tar.extractall(src, filter="data")
        first, last = replicate(src, dst, args.mb)
        users = busiest_users(src, args.users)
        base_s, events, size = baseline(dst)
        ingest_s = run_ingest(dst, first, last, users, args.all_users)
        full_ms, heads_ms, per_line, rejected = decode_only(src)
    blocks = last - first + 1
    followed = "every user" if args.all_users else f"{len(users)} users"
    print(f"data: {blocks} blocks, {events} status events, {size / 1e6:.0f} MB of status lines; {followed} followed")
    print(f"orjson.loads baseline : {events / base_s:>10,.0f} status events/s  {size / 1e6 / base_s:7.1f} MB/s")
    print(f"ingest parse+join+pub : {events / ingest_s:>10,.0f} status events/s  {size / 1e6 / ingest_s:7.1f} MB/s  {blocks / ingest_s:,.0f} blocks/s")
    print(f"ratio ingest/baseline : {base_s / ingest_s:.2f}")
    print(f"decoding a status line ({per_line} statuses, {rejected:.0%} rejections): every order {full_ms:.3f} ms, "
          f"as ingest does (rejections' orders left raw) {heads_ms:.3f} ms, ratio {heads_ms / full_ms:.2f}")


if __name__ == "__main__":
    main()
