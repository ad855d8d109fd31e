"""The sliding-window scheduler core, pure: budget never exceeded, in-order prefetch, nothing evicted when it fits."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.scheduler.window import BudgetError, Window, choose_pinned, minimum_budget, spread


def drive(w: Window, tokens: int, rng: random.Random | None = None) -> list[tuple[str, int]]:
    """Run the runtime's loop: per block, wait for it (loads may complete late), compute, release."""
    trace = []
    n = len(w.sizes)
    inflight: list[int] = []
    for _ in range(tokens):
        for i in range(n):
            for j in w.loads():
                inflight.append(j)
                trace.append(("load", j))
            assert w.budget is None or w.resident_bytes <= w.budget
            while not w.ready(i):
                # loads finish in order, possibly several at once
                k = 1 if rng is None else rng.randint(1, max(1, len(inflight)))
                for j in inflight[:k]:
                    w.loaded(j)
                del inflight[:k]
            trace.append(("compute", i))
            for j in w.computed(i):
                trace.append(("release", j))
    return trace


def test_everything_resident_when_it_fits():
    w = Window([10, 20, 10, 20], budget=60)
    trace = drive(w, tokens=3)
    assert [e for e in trace if e[0] == "load"] == [("load", i) for i in range(4)]  # once, at the start
    assert not [e for e in trace if e[0] == "release"]
    assert w.peak_bytes == 60


def test_no_budget_means_everything_resident():
    w = Window([5] * 8)
    drive(w, tokens=2)
    assert w.fits and w.resident_bytes == 40


@pytest.mark.parametrize("budget", [20, 25, 30, 45, 59])
def test_budget_is_never_exceeded_and_every_block_is_read_once_per_token(budget):
    sizes = [10, 20, 10, 20, 10, 20]
    w = Window(sizes, budget)
    trace = drive(w, tokens=4, rng=random.Random(budget))
    assert w.peak_bytes <= budget
    loads = [i for kind, i in trace if kind == "load"]
    assert len(loads) >= 6 * 3  # a windowed block is read again every token
    # in order, cyclically: each load is the next block after the previous load
    assert all(b == (a + 1) % 6 for a, b in zip(loads, loads[1:]))
    computes = [i for kind, i in trace if kind == "compute"]
    assert computes == list(range(6)) * 4


def test_prefetch_runs_ahead_as_far_as_the_budget_allows():
    w = Window([10] * 10, budget=35)
    assert w.loads() == [0, 1, 2]  # three fit, the fourth would not
    assert w.resident_bytes == 30
    for i in (0, 1, 2):
        w.loaded(i)
    assert w.loads() == []
    assert w.computed(0) == [0]
    assert w.loads() == [3]  # the freed room goes to the next block in order


def test_a_budget_below_the_largest_block_is_refused():
    with pytest.raises(BudgetError, match=r"^budget of 29 bytes cannot hold the largest block \(30 bytes\)$"):
        Window([10, 30, 10], budget=29)
    assert minimum_budget([10, 30, 10]) == 30
    assert minimum_budget([]) == 0  # no blocks need no memory
    w = Window([10, 30, 10], budget=30)  # exactly one block at a time still works
    drive(w, tokens=2)
    assert w.peak_bytes == 30


def test_a_failed_load_can_be_retried():
    w = Window([10, 10], budget=10)
    assert w.loads() == [0]
    w.failed(0)
    assert w.resident_bytes == 0
    assert w.loads() == [0]


def test_a_budget_beyond_the_streaming_room_pins_blocks_spread_over_the_cycle():
    sizes = [10, 30] * 20  # 800 bytes; streaming room is 3 x 30 = 90
    budget = 400
    w = Window(sizes, budget)
    pinned_bytes = sum(sizes[i] for i in w.pinned)
    assert 0 < pinned_bytes <= budget - 3 * 30
    assert pinned_bytes >= budget - 3 * 30 - 30  # the rest of the budget is used, to within a block
    gaps = [b - a for a, b in zip(sorted(w.pinned), sorted(w.pinned)[1:])]
    assert max(gaps) <= 4  # spread out, not one run at the start
    tokens = 5
    trace = drive(w, tokens=tokens, rng=random.Random(7))
    assert w.peak_bytes <= budget
    loads = [i for kind, i in trace if kind == "load"]
    for i in range(len(sizes)):
        # pinned: read once; others: every token (the first few once more, prefetched for a next token)
        assert loads.count(i) in ((1,) if i in w.pinned else (tokens, tokens + 1)), i
    assert not [i for kind, i in trace if kind == "release" and i in w.pinned]
    assert [i for kind, i in trace if kind == "compute"] == list(range(len(sizes))) * tokens


def test_rewind_keeps_pinned_blocks_and_releases_the_streaming_window():
    sizes = [10] * 20
    w = Window(sizes, budget=100)  # room 30, 70 pinnable
    assert sum(sizes[i] for i in w.pinned) == 70
    drive(w, tokens=1)
    w.loads()
    for i in range(20):
        if w.state[i] == "loading":
            w.loaded(i)
    for i in range(7):
        w.computed(i) if w.ready(i) else None
    dropped = w.rewind()
    assert not set(dropped) & w.pinned
    assert all(w.ready(i) for i in w.pinned)
    assert w.resident_bytes == 70 and w.cursor == 0
    trace = drive(w, tokens=2)
    assert w.peak_bytes <= 100
    assert not [i for kind, i in trace if kind == "load" and i in w.pinned]


def test_no_pins_when_the_budget_only_holds_the_streaming_room():
    assert Window([10, 30] * 5, budget=90).pinned == frozenset()
    assert Window([10, 30] * 5, budget=400).pinned == frozenset()  # everything fits: nothing streams at all
    assert Window([10, 30] * 5).pinned == frozenset()


def test_a_page_cache_smaller_than_the_stream_keeps_a_spread_subset():
    sizes = [10, 30] * 20
    w = Window(sizes, budget=200)
    streamed = [i for i in range(len(sizes)) if w.streamed(i)]
    assert w.page_cached(None) == frozenset(streamed)  # unknown room: leave the kernel alone
    assert w.page_cached(10**9) == frozenset(streamed)  # it all fits: keep it all
    assert w.page_cached(0) == frozenset()
    kept = w.page_cached(300)
    assert set(kept) <= set(streamed) and 270 <= sum(sizes[i] for i in kept) <= 300
    assert max(b - a for a, b in zip(sorted(kept), sorted(kept)[1:])) <= 6  # spread, not a run
    assert not kept & w.pinned


def test_blocks_out_of_order_are_refused():
    w = Window([10, 10], budget=10)
    with pytest.raises(RuntimeError, match="^block 0 finished loading but was absent$"):
        w.loaded(0)
    w.loads()
    with pytest.raises(RuntimeError, match="^block 0 computed while loading$"):
        w.computed(0)


def test_rewind_releases_the_window_and_pinned_blocks_still_loading():
    sizes = [10] * 10
    w = Window(sizes, budget=50)  # 30 of streaming room, 20 pinned
    assert w.pinned == {4, 9}
    assert w.loads() == [0, 1, 2, 3, 4]
    for i in (0, 1):
        w.loaded(i)
    w.computed(0)
    # 1 is resident and streamed, 2 and 3 are streamed and loading, 4 is pinned and loading: all go
    assert w.rewind() == [1, 2, 3, 4]
    assert w.state == ["absent"] * 10 and w.resident_bytes == 0 and w.cursor == 0
    assert w.loads() == [0, 1, 2, 3, 4]
    for i in (0, 1, 4):
        w.loaded(i)
    w.computed(0)
    assert w.rewind() == [1, 2, 3]  # a pinned block once read stays
    assert w.ready(4) and w.resident_bytes == 10


def test_a_budget_that_holds_everything_pins_nothing():
    sizes = [10, 30] * 5
    assert choose_pinned(sizes, sum(sizes)) == frozenset()  # everything stays: there is nothing to stream
    assert Window(sizes, budget=sum(sizes)).pinned == frozenset()
    assert choose_pinned(sizes, sum(sizes) - 1)


def evenly(n: int, k: int) -> frozenset[int]:
    """k of n equal blocks spread evenly (Bresenham): block i is chosen where the quota (i + 1) k / n passes a whole
    number."""
    return frozenset(i for i in range(n) if (i + 1) * k // n > i * k // n)


@pytest.mark.parametrize("n", [8, 16])
def test_equal_blocks_are_spread_like_bresenham(n):
    for size in (1, 8):
        for k in range(n + 1):
            assert spread([size] * n, k * size) == evenly(n, k), (size, k)


def test_spread_over_nothing_chooses_nothing():
    assert spread([], 100) == frozenset()
    assert spread([10, 20], 100, among=[]) == frozenset()
    assert spread([10, 20], 0) == frozenset()


@settings(deadline=None)  # a shared machine: time is no property of spread
@given(st.lists(st.integers(1, 50), min_size=1, max_size=30), st.integers(0, 2000), st.data())
def test_spread_keeps_to_the_fair_share_of_every_prefix(sizes, room, data):
    """Walking the cycle, the bytes chosen so far are never ahead of the fair share (room / total of what was
    walked) and never behind it by a whole block; so the room is used to within one block."""
    among = sorted(data.draw(st.sets(st.sampled_from(range(len(sizes))), min_size=1)))
    chosen = spread(sizes, room, among)
    assert chosen <= set(among)
    total, biggest = sum(sizes[i] for i in among), max(sizes[i] for i in among)
    share = min(1.0, room / total)
    walked = held = 0
    for i in among:
        walked += sizes[i]
        held += sizes[i] if i in chosen else 0
        assert -1e-9 <= share * walked - held < biggest
    assert held <= room
    assert held == total if room >= total else held > room - biggest
