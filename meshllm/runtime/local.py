"""LocalEngine: the whole model on this device, the N=1 case of the mesh."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from typing import AsyncIterator, Sequence

import torch

from ..generation.loop import Result, generate
from ..generation.sampling import Sampler, SamplingParams
from ..model.layers import HeadWeights, embed, logits
from ..model.loader import load_head, resolve_dtype
from ..model.shard import Shard
from ..model.source import open_model
from .executors import compute_executor, io_executor, set_torch_threads
from .worker import ShardWorker

log = logging.getLogger("meshllm.runtime")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class LocalEngine:
    """Loads a model onto this device and serves requests one at a time."""

    def __init__(self, model: str | os.PathLike, *, dtype: str | None = None, threads: int | None = None,
                 device_id: str = "local") -> None:
        self.model_path = model
        self.dtype_name = dtype
        self.threads = threads
        self.device_id = device_id
        self._compute = compute_executor()
        self._io = io_executor()
        self._lock = asyncio.Lock()
        self.config = None
        self.tokenizer = None
        self.head: HeadWeights | None = None
        self.worker: ShardWorker | None = None
        self.load_s = 0.0

    async def __aenter__(self) -> "LocalEngine":
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            await loop.run_in_executor(self._io, self._load)
        except BaseException:
            self._shutdown()
            raise
        self.load_s = time.perf_counter() - t0
        return self

    async def __aexit__(self, *exc) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        self._compute.shutdown(wait=True, cancel_futures=True)
        self._io.shutdown(wait=True, cancel_futures=True)

    def _load(self) -> None:
        from ..tokenizer import load_tokenizer

        set_torch_threads(self.threads)
        src = open_model(self.model_path)
        try:
            self.config = src.config
            self.dtype = resolve_dtype(self.dtype_name, src.config)
            self.tokenizer = load_tokenizer(src.path)
            self.head = load_head(src, self.dtype)
            self.worker = ShardWorker.load(src, Shard.full(src.config), self.dtype)
        finally:
            src.close()
        log.info("loaded %s: %d layers, %s, %.1f MB of weights", self.model_path, self.config.num_layers,
                 self.dtype, self.weight_bytes() / 1e6)

    def weight_bytes(self) -> int:
        return self.head.nbytes() + self.worker.weight_bytes()

    # -- the forward pass (compute thread) --------------------------------------------------------------

    def forward_sync(self, ids: Sequence[int], start: int, all_logits: bool = False) -> torch.Tensor:
        """Logits (T or 1, V) for new tokens `ids` at positions start..; updates the KV caches."""
        with torch.inference_mode():
            x = embed(self.head, torch.tensor([list(ids)], dtype=torch.long))
            w = self.worker
            for layer in range(self.config.num_layers):
                # N=1: the allreduce of each partial is the identity
                x = x + w.attn(layer, x, start)
                x = x + w.mlp(layer, x)
            return logits(self.head, x if all_logits else x[:, -1:])[0]

    def _step(self, ids: list[int], start: int, sampler: Sampler) -> int:
        return sampler(self.forward_sync(ids, start)[-1])

    # -- Backend -------------------------------------------------------------------------------------------

    async def begin(self, capacity: int) -> None:
        await asyncio.get_running_loop().run_in_executor(self._compute, self.worker.begin, capacity)

    async def next_token(self, ids: list[int], start: int, sampler: Sampler) -> int:
        return await asyncio.get_running_loop().run_in_executor(self._compute, self._step, ids, start, sampler)

    async def end(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._compute, self.worker.end)

    # -- requests ------------------------------------------------------------------------------------------

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
        """Yield text pieces as they are generated; requests run one at a time."""
        result = result if result is not None else Result()
        async with self._lock:
            t0 = time.perf_counter()
            ids = self.encode_prompt(prompt, chat)
            async for piece in generate(self, self.tokenizer, ids, params, result, started=t0):
                yield piece

    async def generate(self, prompt: str | list[dict], params: SamplingParams = SamplingParams(), *,
                       chat: bool | None = None) -> Result:
        """Run a request to the end and return its Result."""
        result = Result()
        async for _ in self.stream(prompt, params, chat=chat, result=result):
            pass
        return result

    def devices(self) -> list[dict]:
        """One entry: this device holds the whole model."""
        return [{
            "id": self.device_id,
            "role": "originator",
            "peak_rss_bytes": peak_rss_bytes(),
            "weight_bytes": self.weight_bytes(),
            "share": 1.0,
        }]
