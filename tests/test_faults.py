"""The fault suite: `hlbook up --simulate`, processes killed while blocks flow, and
what clients get compared with what the node wrote.

- ingest SIGKILLed (twice) and a shard SIGKILLed: the supervisor restarts them;
  ingest resumes after the last block it published, so a client subscribed to
  every coin's trades gets each trade of the node's fills files exactly once,
  none lost, none doubled, across the kills;
- recovery times stay under stated bounds (printed: `pytest -s` shows them);
- afterwards every shard's books equal the simulator's own state at their height.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import websockets
import zmq
from websockets.sync.client import connect

from hlbook.common import nodefiles, wire
from hlbook.common.models import DECODERS
from hlbook.services.book.book import Book
from pipeline import http_get, post_info, running
from test_book_sim import advance, normal

INGEST_BACK = 10.0  # seconds from killing ingest to blocks reaching clients again (restart backoff 0.5 s + start)
SHARD_BACK = 30.0  # seconds from killing a shard to its books live again (snapshot + replay)


def child_pid(up: Any, command: str, *flag: str) -> int:
    """The pid of the `hlbook up` child running ``hlbook <command> [flags]``."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            args = (p / "cmdline").read_bytes().split(b"\0")
            stat = (p / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        if parent == up.proc.pid and b"hlbook.cli" in args and args[args.index(b"hlbook.cli") + 1] == command.encode():
            if all(f.encode() in args for f in flag):
                return int(p.name)
    raise AssertionError(f"no {command} {flag} child")


def node_coins(up: Any) -> list[str]:
    """Every coin of the node (the simulator's snapshot), whatever its book: allMids lists only
    those with a mid at that moment."""
    return sorted(_sim_snapshot(up)[1])


def block_age(up: Any) -> float | None:
    status, body = http_get(f"{up.http}/ready")
    return body.get("block_age_s") if isinstance(body, dict) else None


def wait(condition: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - start


class NodeTrade(NamedTuple):
    """A trade as the node's fills files hold it."""

    coin: str
    px: str
    height: int
    time: int  # ms


def node_trades(data: Path) -> dict[int, NodeTrade]:
    """tid -> the trade, for every trade (crossed fill) in the node's fills files."""
    trades: dict[int, NodeTrade] = {}
    for path in nodefiles.hour_files(data, "fills", "by-block"):
        for raw in path.read_bytes().splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                continue
            line = DECODERS["fills"].decode(raw)
            for _, fill in line.events:
                if fill.crossed:
                    trades[fill.tid] = NodeTrade(fill.coin, fill.px, line.block_number, fill.time)
    return trades


def expected_trades(data: Path, first_ms: int, last_ms: int) -> dict[int, NodeTrade]:
    """Every trade in the node's fills files with a time in [first_ms, last_ms], by tid."""
    return {tid: t for tid, t in node_trades(data).items() if first_ms <= t.time <= last_ms}


class TradesClient:
    """A WebSocket client on every coin's trades, in a thread: each trade with the wall time it came."""

    def __init__(self, up: Any, coins: list[str]) -> None:
        self.up, self.coins = up, coins
        self.got: list[tuple[float, dict[str, Any]]] = []
        self.errors: list[tuple[float, str]] = []  # the gateway's error messages (a gap it could not repair)
        self.notes: list[str] = []  # what the test did meanwhile (kills), for a failure's message
        self.subscribed: float | None = None  # when every subscription was answered (wall clock)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)
        self.thread.start()

    async def _listen(self) -> None:
        async with websockets.connect(self.up.ws, max_size=None) as ws:
            for coin in self.coins:
                await ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "trades", "coin": coin}}))
            answered = 0
            while not self.stop.is_set():
                try:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
                except TimeoutError:
                    continue
                if message["channel"] == "subscriptionResponse":
                    answered += 1
                    if answered == len(self.coins):
                        self.subscribed = time.time()
                elif message["channel"] == "trades":
                    now = time.time()
                    self.got.extend((now, t) for t in message["data"])
                elif message["channel"] == "error":
                    self.errors.append((time.time(), message["data"]))

    def close(self) -> list[dict[str, Any]]:
        self.stop.set()
        self.thread.join(5)
        return [t for _, t in self.got]


def compare_with_node(client: TradesClient, data: Path) -> int:
    """Every trade of the node's fills files over the window the client listened (from half a
    second after its subscriptions were answered), exactly once, with its coin and price; returns
    how many were compared."""
    got = client.close()
    assert got and client.subscribed is not None, "no trade received"
    tids = [t["tid"] for t in got]
    twice = [tid for tid, n in Counter(tids).items() if n > 1]
    assert not twice, f"{len(twice)} trades delivered twice\n{_explain(client, data, twice)}"
    times = sorted({t["time"] for t in got})
    first = max(times[0], int(client.subscribed * 1000) + 500)  # a subscription takes a moment to reach ingest
    window = [t for t in got if first <= t["time"] < times[-1]]  # the last block's trades may still have been on their way
    tids = [t["tid"] for t in window]
    want = expected_trades(data, first, times[-2])
    lost = sorted(set(want) - set(tids))
    assert not lost, f"lost {len(lost)} of {len(want)}\n{_explain(client, data, lost)}"
    extra = sorted(set(tids) - set(want))
    assert not extra, f"extra {len(extra)}\n{_explain(client, data, extra)}"
    assert all((t["coin"], t["px"]) == want[t["tid"]][:2] for t in window)
    return len(want)


LOGGED = (b" WARNING ", b" ERROR ", b"resuming after", b"replay store", b"exited with")


def _explain(client: TradesClient, data: Path, tids: list[int]) -> str:
    """What a failure needs to tell its cause: each trade (coin, block, time), the trades of
    its coin the client got around it, the error messages the client got, and the warnings
    and restarts of the processes (hlbook up's log), those naming its coins' topics first."""
    node = node_trades(data)
    got = {t["tid"]: at for at, t in client.got}
    lines = []
    for tid in tids[:20]:
        t = node.get(tid)
        if t is None:
            lines.append(f"  tid {tid}: not in the node's fills files")
            continue
        mine = sorted(node[x].height for x in got if x in node and node[x].coin == t.coin)
        before = [h for h in mine if h < t.height][-3:]
        after = [h for h in mine if h > t.height][:3]
        lines.append(f"  tid {tid}: {t.coin} block {t.height} time {t.time} got {tid in got}; the client got {len(mine)} "
                     f"{t.coin} trades in all, of blocks ..{before} [{t.height}] {after}..")
    coins = {node[tid].coin for tid in tids if tid in node}
    lines.append(f"client subscribed at {client.subscribed} to the trades of {client.coins}; errors it got: {client.errors[:10]}")
    lines += client.notes
    log = (client.up.tmp / "up.log").read_bytes().splitlines()
    named = [line for line in log if any(f"T|{coin}|".encode() in line for coin in coins)]
    said = [line for line in log if any(w in line for w in LOGGED)]
    lines += ["log lines naming their coins' trades:", *(f"  {line[:300]!r}" for line in named[:30])]
    lines += ["warnings, errors, restarts:", *(f"  {line[:300]!r}" for line in said[:80])]
    return "\n".join(lines)


def test_killed_processes_lose_no_trade_and_books_come_back_equal(tmp_path: Path) -> None:
    with running(tmp_path, shards=2, coins=8, seed=11) as up:
        coins = node_coins(up)
        client = TradesClient(up, coins)
        time.sleep(3)

        figures = {}
        for round_ in (1, 2):  # ingest, twice
            os.kill(child_pid(up, "ingest"), signal.SIGKILL)
            killed = time.monotonic()
            wait(lambda: (block_age(up) or 0) > 0.3, 5, "blocks stopping")  # blocks are written while it is down
            wait(lambda: (block_age(up) or 1) < 0.2, INGEST_BACK, "blocks after the ingest kill")
            figures[f"ingest kill {round_}: blocks reach clients again after (s)"] = time.monotonic() - killed
            time.sleep(2)
        os.kill(child_pid(up, "book", "--shard", "0"), signal.SIGKILL)
        killed = time.monotonic()
        wait(lambda: http_get(f"{up.http}/ready?fresh=1")[0] == 503 or time.monotonic() - killed > 6, 10, "the shard seen down")
        wait(lambda: http_get(f"{up.http}/ready?fresh=1")[0] == 200, SHARD_BACK, "the shard back")  # every shard live
        figures["shard kill: every shard live again after (s)"] = time.monotonic() - killed
        time.sleep(3)

        # every trade of the node files, in the window the client listened, exactly once
        figures["trades compared with the node files"] = compare_with_node(client, up.data)

        # the books: equal to the simulator's own state, moved to each shard's height
        base, truth = _sim_snapshot(up)
        ctx = zmq.Context()
        for k in range(2):
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(f"ipc://{up.sockets}/book-{k}-query")
            for coin in [c for c in coins if _owner(c) == k]:
                mine = _l4(dealer, coin)
                book = advance(up.data, truth.get(coin) or Book(coin, base), base, mine["height"])
                assert normal(mine["levels"]) == normal(book.l4_levels()), coin
        ctx.destroy(linger=0)
        for name, value in figures.items():
            print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}: {value}")


class FillsWatch:
    """The simulator's by-block fills lines, read as it appends them."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.path = nodefiles.hour_files(data, "fills", "by-block")[-1]
        self.offset = self.path.stat().st_size
        self.partial = b""

    def poll(self) -> list[dict[str, Any]]:
        """The lines appended since the last call (a newer hourly file once this one is read)."""
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        self.offset += len(data)
        if not data and (newest := nodefiles.hour_files(self.data, "fills", "by-block")[-1]) != self.path:
            self.path, self.offset, self.partial = newest, 0, b""
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [json.loads(line) for line in lines if line]


def running_ingest(up: Any) -> int:
    """Ingest's pid (looked for again a few times: a /proc scan may miss a process)."""
    for _ in range(50):
        try:
            return child_pid(up, "ingest")
        except AssertionError:
            time.sleep(0.1)
    return child_pid(up, "ingest")


def kill_ingest_at(up: Any, watch: FillsWatch, wanted: Any, delay: float, first: Any = None) -> dict[str, Any]:
    """SIGKILL ingest ``delay`` s after the simulator appends a fills line ``wanted`` accepts
    (``first``: called just before); returns that line."""
    pid = running_ingest(up)
    watch.poll()  # lines written before this call are not waited for
    deadline = time.monotonic() + 10
    while True:
        for row in watch.poll():
            if wanted(row):
                time.sleep(delay)
                if first is not None:
                    first()
                os.kill(pid, signal.SIGKILL)
                return row
        assert time.monotonic() < deadline, "no such fills line within 10 s"
        time.sleep(0.0005)


def ingest_starts(up: Any) -> int:
    """How many times ingest said it started publishing (``hlbook up``'s log)."""
    return (up.tmp / "up.log").read_bytes().count(b"publishing on")


def test_ingest_killed_at_varied_moments_loses_no_trade_of_any_coin(tmp_path: Path) -> None:
    """Every coin's trades (perps and spot), ingest SIGKILLed three times at different moments of
    a block's handling: as soon as a block's fills line is written (being read or published), 50 ms
    later (published, maybe still queued), and 2 ms into catching up (stopped while the simulator
    wrote blocks) once the simulator wrote a trade of the least active coin, the simulator then
    paused so that no later block can make that coin trade again before the restart (resumed once
    ingest is back: the trade must come within a second, whatever that coin does next). Compared trade by trade with the node's
    fills files: none lost, none twice."""
    with running(tmp_path, shards=2, coins=12, seed=7) as up:
        coins = node_coins(up)
        assert any(c.startswith("@") or "/" in c for c in coins) and "BTC" in coins, coins  # spot and perps
        client = TradesClient(up, coins)
        time.sleep(2)
        watch = FillsWatch(up.data)
        figures: dict[str, Any] = {}
        for n, delay in enumerate((0.0, 0.05), 1):
            killed = time.monotonic()
            row = kill_ingest_at(up, watch, lambda row: bool(row["events"]), delay)
            client.notes.append(f"kill {n} at {time.time():.3f}, {delay * 1000:.0f} ms after the fills line of block {row['block_number']}")
            wait(lambda: (block_age(up) or 0) > 0.3, 5, "blocks stopping")
            wait(lambda: (block_age(up) or 1) < 0.2, INGEST_BACK, "blocks after the ingest kill")
            figures[f"kill {n} ({delay * 1000:.0f} ms after a fills line): blocks again after (s)"] = time.monotonic() - killed
            time.sleep(1)

        counts = Counter(t["coin"] for _, t in client.got)
        quiet = min((c for c in coins if counts[c]), key=lambda c: counts[c])
        sim, ingest = child_pid(up, "sim"), running_ingest(up)
        starts = ingest_starts(up)
        os.kill(ingest, signal.SIGSTOP)  # the block is written while ingest waits: killed as it catches up
        row = kill_ingest_at(up, watch, lambda r: any(f["coin"] == quiet and f["crossed"] for _, f in r["events"]), 0.0,
                             lambda: (os.kill(sim, signal.SIGSTOP), os.kill(ingest, signal.SIGCONT), time.sleep(0.002)))
        killed = time.time()
        client.notes.append(f"kill 3 at {killed:.3f}, catching up, the node paused after block {row['block_number']} "
                            f"(a trade of the quiet coin {quiet})")
        try:
            wait(lambda: ingest_starts(up) > starts, INGEST_BACK, "ingest restarted")
            time.sleep(0.5)
        finally:
            os.kill(sim, signal.SIGCONT)
        resumed = time.time()
        tids = {f["tid"] for _, f in row["events"] if f["coin"] == quiet and f["crossed"]}
        wait(lambda: tids <= {t["tid"] for _, t in client.got}, 5, f"the quiet coin {quiet}'s trades of block {row['block_number']}")
        came = max(at for at, t in client.got if t["tid"] in tids) - resumed
        time.sleep(2)
        figures[f"quiet coin {quiet} ({counts[quiet]} trades before): its trade came after the node resumed (s)"] = came
        figures["  it came before the kill"] = came < killed - resumed
        later = [t["time"] for _, t in client.got if t["coin"] == quiet and t["tid"] not in tids and t["time"] > row["events"][0][1]["time"]]
        figures[f"  its next trade, block time after the resume (s)"] = (min(later) / 1000 - resumed) if later else None
        assert came < 1.0, f"{quiet}'s trade of block {row['block_number']} came {came:.2f} s after the node resumed"

        figures["trades compared with the node files"] = compare_with_node(client, up.data)
        for name, value in figures.items():
            print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}: {value}")


def _errors(ws: Any, seconds: float) -> list[str]:
    """The ``error`` messages a client gets within ``seconds``."""
    said: list[str] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = json.loads(ws.recv(timeout=left))
        except TimeoutError:
            break
        if message["channel"] == "error":
            said.append(message["data"])
    return said


def _append(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def test_a_dropped_fills_line_is_told_to_the_trades_clients_it_concerned(tmp_path: Path) -> None:
    """Lines appended to the node's live fills file: one timed 2100 with a fill of one coin (dropped,
    ``future_time``) tells that coin's trades subscribers alone, once; an unreadable one
    (``malformed``: its coins unknown) tells every trades subscriber, once."""
    with running(tmp_path, shards=1, coins=4, seed=3, env={"HLBOOK_PARTIAL_WRITE_P": "0"}) as up:
        quiet, named = sorted(post_info(up.http, {"type": "allMids"})[1])[:2]
        with connect(up.ws, open_timeout=10) as ws:
            for coin in (quiet, named):
                ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "trades", "coin": coin}}))
            time.sleep(1)
            files = nodefiles.hour_files(up.data, "fills", "by-block")
            path = files[-1]
            lines = [line for f in files for line in f.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")]
            row = next(r for r in map(json.loads, reversed(lines)) if r["events"])
            user, fill = row["events"][0]
            future = "2100-01-01T00:00:00.000000000"
            _append(path, json.dumps({**row, "local_time": future, "block_time": future, "block_number": row["block_number"] + 1,
                                      "events": [[user, {**fill, "coin": named, "time": 4102444800000}]]}).encode() + b"\n")
            said = _errors(ws, 3)
            assert len(said) == 1 and said[0].startswith(f"trades {named}: ") and "(future_time)" in said[0], said
            _append(path, b'{"local_time": garbage\n')
            said = _errors(ws, 3)
            assert sorted(s.split(":")[0] for s in said) == [f"trades {quiet}", f"trades {named}"], said
            assert all("(malformed)" in s for s in said), said


def _owner(coin: str) -> int:
    from hlbook.common.topics import shard_of

    return shard_of(coin, 2)


def _l4(dealer: zmq.Socket, coin: str) -> dict[str, Any]:
    dealer.send_multipart([b"", wire.encode(wire.L4Query(coin=coin))])
    assert dealer.poll(10_000), f"no l4 answer for {coin}"
    header, *levels = dealer.recv_multipart()[1:]
    reply = msgspec.msgpack.decode(header)
    reply["levels"] = json.loads(b"".join(levels))
    return reply


def _sim_snapshot(up: Any) -> tuple[int, dict[str, Book]]:
    import tempfile

    from hlbook.services.book import snapshot

    with tempfile.TemporaryDirectory() as tmp:
        return snapshot.load(snapshot.fetch(up.sim_info, timeout=10, directory=tmp))


BIG_TRADES = 20_000  # ~13 MB of fills line: a few seconds of work before the fixes of issue 23 (finding 7)
BIG_TID = 1 << 62  # the big line's tids from here


def _big_fills(coin: str, height: int, block_time: str, ms: int) -> bytes:
    """A valid fills line of block ``height``: ``BIG_TRADES`` trades of ``coin`` (a taker buyer, a resting seller)."""
    fill = {"coin": coin, "px": "100.5", "sz": "0.01", "time": ms, "startPosition": "0.0", "dir": "Open Long", "closedPnl": "0.0",
            "hash": "0x" + "cd" * 32, "fee": "0.001", "feeToken": "USDC"}
    events = []
    for i in range(BIG_TRADES):
        tid = BIG_TID + i
        events += [[f"0x{i:040x}", {**fill, "side": "B", "oid": tid, "crossed": True, "tid": tid}],
                   [f"0x{i + 1:040x}", {**fill, "side": "A", "oid": tid + 1, "crossed": False, "tid": tid}]]
    line = {"local_time": block_time, "block_time": block_time, "block_number": height, "events": events}
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def _last_line(path: Path) -> dict[str, Any]:
    """The last complete line of a node file, decoded."""
    line = nodefiles.last_line(path)[1]
    assert line is not None, f"{path}: no complete line"
    return dict(json.loads(line))


def _inject_fills(path: Path, coin: str) -> None:
    """Append the big fills line as a block's, right after the simulator wrote the one before it (when
    the simulator's own line of that block came first, ours is a duplicate, dropped: the caller tries again)."""
    last = _last_line(path)
    height = last["block_number"] + 10
    line = _big_fills(coin, height, *nodefiles_time(last["block_time"], 1.0))
    while _last_line(path)["block_number"] < height - 1:
        time.sleep(0.0005)
    _append(path, line)


def test_a_huge_fills_line_reaches_every_trade_and_other_coins_keep_flowing(tmp_path: Path) -> None:
    """A valid fills line of 20,000 trades of one coin, appended as a block's line to the node's live
    fills file (the simulator's own line of that block then comes as a duplicate): every trade of it
    reaches the coin's trades subscriber once and in order, and the other coins' bbo keep coming
    (no pause of the whole feed)."""
    with running(tmp_path, shards=1, coins=4, seed=5) as up:
        coins = sorted(post_info(up.http, {"type": "allMids"})[1])
        big, others = coins[0], coins[1:]
        got: list[dict[str, Any]] = []
        bbo_at: list[float] = []
        with connect(up.ws, open_timeout=10, max_size=None) as ws:
            for coin in coins:
                kind = "trades" if coin == big else "bbo"
                ws.send(json.dumps({"method": "subscribe", "subscription": {"type": kind, "coin": coin}}))
            time.sleep(1)
            path = nodefiles.hour_files(up.data, "fills", "by-block")[-1]
            for _ in range(3):  # again when ours came after the simulator's line of its block (a duplicate)
                _inject_fills(path, big)
                appended = time.monotonic()
                deadline = appended + 15
                while time.monotonic() < deadline and sum(t["tid"] >= BIG_TID for t in got) < BIG_TRADES:
                    try:
                        message = json.loads(ws.recv(timeout=1))
                    except TimeoutError:
                        continue
                    if message["channel"] == "trades":
                        got += message["data"]
                    elif message["channel"] == "bbo" and message["data"]["coin"] in others:
                        bbo_at.append(time.monotonic())
                if any(t["tid"] >= BIG_TID for t in got):
                    break
                bbo_at.clear()
        tids = [t["tid"] for t in got if t["tid"] >= BIG_TID]
        assert tids == [BIG_TID + i for i in range(BIG_TRADES)], f"{len(tids)} of {BIG_TRADES} trades, in order"
        gaps = [b - a for a, b in zip([appended, *bbo_at], bbo_at)]
        print(f"big fills line: {BIG_TRADES:,} trades in {time.monotonic() - appended:.2f} s; other coins' longest bbo gap "
              f"{max(gaps):.2f} s")
        assert max(gaps) < 3.0, f"the other coins' bbo paused {max(gaps):.2f} s"


def nodefiles_time(block_time: str, ahead_s: float) -> tuple[str, int]:
    """A node block time ``ahead_s`` after ``block_time``, and its epoch ms."""
    from datetime import datetime, timedelta, timezone

    when = datetime.fromisoformat(block_time[:26]).replace(tzinfo=timezone.utc) + timedelta(seconds=ahead_s)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000", int(when.timestamp() * 1000)
