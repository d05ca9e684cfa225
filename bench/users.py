"""Per-user streams: what 1,000 followed users cost per block, in ingest and in
the gateway, against the same blocks with nobody followed (the baseline, same
run, rounds alternated).

    .venv/bin/python bench/users.py [--source fixture|sim|both] [--users 1000] [--timed-blocks 1000]
        [--rounds 3] [--sim-blocks 100] [--sim-volume 3] [--feeds orderUpdates,userFills] [--sessions-per-user 1]

Blocks:

- ``fixture``: the 25 real mainnet blocks of ``mainnet_btc_985148181_985148206``
  (BTC only, ~990 statuses a block, 177 distinct users with statuses or
  fills), replayed with contiguous heights until ``--timed-blocks`` blocks
  (after one untimed pass). Following 1,000 users there means every user of
  the data (177) plus 823 who never appear, so every status of every block
  is routed to a followed user: the heaviest case these blocks allow.
- ``sim``: ``hlbook sim --blocks N --volume V`` (50 coins, 2,000 users) written
  as fast as it can, replayed likewise; the ``--users`` busiest of its users
  are followed.

Ingest side, in process, the real code:

- ``build``: ``MessageBuilder.build(block)`` (header, book slices, trades, and
  one ``UserEvents`` per followed user with events in the block).
- ``publish``: ``Ingest.publish(block)`` of a real ``Ingest`` (build, XPUB
  sends over ipc, replay store, metrics). A SUB connected to its XPUB
  subscribes ``H|``, ``B|``, ``T|`` (what shards and gateways always take) and,
  in the followed run, ``U|<user>|`` of every followed user; ingest learns them
  from its XPUB exactly as in its poll loop. The SUB is drained between blocks,
  outside the timed region; what it received is the gateway side's input.

Gateway side, in process: a real ``Hub`` (no sockets: a stub upstream that
only counts subscriptions) with ``--sessions-per-user`` real ``Session``
objects per followed user, each subscribed to ``--feeds`` through the
protocol's own normalise / feed key / attach path. Per block the hub gets,
through ``Hub.on_message`` (msgpack decode, ``prev`` check, dispatch): the
block's ``T|`` messages, one ``S|0|`` ShardBlock (mids and states of every coin
of the source: what a one-shard gateway always gets), and in the followed run
the block's ``U|`` messages. Each feed's text is encoded once and queued to its
sessions' outboxes; the outboxes are emptied between blocks outside the timed
region (the WebSocket write of each text is not measured here: see
``bench/gateway.py`` for fan-out over real sockets).

Printed per side: mean and p99 µs per block without and with the followed
users, the ratio and the µs the users add per block; the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import zmq

from hlbook.common import topics, wire
from hlbook.common.models import block_time_ms
from hlbook.services.gateway.hub import Hub
from hlbook.services.gateway.kinds import feed_key, normalise
from hlbook.services.gateway.protocol import identity
from hlbook.services.gateway.session import Session, SubscriptionStats
from hlbook.services.gateway.users import Users
from hlbook.services.ingest.joiner import Block
from hlbook.services.ingest.messages import MessageBuilder, Subscriptions
from hlbook.services.ingest.offline import read_blocks
from hlbook.services.ingest.service import Ingest, IngestConfig

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "mainnet_btc_985148181_985148206.tar.gz"
FIXTURE_RANGE = (985148182, 985148206)

Message = tuple[bytes, bytes]


# ------------------------------------------------------------------ blocks


def fixture_blocks(tmp: Path) -> list[Block]:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp, filter="data")
    return [b for b in read_blocks(tmp) if FIXTURE_RANGE[0] <= b.height <= FIXTURE_RANGE[1]]


def sim_blocks(tmp: Path, n: int, volume: float) -> list[Block]:
    subprocess.run(
        [sys.executable, "-m", "hlbook.cli", "sim", "--data-dir", str(tmp), "--blocks", str(n), "--volume", str(volume),
         "--blocks-per-sec", "100000", "--info-port", "-1", "--seed", "1", "--start-height", "1000000",
         "--start-time", "2026-01-01T00:00:00", "--partial-write-p", "0", "--log-level", "WARNING"],
        check=True,
    )
    return list(read_blocks(tmp))


def repeat(blocks: list[Block], reps: int) -> list[Block]:
    """``blocks`` ``reps`` times, renumbered to contiguous heights (lists shared, not copied)."""
    first = blocks[0].height
    return [dataclasses.replace(b, height=first + k * len(blocks) + i) for k in range(reps) for i, b in enumerate(blocks)]


def busiest(blocks: list[Block], n: int) -> tuple[list[str], int]:
    """The ``n`` users with the most statuses and fills (padded with users absent from the data); how many are present."""
    counts = Counter(s.user for b in blocks for s in b.statuses)
    counts.update(u for b in blocks for u, _ in b.fills)
    users = [u for u, _ in counts.most_common(n)]
    present = len(users)
    users += [f"0x{0xbe7c4 << 120 | i:040x}" for i in range(n - present)]
    return users, present


# ------------------------------------------------------------------ ingest side


def time_build(blocks: list[Block], users: list[str]) -> list[float]:
    builder = MessageBuilder(Subscriptions(users))
    out = []
    for block in blocks:
        t0 = time.perf_counter()
        builder.build(block)
        out.append(time.perf_counter() - t0)
    return out


def drain(sub: zmq.Socket, into: list[Message] | None, wait_ms: int = 0) -> None:
    while sub.poll(wait_ms):
        while True:
            try:
                topic, payload = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if into is not None:
                into.append((topic, payload))


def time_publish(blocks: list[Block], warm: list[Block], users: list[str], tmp: Path) -> tuple[list[float], list[Message]]:
    """Seconds of ``Ingest.publish`` per block; the messages a subscriber got (timed blocks only)."""
    (tmp / "node").mkdir(exist_ok=True)
    ctx = zmq.Context()
    cfg = IngestConfig(data_dir=str(tmp / "node"), pub=f"ipc://{tmp}/pub", replay=f"ipc://{tmp}/replay")
    ingest = Ingest(cfg, ctx)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SNDHWM, 0)  # a SUB silently drops subscriptions past its SNDHWM (1000 by default)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(cfg.pub)
    wanted = [topics.HEADER, topics.BOOK_PREFIX, topics.TRADES_PREFIX, *(topics.user(u) for u in users)]
    for topic in wanted:
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    events = 0
    while events < len(wanted):  # as Ingest.step does: XPUB events into the subscription set
        assert ingest.pub.poll(10_000), "subscriptions never reached the XPUB"
        ingest.subs.handle(ingest.pub.recv())
        events += 1
    assert len(ingest.subs.users) == len(users)
    for block in warm:
        ingest.publish(block)
        drain(sub, None)
    drain(sub, None, 200)
    seconds, got = [], []
    for block in blocks:
        t0 = time.perf_counter()
        ingest.publish(block)
        seconds.append(time.perf_counter() - t0)
        drain(sub, got)
    drain(sub, got, 500)
    sub.close()
    ingest.close()
    ctx.term()
    return seconds, got


# ------------------------------------------------------------------ gateway side


class StubUpstream:
    """What Hub needs of Upstream, without sockets."""

    shards = 1
    has_history = False  # userFills snapshots are empty

    def __init__(self) -> None:
        self.counts: Counter[bytes] = Counter()

    def subscribe(self, topic: bytes) -> None:
        self.counts[topic] += 1

    def unsubscribe(self, topic: bytes) -> None:
        self.counts[topic] -= 1


async def _never(text: str) -> None:  # sessions are never written to: outboxes are emptied between blocks
    raise AssertionError("not sent in this bench")


def gateway_input(received: list[Message], blocks: list[Block], coins: dict[str, str], with_users: bool) -> list[list[Message]]:
    """Per block: its T| (and U|) messages as ingest sent them, then the shard's S|0| ShardBlock."""
    per_block: dict[int, list[Message]] = {b.height: [] for b in blocks}
    height = None
    for topic, payload in received:
        if topic == topics.HEADER:
            height = wire.decode(payload)["height"]
        elif topic.startswith(topics.TRADES_PREFIX) or (with_users and topic.startswith(topics.USER_PREFIX)):
            per_block[height].append((topic, payload))
    prev = None
    out = []
    for block in blocks:
        shard = wire.ShardBlock(block.height, prev, block_time_ms(block.block_time), 0, coins, dict.fromkeys(coins, "live"))
        prev = block.height
        out.append([*per_block[block.height], (topics.shard_block(0), wire.encode(shard))])
    return out


def time_gateway(messages: list[list[Message]], users: list[str], feeds: list[str], per_user: int, warm: int) -> tuple[list[float], int]:
    """Seconds of Hub.on_message work per block (after ``warm`` blocks); texts queued to sessions."""
    return asyncio.run(_time_gateway(messages, users, feeds, per_user, warm))  # the hub schedules on the running loop


async def _time_gateway(messages: list[list[Message]], users: list[str], feeds: list[str], per_user: int, warm: int) -> tuple[list[float], int]:
    hub = Hub(StubUpstream(), Users(max_users=max(len(users), 1)))  # type: ignore[arg-type]
    sessions = []
    for user in users:
        for _ in range(per_user):
            session = Session("bench", _never, queue_size=1 << 30, max_per_minute=2000)
            for kind in feeds:
                norm = normalise({"type": kind, "user": user}, hub.coin_exists)
                ident, key = identity(norm), feed_key(norm)
                hub.check(key)
                session.subs[ident] = SubscriptionStats(norm, key)
                hub.attach(session, ident, key)
            sessions.append(session)
    for _ in range(3):  # the userFills joiners get their (empty) snapshots
        await asyncio.sleep(0)
    for session in sessions:
        session.outbox.clear()
        session.texts = 0
    seconds, texts = [], 0
    for i, block in enumerate(messages):
        t0 = time.perf_counter()
        for topic, payload in block:
            hub.on_message(topic, payload)
        elapsed = time.perf_counter() - t0
        for session in sessions:
            if i >= warm:
                texts += session.texts
            session.outbox.clear()
            session.texts = 0
            session.latest.clear()
        if i >= warm:
            seconds.append(elapsed)
    assert all(not s.closing for s in sessions)
    return seconds, texts


# ------------------------------------------------------------------ report


def stats(seconds: list[float]) -> tuple[float, float]:
    us = sorted(s * 1e6 for s in seconds)
    return statistics.fmean(us), us[min(len(us) - 1, int(len(us) * 0.99))]


def coins_of(blocks: list[Block]) -> dict[str, str]:
    """Every coin of the source with a mid (the first diff price seen: only the count matters here)."""
    mids: dict[str, str] = {}
    for block in blocks:
        for diff in block.diffs:
            mids.setdefault(diff.coin, diff.px)
    return mids


def run_source(name: str, base: list[Block], args: argparse.Namespace, tmp: Path) -> None:
    users, present = busiest(base, args.users)
    reps = -(-args.timed_blocks // len(base))
    seq = repeat(base, reps + 1)
    warm, timed = seq[: len(base)], seq[len(base) :]
    coins = coins_of(base)
    statuses = sum(len(b.statuses) for b in base) / len(base)
    fills = sum(len(b.fills) for b in base) / len(base)
    print(f"\n{name}: {len(base)} blocks x {reps} (+1 untimed pass), {statuses:.0f} statuses, {fills:.1f} fills, "
          f"{len(coins)} coins a block; {len(users)} users followed, {present} of them in the data")
    rows: dict[str, dict[int, list[tuple[float, float]]]] = {"ingest build": {}, "ingest publish": {}, "gateway": {}}
    user_messages = texts_per_block = 0.0
    for round_ in range(args.rounds):
        for followed in ([], users) if round_ % 2 == 0 else (users, []):
            n = len(followed)
            gc.collect()
            rows["ingest build"].setdefault(n, []).append(stats(time_build(timed, followed)))
            seconds, received = time_publish(timed, warm, followed, Path(tempfile.mkdtemp(dir=tmp)))
            rows["ingest publish"].setdefault(n, []).append(stats(seconds))
            # the gateway gets what the subscriber got: T| (and U| when followed), plus a shard block;
            # its first len(base) blocks warm it up, untimed
            gw_input = gateway_input(received, timed, coins, bool(n))
            seconds, texts = time_gateway(gw_input, followed, args.feeds, args.sessions_per_user, len(base))
            rows["gateway"].setdefault(n, []).append(stats(seconds))
            if n:
                user_messages = sum(1 for t, _ in received if t.startswith(topics.USER_PREFIX)) / len(timed)
                texts_per_block = texts / len(seconds)
    print(f"  {user_messages:.1f} U| messages a block from ingest; gateway: {len(args.feeds)} feeds x {args.sessions_per_user} "
          f"session(s) per user ({', '.join(args.feeds)}), {texts_per_block:.1f} texts queued a block; "
          f"gateway with 0 users: the block's T| and one S|0|")
    n = len(users)
    print(f"  {'side':<16} {'0 users µs/block':>18} {f'{n} users µs/block':>21} {'ratio':>7} {'added µs/block':>15}   p99 0 / {n} users")
    for side, by_n in rows.items():
        base_mean = statistics.median(m for m, _ in by_n[0])
        base_p99 = statistics.median(p for _, p in by_n[0])
        with_mean = statistics.median(m for m, _ in by_n[n])
        with_p99 = statistics.median(p for _, p in by_n[n])
        print(f"  {side:<16} {base_mean:>18.1f} {with_mean:>21.1f} {with_mean / base_mean:>7.2f} {with_mean - base_mean:>15.1f}"
              f"   {base_p99:.0f} / {with_p99:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=("fixture", "sim", "both"), default="both")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--timed-blocks", type=int, default=1000, help="blocks timed per run (the source's blocks replayed)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated 0-user / followed runs; medians printed")
    parser.add_argument("--sim-blocks", type=int, default=100)
    parser.add_argument("--sim-volume", type=float, default=3.0)
    parser.add_argument("--feeds", type=lambda s: s.split(","), default=["orderUpdates", "userFills"])
    parser.add_argument("--sessions-per-user", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.source in ("fixture", "both"):
            (tmp / "fixture").mkdir()
            run_source("fixture mainnet_btc_985148181_985148206", fixture_blocks(tmp / "fixture"), args, tmp)
        if args.source in ("sim", "both"):
            (tmp / "sim").mkdir()
            blocks = sim_blocks(tmp / "sim", args.sim_blocks, args.sim_volume)
            run_source(f"hlbook sim --blocks {args.sim_blocks} --volume {args.sim_volume}", blocks, args, tmp)


if __name__ == "__main__":
    main()
