"""One generated block: its events as the node's JSON, and the node's timestamps."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import orjson

Event = dict[str, Any]
Events = tuple[list[Any], list[Any], list[Any]]  # statuses, diffs, fills (the order of models.STREAMS)


class Block:
    """A block's events in node order, per stream (statuses, diffs, fills).

    The engine builds it from encoded events (``Block.encoded``: compact JSON,
    the node's key order), which the writer uses as they are; replays and
    tests build it from dicts. Either form is derived from the other on first
    use: ``statuses``/``diffs``/``fills`` are dicts, ``events()`` the bytes.
    """

    __slots__ = ("height", "time_ns", "_dicts", "_json")

    def __init__(self, height: int, time_ns: int, statuses: list[Event] | None = None,
                 diffs: list[Event] | None = None, fills: list[list[Any]] | None = None) -> None:
        self.height = height
        self.time_ns = time_ns  # block_time, epoch nanoseconds
        self._dicts: Events | None = (statuses if statuses is not None else [], diffs if diffs is not None else [],
                                      fills if fills is not None else [])
        self._json: tuple[list[bytes], list[bytes], list[bytes]] | None = None

    @classmethod
    def encoded(cls, height: int, time_ns: int, statuses: list[bytes], diffs: list[bytes],
                fills: list[bytes]) -> Block:
        """A block from events already encoded as the node writes them."""
        block = cls(height, time_ns)
        block._dicts, block._json = None, (statuses, diffs, fills)
        return block

    def events(self) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """Each stream's events as compact JSON bytes."""
        if self._json is None:
            assert self._dicts is not None
            self._json = ([orjson.dumps(e) for e in self._dicts[0]], [orjson.dumps(e) for e in self._dicts[1]],
                          [orjson.dumps(e) for e in self._dicts[2]])
        return self._json

    def _decoded(self) -> Events:
        if self._dicts is None:
            assert self._json is not None
            self._dicts = ([orjson.loads(e) for e in self._json[0]], [orjson.loads(e) for e in self._json[1]],
                           [orjson.loads(e) for e in self._json[2]])
        return self._dicts

    @property
    def statuses(self) -> list[Event]:
        return self._decoded()[0]

    @property
    def diffs(self) -> list[Event]:
        return self._decoded()[1]

    @property
    def fills(self) -> list[list[Any]]:
        return self._decoded()[2]

    @property
    def block_time(self) -> str:
        return node_time(self.time_ns)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Block):
            return NotImplemented
        return (self.height, self.time_ns, self.events()) == (other.height, other.time_ns, other.events())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        n = [len(e) for e in (self._json or self._dicts or ())]
        return f"Block(height={self.height}, time={self.block_time}, events={n})"


_second_cache: list[Any] = [None, ""]


def node_time(ns: int) -> str:
    """Node timestamp with nanoseconds (``2026-05-05T17:39:13.024084407``), UTC."""
    sec, frac = divmod(ns, 1_000_000_000)
    if _second_cache[0] != sec:
        _second_cache[:] = [sec, datetime.fromtimestamp(sec, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second_cache[1]}.{frac:09d}"
