"""The decode loop every backend shares: prompt ids in, text pieces out, with stop rules and timings."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from ..errors import HandshakeError, LinkError, MeshError, PromptTooLongError, RequestError

RETRIES = 3  # a request resumes on a new plan at most this many times (each after a device is lost)


def recoverable(error: BaseException) -> bool:
    """A failure a new plan may get past: a link lost, timed out, refused on the way or a device's own report of
    one; not a wrong secret or version (a new plan meets the same devices)."""
    return isinstance(error, LinkError) and not isinstance(error, HandshakeError)
from ..model.config import ModelConfig
from .sampling import Sampler, SamplingParams


class Backend(Protocol):
    """Where the forward pass runs: one device, or a mesh of them.

    KV prefix reuse: `reusable(ids)` is how many leading positions of `ids` the backend still holds in its KV
    caches from the last request; `begin(capacity, keep)` keeps that many; `end(history)` says which ids the caches
    now hold (None: nothing reusable, e.g. after a failure)."""

    config: ModelConfig

    def reusable(self, ids: list[int]) -> int: ...

    async def begin(self, capacity: int, keep: int = 0) -> None: ...

    async def next_token(self, ids: list[int], start: int, sampler: Sampler) -> int: ...

    async def end(self, history: list[int] | None = None) -> None: ...

    def abort(self, reason: str) -> None: ...

    async def recover(self, error: BaseException) -> bool:
        """After `error` failed a request (a device lost): make the backend able to run again (a new plan over the
        devices still there) and say so, or False when it cannot."""
        ...


@dataclass
class Result:
    """A finished generation."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was kept from the last request (not computed again)
    finish_reason: str = ""  # "stop" (EOS or a stop string) or "length"
    ttft_s: float = 0.0
    token_times: list[float] = field(default_factory=list)  # seconds since request start, per token

    @property
    def token_latency_s(self) -> float:
        """Median seconds per generated token after the first."""
        gaps = [b - a for a, b in zip(self.token_times, self.token_times[1:])]
        return statistics.median(gaps) if gaps else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
            "ttft_s": self.ttft_s,
            "token_latency_s": self.token_latency_s,
        }


class StopStrings:
    """Holds back text that may be the start of a stop string, so a stop string is never emitted."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        self._buf += text
        hits = [i for i in (self._buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._buf = self._buf[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self._buf)), keep, -1):
                if self._buf.endswith(s[:n]):
                    keep = n
                    break
        out = self._buf[: len(self._buf) - keep]
        self._buf = self._buf[len(out):]
        return out, False

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out


async def generate(backend: Backend, tokenizer, prompt_ids: list[int], params: SamplingParams,
                   result: Result, started: float | None = None) -> AsyncIterator[str]:
    """Run one request on `backend`, yielding text pieces as they complete; fills `result`."""
    from ..tokenizer import StreamDecoder

    params.check()
    config = backend.config
    n = len(prompt_ids)
    if n == 0:
        raise RequestError("the prompt is empty after tokenization; give some text")
    context = config.max_position_embeddings
    if n >= context:
        raise PromptTooLongError(
            f"the prompt is {n} tokens but the model's context is {context}; shorten the prompt"
        )
    max_new = min(params.max_tokens, context - n)
    t0 = time.perf_counter() if started is None else started
    result.prompt_tokens = n
    sampler = Sampler(params, config.vocab_size)
    sampler.observe(prompt_ids)
    decoder = StreamDecoder(tokenizer)
    stopper = StopStrings(tuple(params.stop))
    eos = set() if params.ignore_eos else {*tokenizer.eos_ids, *config.eos_token_ids}
    # the longest prefix the backend's caches still hold (at least the last prompt token is computed: its logits
    # give the first new token)
    keep = min(backend.reusable(prompt_ids), n - 1)
    result.cached_tokens = keep
    lost: list[str] = []
    while True:
        done = None
        try:
            async with contextlib.aclosing(_run(backend, prompt_ids, result, sampler, decoder, stopper, eos,
                                                 max_new, keep, t0)) as pieces:
                async for piece in pieces:
                    yield piece
            return
        except BaseException as e:
            if isinstance(e, Exception) and recoverable(e) and len(lost) < RETRIES:
                lost.append(str(e))
                done = e
            else:
                raise _final(e, result, lost)
        try:
            recovered = await backend.recover(done)
        except Exception as e:
            raise _final(e, result, lost) from done
        if not recovered:
            raise _final(done, result, lost[:-1])
        keep = 0  # a new plan holds no caches: the prompt and every token so far are computed again


def _final(error: BaseException, result: Result, lost: list[str]) -> BaseException:
    """The error a request ends with: it carries the tokens already made (`.result`, never thrown away) and,
    when the request had resumed, names what was lost before."""
    if lost and isinstance(error, MeshError):
        try:
            wrapped = type(error)(f"{error} (the request had resumed after: {'; '.join(lost)})")
        except TypeError:
            wrapped = None
        if wrapped is not None:
            wrapped.__cause__ = error
            error = wrapped
    error.result = result
    return error


async def _run(backend: Backend, prompt_ids: list[int], result: Result, sampler: Sampler, decoder, stopper,
               eos: set[int], max_new: int, keep: int, t0: float) -> AsyncIterator[str]:
    """The request from where `result` stands (its tokens so far fed back as prompt): at most max_new tokens.
    The sampler, decoder and stop rules carry on from there, so a resumed run gives the same ids and text."""
    made = list(result.token_ids)
    fed = list(prompt_ids) + made  # every id whose KV the next token needs
    n = len(prompt_ids)
    await backend.begin(n + max_new, keep)
    history = None
    try:
        ids, start = fed[keep:], keep
        result.finish_reason = "length"
        hit = False
        for _ in range(max_new - len(made)):
            token = await backend.next_token(ids, start, sampler)
            now = time.perf_counter() - t0
            if not result.token_ids:
                result.ttft_s = now
            result.token_ids.append(token)
            result.token_times.append(now)
            if token in eos:
                result.finish_reason = "stop"
                break
            piece, hit = stopper.push(decoder.push(token))
            if piece:
                result.text += piece
                yield piece
            if hit:
                result.finish_reason = "stop"
                break
            start += len(ids)
            ids = [token]
        # the caches hold every id fed so far: the prompt and each generated token but the last
        history = list(prompt_ids) + result.token_ids[:-1]
        if not hit:
            piece, hit = stopper.push(decoder.flush())
            if not hit:
                piece += stopper.flush()
            else:
                result.finish_reason = "stop"
            if piece:
                result.text += piece
                yield piece
    except BaseException as e:
        # cancelled (Ctrl-C, a closed stream) or failed: tell every device to stop this request now
        history = None
        result.finish_reason = ""
        backend.abort(f"{type(e).__name__}: {e}".rstrip(": "))
        raise
    finally:
        await backend.end(history)
