"""Join node files that are already written (tests, benchmarks, tools)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from hlbook.common import nodefiles
from hlbook.common.models import DECODERS, STREAMS
from hlbook.services.ingest.joiner import STATUSES, Block, Joiner, Phase, line_head


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
