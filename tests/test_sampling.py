"""Sampling against transformers' logits processors, seeds, and stop strings."""

from __future__ import annotations

import pytest
import torch

from meshllm.errors import RequestError
from meshllm.generation.loop import StopStrings
from meshllm.generation.sampling import Sampler, SamplingParams


def transformers_probs(params: SamplingParams, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    """The next-token distribution transformers' generate() draws from: its processors, in its order, on the ids
    so far (prompt and sampled tokens); greedy takes the argmax of the penalized scores."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    input_ids = torch.tensor([ids])
    scores = logits[None].clone()
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(input_ids, scores)
    if params.temperature == 0:
        return torch.nn.functional.one_hot(scores[0].argmax(), logits.shape[0]).float()
    scores = TemperatureLogitsWarper(params.temperature)(input_ids, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(input_ids, scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(input_ids, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.6),  # temperature alone: top_p and top_k off
    SamplingParams(temperature=1.7, repetition_penalty=1.3),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.0, top_k=100),  # k above the vocabulary: nothing cut
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, top_k=8, top_p=0.9),
    SamplingParams(temperature=0.9, top_k=6, repetition_penalty=1.8),
    SamplingParams(temperature=0.8, top_p=0.05, repetition_penalty=0.7),  # a penalty below 1 favours seen tokens
    SamplingParams(temperature=0, repetition_penalty=2.0),
], ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-r{p.repetition_penalty}")
def test_every_step_draws_from_transformers_distribution(params):
    """Over several steps with the drawn tokens fed back (so the penalized set grows), the distribution equals
    transformers' processors at every step, and the seeded draws are the ones transformers' distribution gives."""
    vocab = 64
    g = torch.Generator().manual_seed(1)
    base = torch.randn(vocab, generator=g) * 3
    prompt = [1, 4, 9, 16, 25]
    sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": 7}), vocab)
    sampler.observe(prompt)
    draws = torch.Generator().manual_seed(7)
    ids = list(prompt)
    for _ in range(8):
        # steps alike enough that a drawn token comes back, so its penalty matters at the next steps
        logits = base + torch.randn(vocab, generator=g) * 0.5
        expected = transformers_probs(params, ids, logits)
        torch.testing.assert_close(sampler.probs(logits), expected, rtol=1e-5, atol=1e-7)
        token = sampler(logits)
        if params.temperature == 0:
            assert token == int(expected.argmax())
        else:
            assert token == int(torch.multinomial(expected, 1, generator=draws))
        ids.append(token)
    if params.repetition_penalty != 1.0:
        assert set(ids[len(prompt):]) - set(prompt)  # tokens outside the prompt were drawn and then penalized


def test_a_token_exactly_at_the_top_p_boundary_is_dropped_like_transformers():
    # four equal logits: cumulative masses 0.25, 0.5, 0.75, 1 are exact, and 1 - top_p = 0.25 is the first
    params = SamplingParams(temperature=1.0, top_p=0.75)
    logits = torch.zeros(4)
    ours = Sampler(params, 4).probs(logits)
    expected = transformers_probs(params, [0], logits)
    assert torch.equal(ours.sort().values, expected.sort().values)
    assert int((ours > 0).sum()) == 3


def test_observing_no_tokens_changes_nothing():
    logits = torch.randn(10, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.0, repetition_penalty=1.5)
    s = Sampler(params, 10)
    s.observe([])
    assert torch.equal(s.probs(logits), transformers_probs(params, [], logits))


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
    with pytest.raises(RequestError, match=f"^{next(iter(bad))}"):  # the message starts with the parameter's name
        SamplingParams(**bad).check()


def test_parameters_at_their_limits_are_accepted():
    SamplingParams(max_tokens=1, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1e-3).check()
    SamplingParams(top_p=1e-9, stop=("x",)).check()


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
