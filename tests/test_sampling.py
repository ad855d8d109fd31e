"""Sampling against transformers' logits processors, seeds, and stop strings."""

from __future__ import annotations

import pytest
import torch

from meshllm.errors import RequestError
from meshllm.generation.loop import StopStrings
from meshllm.generation.sampling import Sampler, SamplingParams


def kept_by_ours(params: SamplingParams, logits: torch.Tensor, seen: list[int]) -> set[int]:
    """Tokens our sampler can pick: sample many times with different seeds."""
    picked = set()
    for seed in range(400):
        s = Sampler(SamplingParams(**{**params.__dict__, "seed": seed}), logits.shape[0])
        s.observe(seen)
        picked.add(s(logits))
    return picked


def kept_by_transformers(params: SamplingParams, logits: torch.Tensor, seen: list[int]) -> tuple[set[int], torch.Tensor]:
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = torch.tensor([seen])
    scores = logits[None].clone()
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(ids, scores)
    probs = scores.softmax(-1)[0]
    return set(torch.nonzero(probs > 0).flatten().tolist()), probs


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, top_k=8, top_p=0.9),
    SamplingParams(temperature=0.9, top_k=6, repetition_penalty=1.8),
])
def test_support_matches_transformers_processors(params):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, generator=g) * 3
    seen = [0, 3, 5, 7, 11]
    expected, probs = kept_by_transformers(params, logits, seen)
    ours = kept_by_ours(params, logits, seen)
    assert ours <= expected
    # every token with non-negligible mass is reached in 400 draws
    assert {t for t in expected if probs[t] > 0.02} <= ours


def test_repetition_penalty_changes_the_greedy_choice_like_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([2.0, 1.9, -0.5, 1.0])
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5), 4)
    s.observe([0])
    ref = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[0]]), logits[None].clone())
    assert s(logits) == int(ref.argmax()) == 1


def test_greedy_is_argmax_and_seed_is_reproducible():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    assert Sampler(SamplingParams(temperature=0), 1000)(logits) == int(logits.argmax())
    p = SamplingParams(temperature=2.0, seed=42)
    a = [Sampler(p, 1000)(logits) for _ in range(5)]
    b = [Sampler(p, 1000)(logits) for _ in range(5)]
    assert a == b
    seq1 = Sampler(p, 1000)
    seq2 = Sampler(SamplingParams(temperature=2.0, seed=43), 1000)
    assert [seq1(logits) for _ in range(20)] != [seq2(logits) for _ in range(20)]


@pytest.mark.parametrize("bad", [
    dict(max_tokens=0), dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5),
    dict(repetition_penalty=0), dict(stop=("",)),
])
def test_bad_parameters_are_named(bad):
    with pytest.raises(RequestError, match=next(iter(bad))):
        SamplingParams(**bad).check()


def test_stop_strings_hold_back_a_possible_prefix_and_cut_at_the_match():
    s = StopStrings(("END", "\n\n"))
    out = []
    for piece in ["Hello E", "N", "o", " wor", "ld\n", "\nmore"]:
        text, hit = s.push(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "Hello ENo world"
    assert hit
    s = StopStrings(("stop",))
    assert s.push("a st") == ("a ", False)
    assert s.push("ill") == ("still", False)
    assert s.flush() == ""
