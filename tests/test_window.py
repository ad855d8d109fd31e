"""The sliding-window scheduler core, pure: budget never exceeded, in-order prefetch, nothing evicted when it fits."""

from __future__ import annotations

import random

import pytest

from meshllm.scheduler.window import BudgetError, Window, minimum_budget


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
    with pytest.raises(BudgetError, match="cannot hold the largest block"):
        Window([10, 30, 10], budget=29)
    assert minimum_budget([10, 30, 10]) == 30
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
