"""Planning: (model config, device capabilities) -> who computes which slice. Pure and deterministic.

Attention splits by query heads (a device computes the kv heads its q heads read, so devices may outnumber kv
heads); the MLP splits by columns of gate/up (rows of down) in multiples of an alignment. Shares follow the
capability weights by largest remainder; ties go to the lower rank, so every device computes the same plan.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

from ..errors import PlanError
from ..model.config import ModelConfig
from ..model.shard import Shard
from ..wire.frames import DTYPE_SIZES



@dataclass(frozen=True)
class DeviceSpec:
    """What planning needs of a device: a name, a capability weight, an optional weight-memory budget."""

    name: str
    weight: float = 1.0
    budget_bytes: int | None = None


@dataclass(frozen=True)
class Plan:
    """One shard per device (rank order) and the hub's rank. A plan of several stages (a pipeline, or a hybrid of
    tensor-parallel groups) lists the ranks of each stage in layer order and each stage's hub; a stage's shards
    hold its range of layers. Tensor parallelism is the plan of one stage over every device."""

    shards: tuple[Shard, ...]
    devices: tuple[DeviceSpec, ...]
    hub: int
    sizes: Sizes
    shard_bytes: tuple[int, ...] = field(default=())
    stages: tuple[tuple[int, ...], ...] = ()  # empty: one stage of every rank, `hub` its hub
    hubs: tuple[int, ...] = ()

    @property
    def world(self) -> int:
        return len(self.shards)

    @property
    def groups(self) -> tuple[tuple[tuple[int, ...], int], ...]:
        """(ranks, hub rank) of each stage, in layer order."""
        if not self.stages:
            return ((tuple(range(self.world)), self.hub),)
        return tuple(zip(self.stages, self.hubs))

    @property
    def kind(self) -> str:
        """'single', 'tp' (one stage of several), 'pipeline' (stages of one) or 'hybrid'."""
        groups = self.groups
        if len(groups) == 1:
            return "single" if self.world == 1 else "tp"
        return "pipeline" if all(len(g) == 1 for g, _ in groups) else "hybrid"

    def describe(self) -> str:
        """'tp over a, b' / 'pipeline a [0, 15) -> b [15, 30)' ..."""
        if len(self.groups) == 1:
            return f"{self.kind} on {', '.join(d.name for d in self.devices)}"
        parts = []
        for ranks, _ in self.groups:
            s = self.shards[ranks[0]]
            names = "+".join(self.devices[r].name for r in ranks)
            parts.append(f"{names} [{s.layer_start}, {s.layer_stop})")
        return f"{self.kind}: " + " -> ".join(parts)

    def share(self, rank: int, config: ModelConfig) -> float:
        """Fraction of the decoder weights rank holds (kv projections counted where replicated)."""
        total = layer_bytes(config, Shard.full(config), self.sizes)
        return layer_bytes(config, self.shards[rank], self.sizes) / total


def _split(total: int, weights: Sequence[float], unit: int, minimum: int) -> list[int]:
    """Split `total` into parts proportional to `weights`, in multiples of `unit` (the last part also takes the
    remainder below a unit), each at least `minimum` units; largest remainders round up, ties to lower ranks."""
    units, rest = divmod(total, unit)
    n = len(weights)
    if units < n * minimum:
        raise PlanError(f"cannot give {n} devices at least {minimum} of {units} units each")
    # devices whose proportional share falls under the minimum are pinned to it; the rest share what is left.
    # Exact fractions: in floats, two equal remainders can come out unequal and break the tie rule.
    ws = [Fraction(w) for w in weights]
    pinned: set[int] = set()
    while True:
        free = units - minimum * len(pinned)
        wsum = sum(ws[i] for i in range(n) if i not in pinned)
        exact = [Fraction(minimum) if i in pinned else free * ws[i] / wsum for i in range(n)]
        low = {i for i in range(n) if i not in pinned and exact[i] < minimum}
        if not low:
            break
        pinned |= low
    counts = [int(e) for e in exact]
    order = sorted((i for i in range(n) if i not in pinned), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: units - sum(counts)]:
        counts[i] += 1
    sizes = [c * unit for c in counts]
    sizes[-1] += rest
    return sizes


FILE_SLACK = 16 * 1024  # a block file's safetensors header, with room to spare
FAMILIES = ("qkv", "o", "w13", "w2", "head")


@dataclass(frozen=True)
class Sizes:
    """How a format stores the weights, for their bytes and the splits its kernels allow: `dtype` (the compute
    dtype: norms, and every matrix of a dense format) and, per matrix family (q|k|v, o, gate|up, down, the
    embedding/LM head), 'dense', 'int8' (a byte a weight and a scale per row) or 'int4:G' (half a byte a weight
    and a bf16 scale and zero per group of G). Quantized formats keep their dense matrices and biases in bf16."""

    dtype: str = "float32"
    kinds: tuple[tuple[str, str], ...] = ()  # (family, kind); families not named are dense

    @classmethod
    def of(cls, dtype: "str | Sizes") -> "Sizes":
        return dtype if isinstance(dtype, Sizes) else cls(dtype)

    def kind(self, family: str) -> str:
        return dict(self.kinds).get(family, "dense")

    @property
    def quantized(self) -> bool:
        return any(k != "dense" for _, k in self.kinds)

    @property
    def act_bytes(self) -> int:
        """Bytes of a bias value, or of a weight kept dense."""
        return 2 if self.quantized else DTYPE_SIZES.get(self.dtype, 4)

    def matrix(self, n: int, k: int, family: str) -> int:
        kind = self.kind(family)
        if kind == "int8":
            return n * k + 2 * n
        if kind.startswith("int4:"):
            return n * k // 2 + 4 * n * (k // int(kind[5:]))
        return n * k * self.act_bytes

    def k_unit(self, family: str) -> int:
        """Input columns of a family's matrix come in multiples of this (int4 groups; int8's 16)."""
        kind = self.kind(family)
        return int(kind[5:]) if kind.startswith("int4:") else 16 if kind == "int8" else 1

    def __str__(self) -> str:
        kinds = sorted({k for _, k in self.kinds if k != "dense"})
        return "+".join(kinds) if kinds else self.dtype


def block_bytes(config: ModelConfig, shard: Shard, dtype: "str | Sizes") -> tuple[int, int]:
    """Bytes of one layer's attention block and MLP block of a shard as files (the scheduler's unit)."""
    z = Sizes.of(dtype)
    b, a = DTYPE_SIZES.get(z.dtype, 4), z.act_bytes
    d, hd = config.hidden_size, config.head_dim
    kv0, kv1 = shard.kv_range(config)
    q, kv = shard.num_q * hd, (kv1 - kv0) * hd
    attn = z.matrix(q + 2 * kv, d, "qkv") + z.matrix(d, q, "o") + d * b
    mlp = z.matrix(2 * shard.num_mlp, d, "w13") + z.matrix(d, shard.num_mlp, "w2") + d * b
    owned = d if shard.owns_bias else 0  # the o_proj / down_proj bias lives on one shard only
    if config.attention_bias:
        attn += (q + 2 * kv + owned) * a
    if config.mlp_bias:
        mlp += (2 * shard.num_mlp + owned) * a
    return attn + FILE_SLACK, mlp + FILE_SLACK


def layer_bytes(config: ModelConfig, shard: Shard, dtype: "str | Sizes") -> int:
    """Bytes of one shard's weights over its layers (norms and biases included)."""
    return len(shard.layers(config)) * (sum(block_bytes(config, shard, dtype)) - 2 * FILE_SLACK)


def head_bytes(config: ModelConfig, dtype: "str | Sizes") -> int:
    """Bytes of the originator's embedding, final norm and LM head (a tied int4 head keeps a second copy in the
    kernel's layout; a tied int8 or dense one shares the embedding's)."""
    z = Sizes.of(dtype)
    table = z.matrix(config.vocab_size, config.hidden_size, "head")
    second = not config.tie_word_embeddings or z.kind("head").startswith("int4:")
    return table * (2 if second else 1) + config.hidden_size * DTYPE_SIZES.get(z.dtype, 4)


def mlp_alignment(config: ModelConfig, world: int) -> int:
    """Column granularity: 64 where the width allows, smaller for small models."""
    for unit in (64, 32, 16, 8):
        if config.intermediate_size >= unit * world * 2:
            return unit
    return 1


def make_plan(config: ModelConfig, devices: Sequence[DeviceSpec], dtype: "str | Sizes",
              hub: int | None = None) -> Plan:
    """Split every layer over `devices` in proportion to their weights; fails early with the reason.

    Splits fall where the format's kernels can take them: o_proj's input columns (whole heads) and down_proj's
    (MLP columns) on whole int4 groups or int8's 16."""
    z = Sizes.of(dtype)
    n = len(devices)
    if n == 0:
        raise PlanError("no devices to plan over")
    o_unit = z.k_unit("o")
    head_unit = o_unit // math.gcd(o_unit, config.head_dim)  # heads whose o_proj columns make whole groups
    if n > config.num_heads // head_unit:
        if head_unit == 1:
            raise PlanError(
                f"{n} devices but the model has only {config.num_heads} attention heads: every device needs at "
                f"least one; use at most {config.num_heads} devices")
        raise PlanError(
            f"{n} devices but with {z.kind('o')} weights the {config.num_heads} attention heads split in units of "
            f"{head_unit} (o_proj columns in groups of {o_unit}): use at most {config.num_heads // head_unit} devices, "
            f"or a smaller int4 group")
    if any(not (d.weight > 0 and math.isfinite(d.weight)) for d in devices):
        raise PlanError("every device's capability weight must be a positive finite number, got "
                        + ", ".join(f"{d.name}={d.weight}" for d in devices))
    weights = [d.weight for d in devices]
    heads = _split(config.num_heads, weights, head_unit, 1)
    mlp_unit = math.lcm(mlp_alignment(config, n), z.k_unit("w2"))
    cols = _split(config.intermediate_size, weights, mlp_unit, 0)
    shards, q, c = [], 0, 0
    for rank in range(n):
        shards.append(Shard(q, q + heads[rank], c, c + cols[rank], owns_bias=rank == 0))
        q += heads[rank]
        c += cols[rank]
    sizes = tuple(layer_bytes(config, s, z) for s in shards)
    for dev, shard in zip(devices, shards):
        smallest = max(block_bytes(config, shard, z))
        if dev.budget_bytes is not None and dev.budget_bytes < smallest:
            raise PlanError(
                f"device {dev.name}'s memory budget of {human_bytes(dev.budget_bytes)} cannot hold even one block of "
                f"its share (the largest is {human_bytes(smallest)}); the smallest budget that works is "
                f"{human_bytes(smallest)} ({smallest} bytes; more devices or a smaller weight for it also help)"
            )
    if hub is None:
        hub = elect_hub(devices)
    return Plan(tuple(shards), tuple(devices), hub, z, sizes)


def staged_plan(config: ModelConfig, devices: Sequence[DeviceSpec], dtype: "str | Sizes",
                stages: Sequence[Sequence[int]], layers: Sequence[int] | None = None) -> Plan:
    """A plan of consecutive stages, each a tensor-parallel group over `devices[i] for i in stage` holding
    `layers[s]` whole layers (default: in proportion to the stage's summed weight). One stage of every device is
    plain tensor parallelism; stages of one device, a pipeline."""
    z = Sizes.of(dtype)
    if not stages or any(not st for st in stages):
        raise PlanError("a plan needs at least one stage, and every stage at least one device")
    flat = [i for st in stages for i in st]
    if len(set(flat)) != len(flat) or not all(0 <= i < len(devices) for i in flat):
        raise PlanError(f"stages {stages} must name distinct devices among {len(devices)}")
    if layers is None:
        if len(stages) > config.num_layers:
            raise PlanError(f"{len(stages)} stages but the model has only {config.num_layers} layers")
        layers = _split(config.num_layers, [sum(devices[i].weight for i in st) for st in stages], 1, 1)
    if len(layers) != len(stages) or sum(layers) != config.num_layers or min(layers) < 1:
        raise PlanError(f"layers per stage {list(layers)} must be {len(stages)} positive counts summing to "
                        f"{config.num_layers}")
    shards, specs, groups, hubs, sizes, first = [], [], [], [], [], 0
    for st, count in zip(stages, layers):
        sub = make_plan(config, [devices[i] for i in st], z)
        if len(stages) > 1:
            sub_shards = [dataclasses.replace(sh, layer_start=first, layer_stop=first + count) for sh in sub.shards]
        else:
            sub_shards = list(sub.shards)
        groups.append(tuple(range(len(shards), len(shards) + len(st))))
        hubs.append(len(shards) + sub.hub)
        shards += sub_shards
        specs += [devices[i] for i in st]
        sizes += [layer_bytes(config, sh, z) for sh in sub_shards]
        first += count
    for spec, sh in zip(specs, shards):  # a stage's devices hold fewer layers: the same per-block check
        smallest = max(block_bytes(config, sh, z))
        if spec.budget_bytes is not None and spec.budget_bytes < smallest:
            raise PlanError(f"device {spec.name}'s memory budget of {human_bytes(spec.budget_bytes)} cannot hold "
                            f"one block of its share ({human_bytes(smallest)})")
    if len(stages) == 1:
        return Plan(tuple(shards), tuple(specs), hubs[0], z, tuple(sizes))
    return Plan(tuple(shards), tuple(specs), hubs[0], z, tuple(sizes), tuple(groups), tuple(hubs))


# a device process before any weight: Python, torch and the runtime (an idle `meshllm join` measured 229 MiB of RSS)
PROCESS_BYTES = 256 * 2**20


def local_memory_need(config: ModelConfig, n: int, dtype: "str | Sizes", budget: int | None = None) -> int:
    """Memory that `n` device processes on this machine plus the originator take at least: each process's
    runtime, each device's weights (its budget where that is less) and the originator's head. Raises PlanError
    when no plan over `n` devices exists (too many devices for the heads, a budget below one block)."""
    plan = make_plan(config, [DeviceSpec(f"local-{i}", 1.0, budget) for i in range(n)], dtype)
    held = sum(min(b, budget) if budget else b for b in plan.shard_bytes)
    return (n + 1) * PROCESS_BYTES + held + head_bytes(config, dtype)


def elect_hub(devices: Sequence[DeviceSpec]) -> int:
    """The strongest device: highest weight, ties to the smallest name (a total order, same on every device)."""
    return min(range(len(devices)), key=lambda i: (-devices[i].weight, devices[i].name, i))


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
