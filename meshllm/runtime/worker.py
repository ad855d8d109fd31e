"""ShardWorker: one device's slice of every layer and its KV caches; the compute behind each phase."""

from __future__ import annotations

import torch

from ..model.config import ModelConfig
from ..model.layers import AttnBlock, LayerKV, MlpBlock, Rotary, attn_partial, mlp_partial
from ..model.loader import load_attn_block, load_mlp_block
from ..model.weights import ACT, Format
from ..model.shard import Shard
from ..model.source import ModelSource


def act_dtype(dtype: torch.dtype, fmt: Format) -> torch.dtype:
    """The dtype of the matmuls' activations: bf16 for the quantized kernels, else the compute dtype."""
    return ACT if fmt.quantized else dtype


class ShardWorker:
    """Weights of one shard, all layers resident, and the per-request caches. Runs on the compute thread."""

    def __init__(self, config: ModelConfig, shard: Shard, attn: list[AttnBlock], mlp: list[MlpBlock],
                 dtype: torch.dtype, act_dtype: torch.dtype | None = None) -> None:
        self.config, self.shard, self.dtype = config, shard, dtype  # dtype: the residual stream's
        self.act_dtype = act_dtype or dtype  # the matmuls' activations, hence q/k/v and the KV caches
        self.attn_blocks, self.mlp_blocks = attn, mlp
        self.rotary = Rotary(config)
        self.caches: list[LayerKV] = []
        self.capacity = 0
        self._cos_sin: tuple[int, int, tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def load(cls, src: ModelSource, shard: Shard, dtype: torch.dtype, fmt: Format = Format()) -> "ShardWorker":
        """Read this shard's slices of every layer (blocking: call from the I/O executor)."""
        c = src.config
        shard.check(c)
        attn = [load_attn_block(src, i, shard, dtype, fmt) for i in range(c.num_layers)]
        mlp = [load_mlp_block(src, i, shard, dtype, fmt) for i in range(c.num_layers)]
        return cls(c, shard, attn, mlp, dtype, act_dtype(dtype, fmt))

    def weight_bytes(self) -> int:
        return sum(b.nbytes() for b in self.attn_blocks) + sum(b.nbytes() for b in self.mlp_blocks)

    def begin(self, capacity: int) -> None:
        """Fresh KV caches for a new request of up to `capacity` positions."""
        kv0, kv1 = self.shard.kv_range(self.config)
        self.caches = [LayerKV(kv1 - kv0, self.config.head_dim, capacity, self.act_dtype)
                       for _ in range(self.config.num_layers)]
        self.capacity = capacity
        self._cos_sin = None

    def end(self) -> None:
        self.caches = []

    def _rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # every layer of a step shares the same positions: compute cos/sin once per step
        if self._cos_sin is None or self._cos_sin[:2] != (start, length):
            self._cos_sin = (start, length, self.rotary.cos_sin(start, length, self.act_dtype))
        return self._cos_sin[2]

    def attn(self, layer: int, x: torch.Tensor, start: int, blk: AttnBlock | None = None) -> torch.Tensor:
        """This shard's attention partial for `layer` (its resident block, or `blk`), updating its KV cache."""
        cos, sin = self._rope(start, x.shape[1])
        return attn_partial(blk or self.attn_blocks[layer], x, cos, sin, self.caches[layer], start)

    def mlp(self, layer: int, x: torch.Tensor, blk: MlpBlock | None = None) -> torch.Tensor:
        """This shard's MLP partial for `layer` (its resident block, or `blk`)."""
        return mlp_partial(blk or self.mlp_blocks[layer], x)
