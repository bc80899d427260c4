"""Holes in what a reader has taken from each partition, and when to go back for them (pure).

tansu (the embedded broker, memory storage) on a 16-core host sometimes serves a partition's later
batch before an earlier one is visible; a consumer's position then passes the earlier records for good
(H200, 2026-12-02: 1 to 4 of 16,000 results per run, every one there when the topic was read again).
The bench's collector would wait for them until its time-out, or, reading its topics again after a
quiet spell, record them seconds late and halve the measured rate. The results topic's offsets are
contiguous (one producer per record, no transactions), so a hole below the highest offset taken is a
record not yet seen: the collector seeks back to it shortly after it appears.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class _Partition:
    taken: set[int] = field(default_factory=set)
    floor: int = 0  # every offset below is taken (or given up)
    high: int = -1  # the highest offset taken
    since: float | None = None  # when the hole at ``floor`` was first noticed, or last sought
    tries: int = 0  # seeks back to the hole at ``floor``


class Gaps:
    def __init__(self, wait_s: float = 0.05, max_tries: int = 20) -> None:
        self.wait_s = wait_s  # how long a hole may stand before a seek back (a batch in flight fills it)
        self.max_tries = max_tries  # then the offset is given up (a gap the broker really has)
        self.parts: dict[Hashable, _Partition] = {}
        self.filled = 0  # records taken below their partition's highest offset taken: served late
        self.given_up = 0

    def take(self, tp: Hashable, offset: int) -> bool:
        """Record ``offset`` taken; False if it was already (a re-read after a seek back)."""
        p = self.parts.setdefault(tp, _Partition())
        if offset < p.floor or offset in p.taken:
            return False
        p.taken.add(offset)
        if offset < p.high:
            self.filled += 1
        p.high = max(p.high, offset)
        while p.floor in p.taken:
            p.taken.discard(p.floor)
            p.floor += 1
            p.since, p.tries = None, 0
        return True

    def seeks(self, now: float) -> list[tuple[Hashable, int]]:
        """(partition, offset) to seek back to now: the lowest hole of each partition that has stood
        for ``wait_s`` since it was noticed or last sought."""
        out = []
        for tp, p in self.parts.items():
            while p.floor < p.high and p.tries >= self.max_tries:  # give that offset up, look at the next
                self.given_up += 1
                p.floor += 1
                p.since, p.tries = None, 0
                while p.floor in p.taken:
                    p.taken.discard(p.floor)
                    p.floor += 1
            if p.floor >= p.high:
                continue
            if p.since is None:
                p.since = now
            elif now - p.since >= self.wait_s:
                out.append((tp, p.floor))
                p.since, p.tries = now, p.tries + 1
        return out
