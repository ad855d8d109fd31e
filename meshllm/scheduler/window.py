"""The sliding-window scheduler, pure: which weight blocks to load and release under a byte budget.

Blocks run in a fixed cyclic order (layer 0 attention, layer 0 MLP, layer 1 attention, ... then the next token).
With no budget, or a budget that holds every block, everything is loaded once and never released (no per-token
reads). Otherwise the budget is split in two: room for a streaming window of STREAM_DEPTH of the largest blocks, and
the rest for blocks that stay pinned once read (spread evenly over the cycle, so the disk is kept busy between
them). Streamed blocks form a window starting at the block computed next: loads are issued in order from there
while they fit, and a block is released as soon as its compute finishes. So a budget of half the share reads about
half the share per token, not all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

ABSENT, LOADING, RESIDENT = "absent", "loading", "resident"


from ..errors import MeshError


class BudgetError(MeshError):
    """The budget cannot hold even one block."""


STREAM_DEPTH = 3  # blocks of prefetch room: the one computing, and two read ahead while it computes and reduces


def spread(sizes: Sequence[int], room: int, among: Sequence[int] | None = None) -> frozenset[int]:
    """Blocks (of `among`, default all) holding at most `room` bytes, spread evenly over the cycle."""
    idx = list(range(len(sizes)) if among is None else among)
    total = sum(sizes[i] for i in idx)
    if room <= 0 or not total:
        return frozenset()
    # credit in bytes x total, so the fair share min(room, total) / total is exact (no float drift skips a block
    # that fits exactly)
    share = min(room, total)
    chosen, held, credit = [], 0, 0
    for i in idx:
        credit += sizes[i] * share
        if credit >= sizes[i] * total and held + sizes[i] <= room:
            chosen.append(i)
            held += sizes[i]
            credit -= sizes[i] * total
    return frozenset(chosen)


def choose_pinned(sizes: Sequence[int], budget: int | None, depth: int = STREAM_DEPTH) -> frozenset[int]:
    """The blocks that stay once read: as many bytes as the budget leaves beside the streaming room, spread evenly."""
    if budget is None or sum(sizes) <= budget or not sizes:
        return frozenset()
    return spread(sizes, budget - min(budget, depth * max(sizes)))


def minimum_budget(sizes: Sequence[int]) -> int:
    """The smallest budget that works: the largest block (computed with nothing prefetched)."""
    return max(sizes) if sizes else 0


@dataclass
class Window:
    """Block states and the bytes they hold; the runtime turns its answers into reads and releases."""

    sizes: Sequence[int]
    budget: int | None = None
    state: list[str] = field(init=False)
    resident_bytes: int = field(init=False, default=0)  # loading blocks count: their memory is allocated
    peak_bytes: int = field(init=False, default=0)
    cursor: int = field(init=False, default=0)  # the block computed next
    pinned: frozenset[int] = field(init=False)  # blocks kept once read (only when not everything fits)
    _fits: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.state = [ABSENT] * len(self.sizes)
        if self.budget is not None and self.budget < minimum_budget(self.sizes):
            raise BudgetError(f"budget of {self.budget} bytes cannot hold the largest block "
                              f"({minimum_budget(self.sizes)} bytes)")
        self._fits = self.budget is None or sum(self.sizes) <= self.budget  # sizes and budget never change
        self.pinned = choose_pinned(self.sizes, self.budget)

    def streamed(self, i: int) -> bool:
        """Block i is read again every token (mapped, released after compute)."""
        return not self.fits and i not in self.pinned

    def page_cached(self, room: int | None) -> frozenset[int]:
        """The streamed blocks whose file pages should stay in the page cache when it has `room` bytes for them
        (None: unknown, keep all). Cycling through more than the cache holds would evict every page before its
        reuse (least-recently-used is the worst policy for a cycle); keeping a fixed, spread subset and dropping
        the others' pages after use turns `room` bytes into hits every token."""
        streamed = [i for i in range(len(self.sizes)) if self.streamed(i)]
        if room is None or room >= sum(self.sizes[i] for i in streamed):
            return frozenset(streamed)
        return spread(self.sizes, room, streamed)

    @property
    def fits(self) -> bool:
        """Everything fits: load once, never release."""
        return self._fits

    def loads(self) -> list[int]:
        """Blocks to start loading now (marked loading), in compute order from the cursor."""
        out = []
        n = len(self.sizes)
        for k in range(n):
            i = (self.cursor + k) % n
            if self.state[i] != ABSENT:
                continue
            if not self.fits and self.resident_bytes + self.sizes[i] > self.budget:
                break  # in order only: never let a later block take the room of an earlier one
            self.state[i] = LOADING
            self.resident_bytes += self.sizes[i]
            self.peak_bytes = max(self.peak_bytes, self.resident_bytes)
            out.append(i)
        return out

    def loaded(self, i: int) -> None:
        if self.state[i] != LOADING:
            raise RuntimeError(f"block {i} finished loading but was {self.state[i]}")
        self.state[i] = RESIDENT

    def ready(self, i: int) -> bool:
        return self.state[i] == RESIDENT

    def computed(self, i: int) -> list[int]:
        """Block i's compute finished: advance the cursor; return the blocks to release."""
        if self.state[i] != RESIDENT:
            raise RuntimeError(f"block {i} computed while {self.state[i]}")
        self.cursor = (i + 1) % len(self.sizes)
        if not self.streamed(i):
            return []
        self.state[i] = ABSENT
        self.resident_bytes -= self.sizes[i]
        return [i]

    def rewind(self) -> list[int]:
        """Start over at block 0 (a new request, or one cut short): release what the streaming window holds (and
        pinned blocks still loading, whose reads the runtime cancels); returns those."""
        self.cursor = 0
        if self.fits:
            return []
        dropped = [i for i, st in enumerate(self.state)
                   if st != ABSENT and not (st == RESIDENT and i in self.pinned)]
        for i in dropped:
            self.state[i] = ABSENT
            self.resident_bytes -= self.sizes[i]
        return dropped

    def failed(self, i: int) -> None:
        """A load failed: forget it so it can be retried."""
        if self.state[i] == LOADING:
            self.state[i] = ABSENT
            self.resident_bytes -= self.sizes[i]
