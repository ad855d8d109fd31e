"""HubRounds: the star allreduce's round bookkeeping. Parts come back in rank order once; anything else is an error."""

from __future__ import annotations

import itertools
import random

import pytest

from meshllm.collectives.star import HubRounds, RoundError

K0 = (0, 0, 0, 0)  # (request, step, layer, phase)
K1 = (0, 0, 0, 1)


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_any_arrival_order_returns_rank_order_once(order):
    hub = HubRounds(4)
    results = [hub.add(K0, r, f"part{r}") for r in order]
    assert results[:-1] == [None] * 3
    assert results[-1] == ["part0", "part1", "part2", "part3"]
    assert hub.key is None and hub.parts == {} and hub.last_closed == K0
    assert hub.missing() == []


def test_world_of_one_completes_at_once():
    hub = HubRounds(1)
    assert hub.add(K0, 0, "only") == ["only"]
    assert hub.add(K1, 0, "next") == ["next"]


def test_parts_are_returned_as_given():
    hub = HubRounds(2)
    a, b = object(), object()
    hub.add(K0, 1, b)
    ordered = hub.add(K0, 0, a)
    assert ordered[0] is a and ordered[1] is b


def test_duplicate_part():
    hub = HubRounds(3)
    hub.add(K0, 1, "x")
    with pytest.raises(RoundError, match=r"duplicate part from rank 1 for round \(0, 0, 0, 0\)"):
        hub.add(K0, 1, "again")
    assert hub.parts == {1: "x"}  # the first part stands
    assert hub.missing() == [0, 2]


def test_late_part_for_a_closed_round():
    hub = HubRounds(2)
    hub.add(K0, 0, "a")
    hub.add(K0, 1, "b")
    with pytest.raises(RoundError, match=r"late part from rank 1 for round \(0, 0, 0, 0\): round \(0, 0, 0, 0\) "
                                         r"is already closed"):
        hub.add(K0, 1, "b again")
    hub.add(K1, 0, "c")
    with pytest.raises(RoundError, match="late part"):
        hub.add(K0, 1, "older still")  # late even while another round is open
    assert hub.key == K1 and hub.parts == {0: "c"}


def test_part_for_another_round_while_one_is_open():
    hub = HubRounds(3)
    hub.add(K1, 2, "x")
    for other in [(0, 0, 1, 0), (0, 1, 0, 0), (1, 0, 0, 0), (0, 0, 0, 0)]:
        with pytest.raises(RoundError, match=r"round \(.*\) while round \(0, 0, 0, 1\) is still open"):
            hub.add(other, 0, "y")
    assert hub.key == K1 and hub.missing() == [0, 1]
    hub.add(K1, 0, "a")
    assert hub.add(K1, 1, "b") == ["a", "b", "x"]


@pytest.mark.parametrize("rank", [-1, 3, 100])
def test_unknown_rank(rank):
    hub = HubRounds(3)
    with pytest.raises(RoundError, match=rf"part from rank {rank}, but the world has ranks 0..2"):
        hub.add(K0, rank, "x")
    assert hub.key is None  # a refused part opens no round


def test_missing_lists_absent_ranks():
    hub = HubRounds(4)
    assert hub.missing() == []  # no round open
    hub.add(K0, 2, "c")
    assert hub.missing() == [0, 1, 3]
    hub.add(K0, 0, "a")
    assert hub.missing() == [1, 3]
    hub.add(K0, 3, "d")
    assert hub.missing() == [1]
    hub.add(K0, 1, "b")
    assert hub.missing() == []


def test_rounds_proceed_in_order_across_layers_phases_steps_requests():
    world = 3
    hub = HubRounds(world)
    rnd = random.Random(7)
    closed = []
    for req in range(2):
        for step in range(3):
            for layer in range(4):
                for phase in (0, 1):
                    key = (req, step, layer, phase)
                    order = list(range(world))
                    rnd.shuffle(order)
                    out = None
                    for i, rank in enumerate(order):
                        assert out is None
                        out = hub.add(key, rank, (key, rank))
                        if i < world - 1:
                            assert hub.missing() == sorted(order[i + 1:])
                    assert out == [(key, r) for r in range(world)]
                    closed.append(key)
    assert closed == sorted(closed) and len(closed) == 2 * 3 * 4 * 2
    assert hub.last_closed == (1, 2, 3, 1)


def test_rounds_may_skip_ahead():
    # the hub cannot know which rounds a request will run; it only requires increasing keys
    hub = HubRounds(1)
    hub.add((0, 0, 0, 0), 0, "a")
    assert hub.add((0, 5, 2, 1), 0, "b") == ["b"]
    with pytest.raises(RoundError, match="late"):
        hub.add((0, 5, 2, 0), 0, "c")


def test_reset_clears():
    hub = HubRounds(2)
    hub.add(K0, 0, "a")
    hub.add(K0, 1, "b")
    hub.add(K1, 1, "half")
    hub.reset()
    assert hub.key is None and hub.parts == {} and hub.last_closed is None
    assert hub.missing() == []
    # earlier keys are acceptable again, and the half-filled round is forgotten
    assert hub.add(K0, 1, "b2") is None
    assert hub.add(K0, 0, "a2") == ["a2", "b2"]
