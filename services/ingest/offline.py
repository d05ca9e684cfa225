"""Join node files that are already written (tests, benchmarks, tools)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from hlbook.common import nodefiles
from hlbook.common.models import DECODERS, STREAMS
from hlbook.common.nodelines import Reason
from hlbook.services.ingest.joiner import STATUSES, Block, Joiner, Phase, line_head

Lines = Iterator[tuple[int, bytes]]  # (height, line) of one stream, in file order


def read_blocks(data_dir: str | Path, mode: str = "by-block") -> Iterator[Block]:
    """Every block of the files under ``data_dir``, joined as ingest joins them live,
    every status decoded (rejections too)."""
    joiner = Joiner(mode, timeout=float("inf"))
    for stream in STREAMS:
        decoder = DECODERS[stream]
        for path in nodefiles.hour_files(data_dir, stream, mode):
            with open(path, "rb") as fh:
                for line in fh:
                    if not line.endswith(b"\n"):
                        continue
                    if stream == STATUSES:
                        head = line_head(line)
                        assert head is not None, line[:100]
                        joiner.add_statuses(head, line)
                    else:
                        joiner.add(stream, decoder.decode(line), line)
    for phase, block in joiner.ready(flush=True):
        if phase is Phase.DETAILS:
            block.decode_statuses(lambda user: True)
            yield block


def joined(joiner: Joiner, lines: dict[str, Lines], flush: bool = True,
           wanted: Callable[[Block], bool] | None = None) -> Iterator[Block]:
    """The blocks of the streams' ``lines`` (read in file order), their statuses decoded (but the
    rejections), in height order. The next line is always the one of the stream whose judged
    height is lowest, as the live tailer reads them: a damaged height ahead waits for its own
    stream's next line, not for the other stream to catch up with it. ``flush``: at the end,
    close the blocks the streams have not all reached (else only whole blocks come out:
    files still being written). ``wanted``: whether a block's statuses are needed (the others
    come out with none decoded)."""
    heads = {stream: next(it, None) for stream, it in lines.items()}
    while any(head is not None for head in heads.values()):
        stream = min((s for s, head in heads.items() if head is not None), key=lambda s: joiner.sequences[s].last or -1)
        head = heads[stream]
        assert head is not None
        joiner.feed(stream, head[1])
        heads[stream] = next(lines[stream], None)
        yield from _details(joiner, joiner.ready(0.0), wanted)
    if flush:
        yield from _details(joiner, joiner.ready(0.0, flush=True), wanted)


def _details(joiner: Joiner, closed: list[tuple[Phase, Block]], wanted: Callable[[Block], bool] | None) -> Iterator[Block]:
    for phase, block in closed:
        if phase is Phase.DETAILS:
            if wanted is not None and not wanted(block):
                block.status_lines = []  # never parsed
                yield block
                continue
            for line, exc in block.decode_statuses(None, joiner.drops):
                joiner.drops("order_statuses", Reason.MALFORMED, block.height, f"{exc}: {line[:200]!r}")
            yield block
