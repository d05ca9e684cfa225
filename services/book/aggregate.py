"""Bucket arithmetic and incrementally maintained aggregated views.

A price's bucket step is ``mantissa * 10**(e + 1 - nSigFigs)`` where ``e`` is
the exponent of its first significant digit (``floor(log10(px))``: 4 for
81307, -2 for 0.012345). Bids round down, asks round up, to a multiple of the
step, exactly, on fixed-point ints.

An :class:`AggSide` keeps one side of a book aggregated (bucket -> total size,
order count) and is updated by the book on every order change, so publishing
a coarse aggregation (``nSigFigs`` 2 spans the whole BTC book) costs O(buckets
output), not a walk over every level each block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sortedcontainers import SortedList

from hlbook.common import fixed

if TYPE_CHECKING:
    from hlbook.services.book.book import Side

_CACHE_MAX = 100_000


def step_of(px: int, n_sig_figs: int, mantissa: int = 1) -> int:
    """Bucket width (fixed-point) for a positive fixed-point price."""
    digits = len(str(px)) - fixed.DECIMALS  # e + 1
    exp = digits - n_sig_figs + fixed.DECIMALS
    if exp < 0:
        return 0  # finer than the fixed-point resolution: no aggregation
    return mantissa * 10**exp


def bucket(px: int, n_sig_figs: int, mantissa: int, is_bid: bool) -> int:
    """The bucket price of ``px``: bids down, asks up, to a multiple of the step."""
    step = step_of(px, n_sig_figs, mantissa)
    if step <= 1:
        return px
    if is_bid:
        return px - px % step
    return -(-px // step) * step


class AggSide:
    """One side of a book in buckets: ``bucket px -> [total size, order count]``."""

    __slots__ = ("n_sig_figs", "mantissa", "is_bid", "buckets", "keys", "_of")

    def __init__(self, side: Side, n_sig_figs: int, mantissa: int) -> None:
        self.n_sig_figs = n_sig_figs
        self.mantissa = mantissa
        self.is_bid = side.is_bid
        self.buckets: dict[int, list[int]] = {}
        self.keys: SortedList[int] = SortedList()
        self._of: dict[int, int] = {}  # px -> bucket
        for level in side.levels.values():
            self.change(level.px, level.sz, len(level.orders))

    def change(self, px: int, d_sz: int, d_n: int) -> None:
        """An order change at ``px``: size by ``d_sz``, order count by ``d_n``."""
        b = self._of.get(px)
        if b is None:
            if len(self._of) >= _CACHE_MAX:
                self._of.clear()
            b = self._of[px] = bucket(px, self.n_sig_figs, self.mantissa, self.is_bid)
        entry = self.buckets.get(b)
        if entry is None:
            entry = self.buckets[b] = [0, 0]
            self.keys.add(b)
        entry[0] += d_sz
        entry[1] += d_n
        if entry[1] == 0:
            del self.buckets[b]
            self.keys.remove(b)

    def top(self, n: int) -> list[tuple[int, int, int]]:
        """Up to ``n`` buckets best first as ``(px, sz, n)`` fixed-point."""
        keys = self.keys
        it = keys.islice(max(len(keys) - n, 0), reverse=True) if self.is_bid else keys.islice(0, n)
        buckets = self.buckets
        return [(b, sz, count) for b in it for sz, count in (buckets[b],)]  # an entry is [sz, n]
