"""ShardWorker: one device's slice of every layer and its KV caches; the compute behind each phase."""

from __future__ import annotations

import copy
import statistics
import time

import torch

from ..model.config import ModelConfig
from ..model.layers import AttnBlock, LayerKV, MlpBlock, Rotary, attn_partial, mlp_partial
from ..model.loader import load_attn_block, load_mlp_block
from ..model.weights import ACT, Format
from ..model.shard import Shard
from ..model.source import ModelSource
from .executors import release_heap


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
        attn, mlp = [], []
        for i in shard.layers(c):
            attn.append(load_attn_block(src, i, shard, dtype, fmt))
            mlp.append(load_mlp_block(src, i, shard, dtype, fmt))
            src.forget()  # the file's pages of this layer: copied, so not held twice
            release_heap()  # nor the temporaries its conversion freed
        return cls(c, shard, attn, mlp, dtype, act_dtype(dtype, fmt))

    def weight_bytes(self) -> int:
        return sum(b.nbytes() for b in self.attn_blocks) + sum(b.nbytes() for b in self.mlp_blocks)

    def begin(self, capacity: int, keep: int = 0) -> None:
        """KV caches for a new request of up to `capacity` positions: the last request's first `keep` positions
        kept (its prompt prefix, which the new prompt shares), the rest fresh."""
        kv0, kv1 = self.shard.kv_range(self.config)
        if keep and self.caches:
            # positions keep.. are overwritten as the request runs; a cache grows (copying 0..keep) when it must
            self.capacity = max(capacity, self.capacity)
        else:
            self.caches = [LayerKV(kv1 - kv0, self.config.head_dim, capacity, self.act_dtype)
                           for _ in self.shard.layers(self.config)]
            self.capacity = capacity
        self._cos_sin = None

    def end(self, keep: bool = False) -> None:
        """The request is over: drop the KV caches, or keep them for the next request's shared prefix."""
        if not keep:
            self.caches = []

    def _rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # every layer of a step shares the same positions: compute cos/sin once per step
        if self._cos_sin is None or self._cos_sin[:2] != (start, length):
            self._cos_sin = (start, length, self.rotary.cos_sin(start, length, self.act_dtype))
        return self._cos_sin[2]

    def attn(self, layer: int, x: torch.Tensor, start: int, blk: AttnBlock | None = None) -> torch.Tensor:
        """This shard's attention partial for its `layer`-th layer (its resident block, or `blk`), updating its
        KV cache."""
        cos, sin = self._rope(start, x.shape[1])
        return attn_partial(blk or self.attn_blocks[layer], x, cos, sin, self.caches[layer], start)

    def mlp(self, layer: int, x: torch.Tensor, blk: MlpBlock | None = None) -> torch.Tensor:
        """This shard's MLP partial for `layer` (its resident block, or `blk`)."""
        return mlp_partial(blk or self.mlp_blocks[layer], x)


def _random_worker(config, fmt: "Format", g: torch.Generator) -> "ShardWorker":
    """One random layer of `config` in format `fmt`, the whole of it on one worker (fp32 residual stream)."""
    from ..model.loader import BlockTensors, attn_block, mlp_block
    from ..model.gguf_quants import quantize_int4, quantize_rows_int8
    from ..model.weights import PortableInt4

    c, d, hd = config, config.hidden_size, config.head_dim
    shard = Shard.full(c)
    act = act_dtype(torch.float32, fmt)
    attn, mlp = BlockTensors(), BlockTensors()
    for b in (attn, mlp):
        b.tensors["norm"] = torch.ones(d)
    for b, name, rows, cols in ((attn, "wqkv", (c.num_heads + 2 * c.num_kv_heads) * hd, d),
                                (attn, "wo", d, c.num_heads * hd), (mlp, "w13", 2 * c.intermediate_size, d),
                                (mlp, "w2", d, c.intermediate_size)):
        w = torch.randn(rows, cols, generator=g) / 8
        m = w if not fmt.quantized else (PortableInt4(*quantize_int4(w.numpy(), 32), 32) if fmt.kind == "int4"
                                         else _int8_rows(*quantize_rows_int8(w.numpy())))
        b.put(name, m, act, "random layer")
    return ShardWorker(c, shard, [attn_block(attn.device_form(), c, shard)], [mlp_block(mlp.device_form(), c)],
                       torch.float32, act)


def _layer_config(d: int, inter: int, heads: int, kv: int):
    from ..model.config import ModelConfig

    return ModelConfig(hidden_size=d, intermediate_size=inter, num_layers=1, num_heads=heads, num_kv_heads=kv,
                       head_dim=d // heads, vocab_size=16, rms_norm_eps=1e-5, max_position_embeddings=16)


def warm_up() -> None:
    """Run each kind of phase once on a tiny random layer (dense fp32, int8, int4; a prefill and a decode step), in
    the compute thread at start: the kernels' self-test runs and the code they use is paged in now, so a device's
    memory and first-request latency afterwards are its model's, not the runtime's first use."""
    from ..model.weights import kernels

    kernels()
    c = _layer_config(64, 64, 2, 1)
    g = torch.Generator().manual_seed(0)
    for fmt in (Format(), Format("int8"), Format("int4")):
        worker = _random_worker(c, fmt, g)
        worker.begin(8)
        with torch.inference_mode():
            for x, start in ((torch.randn(1, 3, 64, generator=g), 0), (torch.randn(1, 1, 64, generator=g), 3)):
                x = x + worker.attn(0, x, start)
                worker.mlp(0, x)
        worker.end()


LARGE_COPIES = 8  # x 2.8-11 MB: past the last-level cache of the CPUs we meet


def phase_costs(steps: int = 12) -> dict[str, list[float]]:
    """Per weight kind (dense fp32, int8, int4): [fixed seconds per phase, bytes per second] of a decode phase on
    this device with torch's current threads, fitted through a tiny layer (d=64: nearly all dispatch) and a 1B-model
    layer (d=1024: nearly all weight reads). The planner predicts a phase of B bytes as fixed + B / rate (a SmolLM2
    layer, measured against this fit: within 10%)."""
    from ..cluster.plan import Sizes, block_bytes
    from ..model.weights import kernels

    kernels()
    g = torch.Generator().manual_seed(1)
    out = {}
    for fmt in (Format(), Format("int8"), Format("int4")):
        kind = {"int4": "int4:32", "int8": "int8"}.get(fmt.kind)
        z = Sizes("float32", tuple((f, kind) for f in ("qkv", "o", "w13", "w2")) if kind else ())
        points = []
        # the large layer as several copies visited in turn, as a model's layers are: one layer repeated would be
        # read from the CPU's caches, and a rate from there is not the memory's
        for c, copies in ((_layer_config(64, 64, 2, 1), 1), (_layer_config(1024, 2816, 16, 4), LARGE_COPIES)):
            first = _random_worker(c, fmt, g)
            workers = [first] + [copy.deepcopy(first) for _ in range(copies - 1)]  # own memory, same values
            for w in workers:
                w.begin(8)
            x, runs = torch.randn(1, 1, c.hidden_size, generator=g), []
            with torch.inference_mode():
                for i in range(steps + 2):
                    worker = workers[i % copies]
                    t0 = time.perf_counter()
                    y = x + worker.attn(0, x, 4)
                    worker.mlp(0, y)
                    runs.append((time.perf_counter() - t0) / 2)
            points.append((statistics.median(runs[2:]), sum(block_bytes(c, workers[0].shard, z)) / 2))
            del workers, worker
        (t1, b1), (t2, b2) = points
        rate = (b2 - b1) / max(t2 - t1, 1e-9)
        out[fmt.kind] = [max(t1 - b1 / rate, 1e-6), rate]
    return out


def _int8_rows(q, scale):
    from ..model.loader import Int8Rows

    return Int8Rows(q, scale)
