"""Sampling: greedy, temperature, top-k, top-p, repetition penalty; seeded and reproducible."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """What to generate and how to pick each token. temperature 0 means greedy."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def check(self) -> None:
        """Raise RequestError naming the first parameter out of range."""
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty")


def penalized(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor) -> torch.Tensor:
    """(V,) fp32 scores after the repetition penalty (CTRL's: a seen token's score moves toward -inf whatever its
    sign)."""
    scores = logits.float()
    if params.repetition_penalty == 1.0:
        return scores
    r = params.repetition_penalty
    return torch.where(seen[: scores.shape[0]], torch.where(scores < 0, scores * r, scores / r), scores)


def next_token_probs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor) -> torch.Tensor:
    """(V,) logits and the (V,) mask of tokens seen so far -> (V,) fp32 probabilities of the next token.

    Processors in transformers' order: repetition penalty, then temperature, top-k, top-p. Greedy (temperature 0)
    puts all the mass on the argmax of the penalized scores.
    """
    scores = penalized(logits, params, seen)
    if params.temperature == 0:
        return torch.nn.functional.one_hot(torch.argmax(scores), scores.shape[0]).float()
    scores = scores / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.shape[0])).values[-1]
        scores = scores.masked_fill(scores < kth, -torch.inf)
    if params.top_p < 1.0:
        ascending, order = torch.sort(scores)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - params.top_p)
        drop[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), -torch.inf)
    return scores.softmax(dim=-1)


class Sampler:
    """Picks the next token from fp32 logits: draws from `next_token_probs`, seeded, and remembers what it picked."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        self._seen = torch.zeros(vocab_size, dtype=torch.bool)

    def observe(self, ids: list[int]) -> None:
        """Record tokens the repetition penalty applies to (the prompt; sampled tokens are recorded as drawn)."""
        self._seen[torch.tensor(ids, dtype=torch.long)] = True

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) logits -> the distribution the next call draws from (given the tokens seen so far)."""
        return next_token_probs(logits, self.params, self._seen)

    def __call__(self, logits: torch.Tensor) -> int:
        """(V,) logits -> token id."""
        if self.params.temperature == 0:  # the argmax of next_token_probs' one-hot, without building it
            token = int(torch.argmax(penalized(logits, self.params, self._seen)))
        else:
            token = int(torch.multinomial(self.probs(logits), 1, generator=self.generator))
        self._seen[token] = True
        return token
