"""LocalEngine: the whole model on this device, the N=1 case of the mesh."""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

import torch

from ..generation.sampling import Sampler
from ..model.layers import embed, logits
from ..model.shard import Shard
from ..model.source import ModelSource
from .originator import Originator, peak_rss_bytes
from .worker import ShardWorker

log = logging.getLogger("meshllm.runtime")

__all__ = ["LocalEngine", "peak_rss_bytes"]


class LocalEngine(Originator):
    """Loads a model onto this device and serves requests one at a time."""

    def __init__(self, model, *, dtype: str | None = None, threads: int | None = None,
                 device_id: str = "local", quantize: str | None = None) -> None:
        super().__init__(model, dtype=dtype, threads=threads, quantize=quantize)
        self.device_id = device_id
        self.worker: ShardWorker | None = None

    def _load_more(self, src: ModelSource) -> None:
        self.worker = ShardWorker.load(src, Shard.full(src.config), self.dtype, self.format)
        log.info("loaded %s: %d layers, %s weights, %s activations, %.1f MB of weights", self.model_path,
                 self.config.num_layers, self.format, self.worker.act_dtype, self.weight_bytes() / 1e6)

    def weight_bytes(self) -> int:
        return self.head.nbytes() + self.worker.weight_bytes()

    def forward_sync(self, ids: Sequence[int], start: int, all_logits: bool = False) -> torch.Tensor:
        """Logits (T or 1, V) for new tokens `ids` at positions start..; updates the KV caches."""
        with torch.inference_mode():
            x = self._layers(embed(self.head, torch.tensor([list(ids)], dtype=torch.long), self.dtype), start)
            return logits(self.head, x if all_logits else x[:, -1:])[0]

    def _layers(self, x: torch.Tensor, start: int) -> torch.Tensor:
        w = self.worker
        for layer in range(self.config.num_layers):
            # N=1: the allreduce of each partial is the identity
            x = x + w.attn(layer, x, start)
            x = x + w.mlp(layer, x)
        return x

    async def _forward_hidden(self, x: torch.Tensor, start: int) -> torch.Tensor:
        return await asyncio.get_running_loop().run_in_executor(self._compute, self._hidden, x, start)

    def _hidden(self, x: torch.Tensor, start: int) -> torch.Tensor:
        with torch.inference_mode():
            return self._layers(x, start)[:, -1:]

    def _step(self, ids: list[int], start: int, sampler: Sampler) -> int:
        return sampler(self.forward_sync(ids, start)[-1])

    async def begin(self, capacity: int, keep: int = 0) -> None:
        self._kv_ids = []
        await asyncio.get_running_loop().run_in_executor(self._compute, self.worker.begin, capacity, keep)

    async def next_token(self, ids: list[int], start: int, sampler: Sampler) -> int:
        # one executor job per token: with no peers there is nothing to await between layers
        return await asyncio.get_running_loop().run_in_executor(self._compute, self._step, ids, start, sampler)

    async def end(self, history: list[int] | None = None) -> None:
        keep = history is not None and self.reuse_prefix
        await asyncio.get_running_loop().run_in_executor(self._compute, self.worker.end, keep)
        if keep:
            self._kv_ids = list(history)

    async def devices(self) -> list[dict]:
        """One entry: this device holds the whole model."""
        return [{
            "id": self.device_id,
            "role": "originator",
            "peak_rss_bytes": peak_rss_bytes(),
            "weight_bytes": self.weight_bytes(),
            "resident_weight_bytes": self.weight_bytes(),
            "disk_read_bytes": 0,
            "share": 1.0,
            "weight_format": str(self.format),
        }]
