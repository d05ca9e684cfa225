"""Which block heights the store holds, as sorted disjoint ``[first, last]`` spans."""

from __future__ import annotations

import bisect
from collections.abc import Iterable


class Spans:
    def __init__(self, spans: Iterable[tuple[int, int]] = ()) -> None:
        self.spans: list[list[int]] = []
        for first, last in sorted(spans):
            self.add(first, last)

    def __repr__(self) -> str:
        return f"Spans({[tuple(s) for s in self.spans]})"

    def __contains__(self, height: int) -> bool:
        i = bisect.bisect_right(self.spans, [height, float("inf")]) - 1
        return i >= 0 and self.spans[i][1] >= height

    def add(self, first: int, last: int) -> None:
        """Hold ``first..last`` (merged with the spans it touches)."""
        i = bisect.bisect_left(self.spans, [first, first])
        if i > 0 and self.spans[i - 1][1] >= first - 1:
            i -= 1
        j = i
        while j < len(self.spans) and self.spans[j][0] <= last + 1:
            first, last = min(first, self.spans[j][0]), max(last, self.spans[j][1])
            j += 1
        self.spans[i:j] = [[first, last]]

    def remove_below(self, height: int) -> None:
        """Forget every height below ``height`` (retention)."""
        self.spans = [[max(f, height), l] for f, l in self.spans if l >= height]

    def holes(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The runs of ``lo..hi`` not held."""
        out, at = [], lo
        for first, last in self.spans:
            if last < at:
                continue
            if first > hi:
                break
            if first > at:
                out.append((at, first - 1))
            at = last + 1
        if at <= hi:
            out.append((at, hi))
        return out

    @property
    def last(self) -> int | None:
        return self.spans[-1][1] if self.spans else None

    def rows(self) -> list[tuple[int, int]]:
        return [(f, l) for f, l in self.spans]
