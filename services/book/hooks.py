"""Test hooks of the shard: never in production. ``hlbook book`` cannot turn them
on; the tests start a shard as ``python -m hlbook.services.book.hooks <hlbook book
flags>``, which reads:

``HLBOOK_TEST_DROP_EVERY=N``: drop every Nth ``H|`` or owned ``B|`` message as if
the PUB socket had dropped it; ``HLBOOK_TEST_HOOKS=1``: enable the query ops
``test_corrupt`` / ``test_drop`` (change one order's size / remove it silently,
for validation and resync tests).
"""

from __future__ import annotations

import os
from typing import Any

import msgspec

from hlbook.common import fixed, topics, wire
from hlbook.services.book.state import ShardState


class Hook(msgspec.Struct, tag_field="op", omit_defaults=True):
    """The test ops: shard requests (on ``op`` like ``wire.ShardQuery``) that a shard
    decodes only with the test hooks on."""

    coin: str | None = None
    oid: int | None = None  # default: the best bid's first order


class CorruptQuery(Hook, tag="test_corrupt"):
    """Silently grow order ``oid`` by 1."""


class DropQuery(Hook, tag="test_drop"):
    """Silently remove order ``oid``."""


HookQuery = CorruptQuery | DropQuery
OPS: tuple[str, ...] = ("test_corrupt", "test_drop")


ENABLED: tuple[int, bool] = (0, False)  # (drop every N owned B|/H| messages, the test query ops)


def main() -> None:
    """``hlbook book`` with the hooks the environment asks for (tests only)."""
    import typer

    from hlbook.services.book import hooks  # this module under its package name (run as __main__ it is a copy)
    from hlbook.services.book.cli import book

    hooks.ENABLED = int(os.environ.get("HLBOOK_TEST_DROP_EVERY", "0") or 0), os.environ.get("HLBOOK_TEST_HOOKS") == "1"
    typer.run(book)


class Dropper:
    """Drops every ``every``-th ``H|`` or owned ``B|`` message."""

    def __init__(self, state: ShardState, every: int) -> None:
        self.state = state
        self.every = every
        self.seen = 0

    def drop(self, topic: bytes) -> bool:
        if not self.every:
            return False
        if topic != topics.HEADER and (not topic.startswith(topics.BOOK_PREFIX) or self.state.owned(topic) is None):
            return False
        self.seen += 1
        return self.seen % self.every == 0


def corrupt(state: ShardState, query: Hook) -> dict[str, Any]:
    """``test_drop`` silently removes order ``oid``; ``test_corrupt`` silently grows
    order ``oid`` (default: the best bid's first) by 1."""
    c = state.coins.get(query.coin or "")
    if c is None:
        return wire.error_reply("no such coin")
    best = c.book.bids.best()
    oid = query.oid if query.oid is not None else (next(iter(best.orders)).oid if best else None)
    order = c.book.orders.get(oid) if oid is not None else None
    if oid is None or order is None:
        return wire.error_reply("no such order")
    if isinstance(query, DropQuery):
        c.book.remove(oid)
    else:
        c.book.update(oid, order.sz + fixed.ONE)
    return {"ok": True, "oid": oid}


if __name__ == "__main__":
    main()
