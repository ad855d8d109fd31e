"""Originator: what the device where a request starts holds and does, whatever computes the layers.

It alone has the tokenizer, the embedding, the final norm and the LM head, and it samples: prompt text and token
ids never leave it. Subclasses supply the layers (`_forward_hidden`): the whole model here, or a mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import time
from typing import AsyncIterator

import torch

from ..discovery.probe import proc_kib
from ..generation.loop import Result, generate
from ..generation.sampling import Sampler, SamplingParams
from ..model.layers import HeadWeights, embed, logits
from ..model.loader import format_sizes, load_head, resolve_dtype, resolve_format
from ..model.weights import Format
from ..model.hub import resolve_model
from ..model.source import ModelSource, open_model
from .executors import compute_executor, io_executor, release_heap, set_torch_threads

log = logging.getLogger("meshllm.runtime")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image.

    Linux's VmHWM starts afresh at exec; getrusage's ru_maxrss does not (a child forked from a large parent
    would report the parent's size), so it is only the fallback.
    """
    return proc_kib("/proc/self/status", "VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Resident set size of this process now (Linux; 0 elsewhere)."""
    return proc_kib("/proc/self/status", "VmRSS") or 0


class Originator:
    """Base of the engines: load the head and tokenizer, encode prompts, run the decode loop."""

    def __init__(self, model: str | os.PathLike, *, dtype: str | None = None, threads: int | None = None,
                 quantize: str | Format | None = None) -> None:
        self.model_path = model
        self.dtype_name = dtype
        self.threads = threads
        self.format_asked = quantize if quantize is None or isinstance(quantize, Format) else Format.parse(quantize)
        self.format = Format()  # the weight format in use, once loaded
        self.sizes = None  # the format's sizes, for planning
        self._compute = compute_executor()
        self._io = io_executor()
        self._lock = asyncio.Lock()
        self.config = None
        self.tokenizer = None
        self.head: HeadWeights | None = None
        self._head_src = None
        self.dtype: torch.dtype = torch.float32
        self.load_s = 0.0
        # KV prefix reuse: the caches keep the last request's ids, and a request that starts with them computes
        # only what follows (a multi-turn chat prefills only the new turn)
        self.reuse_prefix = True
        self._kv_ids: list[int] = []

    async def __aenter__(self):
        t0 = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(self._io, self._load_head)
            await self._start()
        except BaseException:
            await self._stop()
            await asyncio.to_thread(self._shutdown_executors)
            raise
        self.load_s = time.perf_counter() - t0
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            await self._stop()
        finally:
            # waiting for a running job (a long prefill) must not freeze the app's loop
            await asyncio.to_thread(self._shutdown_executors)

    def _shutdown_executors(self) -> None:
        self._compute.shutdown(wait=True, cancel_futures=True)
        self._io.shutdown(wait=True, cancel_futures=True)
        if self._head_src is not None:
            self._head_src.close()
            self._head_src = None

    def _load_head(self) -> None:
        from ..tokenizer import load_tokenizer

        set_torch_threads(self.threads)
        self.model_path = resolve_model(self.model_path)  # a Hub repo id is fetched once (I/O thread)
        src = open_model(self.model_path)
        try:
            self.config = src.config
            self.dtype = resolve_dtype(self.dtype_name, src.config)
            self.format = resolve_format(self.format_asked, src)
            self.sizes = format_sizes(self.format, src, self.dtype)
            self.tokenizer = load_tokenizer(src.path)
            self.head = load_head(src, self.dtype, self.format)
            src.forget()
            self._load_more(src)
            release_heap()
        except BaseException:
            src.close()
            raise
        if self.head.exact is None:
            src.close()
        else:
            self._head_src = src  # the head reads rows of the file: open for the engine's life

    # -- for subclasses ----------------------------------------------------------------------------------------

    def _load_more(self, src: ModelSource) -> None:
        """Read whatever else this engine keeps from the model (I/O thread)."""

    async def _start(self) -> None:
        """Bring up the layers (after the head is loaded)."""

    async def _stop(self) -> None:
        """Tear down what `_start` brought up."""

    def reusable(self, ids: list[int]) -> int:
        """How many leading ids of `ids` the KV caches hold from the last request (0 when reuse is off)."""
        if not self.reuse_prefix:
            return 0
        n = 0
        for a, b in zip(self._kv_ids, ids):
            if a != b:
                break
            n += 1
        return n

    async def begin(self, capacity: int, keep: int = 0) -> None:
        raise NotImplementedError

    async def end(self, history: list[int] | None = None) -> None:
        raise NotImplementedError

    async def recover(self, error: BaseException) -> bool:
        """A request failed with `error`: can it go on (see generation.loop)? Not on one device."""
        return False

    def abort(self, reason: str) -> None:
        """Stop the running request everywhere (called when it is cancelled or fails)."""

    async def _forward_hidden(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """(1, T, d) embedded tokens at positions start.. -> (1, 1, d) final hidden state of the last one."""
        raise NotImplementedError

    def weight_bytes(self) -> int:
        return self.head.nbytes()

    # -- Backend -------------------------------------------------------------------------------------------

    async def next_token(self, ids: list[int], start: int, sampler: Sampler) -> int:
        loop = asyncio.get_running_loop()
        x = await loop.run_in_executor(self._compute, self._embed, ids)
        h = await self._forward_hidden(x, start)
        return await loop.run_in_executor(self._compute, self._sample, h, sampler)

    def _embed(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return embed(self.head, torch.tensor([ids], dtype=torch.long), self.dtype)

    def _sample(self, h: torch.Tensor, sampler: Sampler) -> int:
        return sampler(self._logits(h))

    # -- requests ------------------------------------------------------------------------------------------

    async def score(self, ids: list[int]) -> torch.Tensor:
        """fp32 logits (V,) for the token after `ids` (a one-step request, for checks and ranking)."""
        async with self._lock:
            await self.begin(len(ids))
            try:
                loop = asyncio.get_running_loop()
                x = await loop.run_in_executor(self._compute, self._embed, ids)
                h = await self._forward_hidden(x, 0)
                return await loop.run_in_executor(self._compute, self._logits, h)
            finally:
                await self.end()

    def _logits(self, h: torch.Tensor, also: int | None = None) -> torch.Tensor:
        with torch.inference_mode():
            exact = None if also is None else torch.tensor([also])
            return logits(self.head, h.to(self.dtype), exact)[0, -1]

    async def token_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i = 1..: one decode step per token, as generation runs them (for perplexity;
        the target's logit is exact even where a quantized head only approximates the tail)."""
        async with self._lock:
            await self.begin(len(ids))
            try:
                loop = asyncio.get_running_loop()
                out = []
                for i in range(len(ids) - 1):
                    x = await loop.run_in_executor(self._compute, self._embed, ids[i:i + 1])
                    h = await self._forward_hidden(x, i)
                    lg = await loop.run_in_executor(self._compute, self._logits, h, ids[i + 1])
                    out.append(float(torch.log_softmax(lg, -1)[ids[i + 1]]))
                return out
            finally:
                await self.end()

    def encode_prompt(self, prompt: str | list[dict], chat: bool | None = None) -> list[int]:
        """Token ids for a prompt: chat-templated when `chat` (default: when the model has a template)."""
        tok = self.tokenizer
        if isinstance(prompt, list):
            chat = True
        if chat is None:
            chat = tok.chat_template is not None
        if not chat:
            return tok.encode(prompt)
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)

    async def stream(self, prompt: str | list[dict], params: SamplingParams = SamplingParams(), *,
                     chat: bool | None = None, result: Result | None = None) -> AsyncIterator[str]:
        """Yield text pieces as they are generated; requests run one at a time, never interleaved."""
        result = result if result is not None else Result()
        async with self._lock:
            t0 = time.perf_counter()
            ids = self.encode_prompt(prompt, chat)
            # closing this stream must close the decode loop now (its abort), not whenever it is collected
            async with contextlib.aclosing(generate(self, self.tokenizer, ids, params, result, started=t0)) as gen:
                async for piece in gen:
                    yield piece

    async def generate(self, prompt: str | list[dict], params: SamplingParams = SamplingParams(), *,
                       chat: bool | None = None) -> Result:
        """Run a request to the end and return its Result."""
        result = Result()
        async for _ in self.stream(prompt, params, chat=chat, result=result):
            pass
        return result

    async def devices(self) -> list[dict]:
        """The devices of this engine, for reports."""
        raise NotImplementedError
