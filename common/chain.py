"""The one rule for "is this message the next one?" on a stream of heights.

Every stream message carries its ``height`` and ``prev``: the height of the
previous message its publisher sent on the same topic (``None`` when the
publisher has no previous one: it just started). A consumer keeps a
:class:`Chain` per topic and asks :meth:`Chain.step` about each message:

- ``SEEN``: at or below what the consumer holds (a replayed or duplicate
  message, or one a snapshot already contains): skip it.
- ``NEXT``: nothing was lost before it: apply it, then :meth:`Chain.advance`.
- ``GAP``: a message before it was lost: recover (replay or fresh state).

After a snapshot at height S (:meth:`Chain.from_snapshot`) the snapshot holds
every message up to S, so the first message after it fits when its ``prev``
is at most S; from then on ``prev`` must equal the last height applied.
A *dense* stream has a message at every height (block headers, shard blocks,
``l4Book`` updates to clients); there a ``prev`` of ``None`` (the publisher
restarted) still fits when the height is the next one.

Shards (``H|``, ``B|``), the gateway (every upstream topic, ``l4Book``) and the
client library (``l4Book`` heights) all use this type.
"""

from __future__ import annotations

import enum


class Step(enum.StrEnum):
    SEEN = "seen"
    NEXT = "next"
    GAP = "gap"


class Chain:
    """Where a consumer stands on one topic."""

    __slots__ = ("last", "exact", "dense")

    def __init__(self, dense: bool = False) -> None:
        self.last: int | None = None  # last height applied, or the snapshot's height
        self.exact = False  # ``last`` is a message's height (not a snapshot's)
        self.dense = dense

    def __repr__(self) -> str:
        return f"Chain(last={self.last}, exact={self.exact}, dense={self.dense})"

    def from_snapshot(self, height: int) -> None:
        """The consumer's state now holds everything up to ``height``."""
        self.last, self.exact = height, False

    def at(self, height: int) -> None:
        """The next message's ``prev`` will be exactly ``height`` (a publisher said so)."""
        self.last, self.exact = height, True

    def clear(self) -> None:
        """Hold nothing: the next message starts the chain."""
        self.last, self.exact = None, False

    def step(self, height: int, prev: int | None) -> Step:
        last = self.last
        if last is None:
            return Step.NEXT
        if height <= last:
            return Step.SEEN
        if prev is None:
            fits = height == last + 1 if self.dense else not self.exact
        elif self.exact:
            fits = prev == last
        else:
            fits = prev <= last
        return Step.NEXT if fits else Step.GAP

    def advance(self, height: int) -> None:
        """A message at ``height`` was applied."""
        self.last, self.exact = height, True

    def check(self, height: int, prev: int | None) -> Step:
        """:meth:`step`, advancing past the message unless it was ``SEEN``
        (for consumers that go on after a gap, having asked for a repair)."""
        result = self.step(height, prev)
        if result is not Step.SEEN:
            self.advance(height)
        return result


class Chains:
    """One :class:`Chain` per topic (topics starting with a dense prefix are dense)."""

    def __init__(self, dense_prefixes: tuple[bytes, ...] = ()) -> None:
        self.chains: dict[bytes, Chain] = {}
        self.dense_prefixes = dense_prefixes

    def __getitem__(self, topic: bytes) -> Chain:
        chain = self.chains.get(topic)
        if chain is None:
            chain = self.chains[topic] = Chain(bool(self.dense_prefixes) and topic.startswith(self.dense_prefixes))
        return chain

    def pop(self, topic: bytes) -> None:
        self.chains.pop(topic, None)
