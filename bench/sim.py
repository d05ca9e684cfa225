"""The node simulator's cost: can ``hlbook sim`` keep up live, and does its book stay put?

    .venv/bin/python bench/sim.py                      # --profile full, 10,000 blocks of stability
    .venv/bin/python bench/sim.py --quick              # 2,000 blocks, shorter speed and live phases

Prints, for one profile (default ``full``: every market of mainnet):

1. speed: CPU per block of ``Simulator.step`` (matching, order flow and the
   events encoded as they are made), of the writer's line assembly (user CPU of
   ``NodeWriter.write_block``) and of the kernel's writing (its system CPU), and
   the blocks a second one core achieves; the rejections' share of ``step``
   (``Senders.render`` replayed on the same run lengths).
2. baselines, measured in the same run: the code of ``--baseline-rev`` (default:
   main before the simulator was made live, loaded from git) on the same
   profile and seed, and the cost of only writing the same bytes.
3. live: ``NodeSim`` in this process for ``--live-seconds`` at the profile's
   rate: blocks a second written, CPU a block, ``local_time - block_time`` of
   the lines written, and whether it logged falling behind.
4. stability: resting orders every 1,000 blocks over ``--blocks``, and the
   largest deviation from the start.

CPU is this process's user + system time (resource.getrusage), not wall time:
the machine may be shared. Files go to a temporary directory, removed as it
goes (the whole market writes ~3.9 MB a block).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASELINE_REV = "7ac4834"  # main before issue 20 (simulator live): ~4 blocks/s on the whole market
START = datetime(2026, 5, 5, 17, 0, tzinfo=timezone.utc)
DISK_BLOCKS = 40  # blocks written to a directory before it is removed (the disk holds ~160 MB at most)


def cpu() -> tuple[float, float]:
    """(user, system) CPU seconds of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def thread_cpu(tid: int) -> float:
    """User + system CPU seconds of one thread of this process (/proc, clock ticks)."""
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ms(seconds: float, blocks: int) -> float:
    return seconds / max(blocks, 1) * 1000


class Speed:
    """CPU of blocks made by ``step`` and written by a writer from ``make_writer`` into a scratch directory."""

    def __init__(self, step: Callable[[], Any], make_writer: Callable[[Path], Any], scratch: Path) -> None:
        self.step, self.make_writer, self.scratch = step, make_writer, scratch
        self.engine = self.line_user = self.line_sys = 0.0
        self.blocks = 0
        self.bytes = 0
        self.events = [0, 0, 0, 0]  # statuses, rejections, diffs, fills

    def run(self, n: int) -> Speed:
        done = 0
        while done < n:
            out = Path(tempfile.mkdtemp(dir=self.scratch))
            writer = self.make_writer(out)
            for _ in range(min(DISK_BLOCKS, n - done)):
                if self.blocks % 100 == 0:
                    gc.freeze()  # as hlbook sim does (service.FREEZE_EVERY)
                u0, s0 = cpu()
                block = self.step()
                u1, s1 = cpu()
                writer.write_block(block)
                u2, s2 = cpu()
                self.engine += (u1 - u0) + (s1 - s0)
                self.line_user += u2 - u1
                self.line_sys += s2 - s1
                self.blocks += 1
                done += 1
                self.count(block)
            writer.close()
            self.bytes += sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            shutil.rmtree(out)
        return self

    def count(self, block: Any) -> None:
        """Events of the block (statuses, rejections among them, diffs, fills)."""
        if hasattr(block, "events"):
            statuses, diffs, fills = block.events()
            self.events[1] += sum(1 for e in statuses if b'Rejected","order"' in e)
        else:  # the old code's dict blocks
            statuses, diffs, fills = block.statuses, block.diffs, block.fills
            self.events[1] += sum(1 for e in statuses if e["status"].endswith("Rejected"))
        self.events[0] += len(statuses)
        self.events[2] += len(diffs)
        self.events[3] += len(fills)

    @property
    def total_ms(self) -> float:
        return ms(self.engine + self.line_user + self.line_sys, self.blocks)

    def report(self, label: str) -> None:
        print(f"  {label}: {self.total_ms:.1f} ms CPU a block = step {ms(self.engine, self.blocks):.1f}"
              f" + line assembly {ms(self.line_user, self.blocks):.1f} + kernel writing {ms(self.line_sys, self.blocks):.1f}"
              f" -> {1000 / self.total_ms:.1f} blocks/s on one core ({self.blocks} blocks,"
              f" {self.bytes / max(self.blocks, 1) / 1e6:.2f} MB a block)")
        n = max(self.blocks, 1)
        statuses, rejections, diffs, fills = self.events
        print(f"    a block: {statuses / n:,.0f} statuses ({rejections / max(statuses, 1) * 100:.1f} % rejections),"
              f" {diffs / n:,.0f} diffs, {fills / n:,.0f} fills")


def new_code(args: argparse.Namespace) -> tuple[Any, Callable[[Path], Any], float]:
    """This tree's simulator and a writer factory (stamping lines with the clock, as hlbook sim does),
    and the simulator's start-up CPU."""
    from hlbook.services.nodesim.engine import Simulator
    from hlbook.services.nodesim.writer import NodeWriter, parse_modes

    u0, s0 = cpu()
    sim = Simulator(seed=args.seed, profile=args.profile, depth=args.depth, start_time=START, blocks_per_sec=args.rate)
    u1, s1 = cpu()
    return (sim, lambda out: NodeWriter(out, parse_modes(args.mode), partial_p=0.01, seed=args.seed, clock=time.time_ns),
            (u1 - u0) + (s1 - s0))


def old_code(rev: str, args: argparse.Namespace) -> tuple[Any, Callable[[Path], Any]] | None:
    """The simulator and writer of git revision ``rev`` (None: not loadable here)."""
    modules = {}
    for name in ("engine", "writer"):
        try:
            src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:services/nodesim/{name}.py"],
                                 capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"  baseline {rev}: cannot read it from git ({exc})")
            return None
        module = types.ModuleType(f"nodesim_{rev}_{name}")
        sys.modules[module.__name__] = module
        src = src.replace("from hlbook.services.nodesim.engine import", f"from nodesim_{rev}_engine import")
        try:
            exec(compile(src, f"{rev}:services/nodesim/{name}.py", "exec"), module.__dict__)
        except Exception as exc:  # an older tree may need what this one lacks
            print(f"  baseline {rev}: cannot load its {name}.py ({exc!r})")
            return None
        modules[name] = module
    kwargs: dict[str, Any] = {"seed": args.seed, "profile": args.profile, "start_time": START, "blocks_per_sec": args.rate}
    if args.depth is not None:
        kwargs["depth"] = args.depth
    sim = modules["engine"].Simulator(**kwargs)
    writer = modules["writer"]
    return sim, lambda out: writer.NodeWriter(out, writer.parse_modes(args.mode), partial_p=0.01, seed=args.seed)


def write_only(lines: list[list[bytes]], scratch: Path) -> float:
    """CPU a block of appending already made lines to three files (the floor of any writer)."""
    out = Path(tempfile.mkdtemp(dir=scratch))
    files = [open(out / f"stream{i}", "ab") for i in range(3)]
    u0, s0 = cpu()
    for block in lines:
        for fh, line in zip(files, block):
            fh.write(line)
            fh.flush()
    u1, s1 = cpu()
    for fh in files:
        fh.close()
    shutil.rmtree(out)
    return ms((u1 - u0) + (s1 - s0), len(lines))


def rejection_share(sim: Any, blocks: int) -> float:
    """CPU a block of rendering the rejections alone: ``Senders.render`` on a block's run lengths."""
    from hlbook.services.nodesim.rejects import block_formats

    formats = block_formats("2026-05-05T17:00:00.000000000", 1_777_999_000_000)
    runs = sim._runs(int(sim.activity.rejects * sim.volume), 560)  # ~560 actions a block split the rejections
    u0, s0 = cpu()
    for _ in range(blocks):
        for k in runs:
            if k:
                sim.senders.render(k, formats, 0)
    u1, s1 = cpu()
    return ms((u1 - u0) + (s1 - s0), blocks)


def speed(args: argparse.Namespace, scratch: Path) -> tuple[Any, int]:
    """The speed phase and the baselines; returns the simulator and its resting orders at start."""
    print(f"speed, --profile {args.profile}, mode {args.mode}:")
    sim, make_writer, startup = new_code(args)
    initial = sim.resting_count()
    print(f"  start-up: {startup:.1f} s CPU for {initial:,} resting orders on {len(sim.coins)} coins")
    new = Speed(sim.step, make_writer, scratch).run(args.speed_blocks)
    new.report("this tree")
    print(f"  of which rejections rendered (Senders.render replayed): {rejection_share(sim, 20):.1f} ms a block")
    lines: list[list[bytes]] = []
    for _ in range(20):
        block = sim.step()
        lines.append([b'{"local_time":"2026-05-05T17:00:00.350000000","block_time":"2026-05-05T17:00:00.000000000",'
                      b'"block_number":1,"events":[' + b",".join(e) + b"]}\n" for e in block.events()])
    floor = write_only(lines, scratch)
    print("baselines (same run):")
    print(f"  writing the same bytes only: {floor:.1f} ms CPU a block")
    if args.baseline_rev and args.baseline_blocks:
        loaded = old_code(args.baseline_rev, args)
        if loaded is not None:
            old_sim, old_writer = loaded
            old = Speed(old_sim.step, old_writer, scratch).run(args.baseline_blocks)
            old.report(f"{args.baseline_rev} (old code)")
            print(f"  ratio: {old.total_ms / new.total_ms:.2f}x less CPU a block than {args.baseline_rev}")
            del old_sim
            gc.collect()
    return sim, initial


def live(args: argparse.Namespace, scratch: Path) -> None:
    """``NodeSim`` for ``--live-seconds``: rate, CPU, local_time - block_time, warnings."""
    from hlbook.services.nodesim.service import NodeSim, SimConfig

    out = Path(tempfile.mkdtemp(dir=scratch))
    warnings = _Count()
    logging.getLogger("hlbook.services.nodesim.service").addHandler(warnings)
    node = NodeSim(SimConfig(data_dir=str(out), info_port=None, blocks_per_sec=args.rate, seed=args.seed,
                             profile=args.profile, depth=args.depth, mode=args.mode))
    node.start()
    assert node._thread is not None and node._thread.native_id is not None
    tid = node._thread.native_id
    first = node.height
    c0 = thread_cpu(tid)
    w0 = time.monotonic()
    lags: list[float] = []
    while time.monotonic() - w0 < args.live_seconds:
        time.sleep(min(2.0, args.live_seconds))
        lags += _drain_lags(out, "streaming" if args.mode == "streaming" else "by-block")
    blocks = node.height - first
    c1 = thread_cpu(tid)
    wall = time.monotonic() - w0
    node.stop()
    shutil.rmtree(out)
    lags.sort()
    print(f"live, NodeSim at {args.rate} blocks/s for {wall:.0f} s (--mode {args.mode}):")
    print(f"  {blocks / wall:.2f} blocks/s written, {ms(c1 - c0, blocks):.1f} ms CPU a block (the block loop's thread),"
          f" 'behind schedule' warnings: {warnings.n}")
    if lags:
        print(f"  local_time - block_time: p50 {lags[len(lags) // 2]:.0f} ms, p99 {lags[int(len(lags) * 0.99)]:.0f} ms,"
              f" max {lags[-1]:.0f} ms ({len(lags)} lines)")


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


def _drain_lags(out: Path, mode: str) -> list[float]:
    """``local_time - block_time`` (ms) of the fills lines written so far; then every file is emptied
    (the writer appends: the disk stays small)."""
    import orjson

    from hlbook.common.models import STREAMS
    from hlbook.common.nodefiles import hour_files

    lags = []
    for stream in STREAMS:
        for path in hour_files(out, stream, mode):
            if stream == "fills":  # small lines; their times are the block's
                for line in path.read_bytes().splitlines():
                    try:
                        head = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue  # cut by an earlier emptying, or being written
                    lags.append((_ns(head["local_time"]) - _ns(head["block_time"])) / 1e6)
            path.write_bytes(b"")
    return lags


def _ns(node_time: str) -> int:
    whole, _, frac = node_time.partition(".")
    sec = int(datetime.fromisoformat(whole).replace(tzinfo=timezone.utc).timestamp())
    return sec * 1_000_000_000 + int((frac + "000000000")[:9])


def stability(sim: Any, blocks: int, initial: int) -> None:
    """Resting orders every 1,000 blocks (the engine alone: writing changes nothing in it)."""
    start = sim.resting_count()
    print(f"stability, {blocks:,} more blocks: resting orders (now {start:,}; {initial:,} before the speed phase's"
          f" {sim.height - sim.start_height + 1} blocks)")
    worst = 0.0
    u0, s0 = cpu()
    for i in range(1, blocks + 1):
        if i % 100 == 0:
            gc.freeze()
        sim.step()
        if i % 1000 == 0 or i == blocks:
            now = sim.resting_count()
            worst = max(worst, abs(now / start - 1))
            u1, s1 = cpu()
            print(f"  block {i:6,}: {now:9,} ({(now / start - 1) * 100:+.1f} %), step {ms((u1 - u0) + (s1 - s0), 1000 if i % 1000 == 0 else i % 1000):.1f} ms CPU a block")
            u0, s0 = u1, s1
    now = sim.resting_count()
    print(f"  largest deviation from the start: {worst * 100:.1f} %; from the initial books after"
          f" {sim.height - sim.start_height + 1:,} blocks: {(now / initial - 1) * 100:+.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full")
    parser.add_argument("--depth", type=int, default=None, help="resting orders of the most active coin (default: the profile's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default="by-block", help="by-block, streaming or both")
    parser.add_argument("--blocks", type=int, default=10_000, help="stability: blocks to run")
    parser.add_argument("--speed-blocks", type=int, default=400)
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the old code ('' to skip)")
    parser.add_argument("--baseline-blocks", type=int, default=60)
    parser.add_argument("--live-seconds", type=float, default=30.0, help="0 to skip")
    parser.add_argument("--quick", action="store_true", help="--blocks 2000 --speed-blocks 200 --live-seconds 15")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.speed_blocks, args.live_seconds = 2000, 200, 15.0
    from hlbook.services.nodesim.engine import PROFILES

    args.rate = PROFILES[args.profile][1]
    scratch = Path(tempfile.mkdtemp(prefix="hlbook-bench-sim-"))
    try:
        sim, initial = speed(args, scratch)
        if args.live_seconds:
            live(args, scratch)
        if args.blocks:
            stability(sim, args.blocks, initial)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
