"""Join node files that are already written (tests, benchmarks, tools)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from hlbook.common import nodefiles
from hlbook.common.models import DECODERS, STREAMS
from hlbook.services.ingest.joiner import Block, Joiner


def read_blocks(data_dir: str | Path, mode: str = "by-block") -> Iterator[Block]:
    """Every block of the files under ``data_dir``, joined as ingest joins them live."""
    joiner = Joiner(mode, timeout=float("inf"))
    for stream in STREAMS:
        decoder = DECODERS[stream]
        for path in nodefiles.hour_files(data_dir, stream, mode):
            with open(path, "rb") as fh:
                for line in fh:
                    if line.endswith(b"\n"):
                        joiner.add(stream, decoder.decode(line))
    yield from joiner.ready(flush=True)
