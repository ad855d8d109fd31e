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


class Sampler:
    """Picks the next token from fp32 logits; processors in transformers' order (penalty, temperature, k, p)."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        self._seen = torch.zeros(vocab_size, dtype=torch.bool)

    def observe(self, ids: list[int]) -> None:
        """Record tokens the repetition penalty applies to (the prompt, then each sampled token)."""
        if ids and self.params.repetition_penalty != 1.0:
            self._seen[torch.tensor(ids, dtype=torch.long)] = True

    def __call__(self, logits: torch.Tensor) -> int:
        """(V,) logits -> token id."""
        p = self.params
        scores = logits.float()
        if p.repetition_penalty != 1.0 and self._seen.any():
            seen = self._seen[: scores.shape[0]]
            picked = scores[seen]
            scores = scores.clone()
            scores[seen] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if p.temperature == 0:
            token = int(torch.argmax(scores))
        else:
            scores = scores / p.temperature
            if p.top_k and p.top_k < scores.shape[0]:
                kth = torch.topk(scores, p.top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_scores, order = torch.sort(scores, descending=False)
                cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
                drop = cumulative <= (1 - p.top_p)
                drop[-1] = False  # always keep the most likely token
                scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
            probs = scores.softmax(dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if p.repetition_penalty != 1.0:
            self._seen[token] = True
        return token
