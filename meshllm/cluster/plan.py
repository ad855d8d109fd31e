"""Planning: (model config, device capabilities) -> who computes which slice. Pure and deterministic.

Attention splits by query heads (a device computes the kv heads its q heads read, so devices may outnumber kv
heads); the MLP splits by columns of gate/up (rows of down) in multiples of an alignment. Shares follow the
capability weights by largest remainder; ties go to the lower rank, so every device computes the same plan.
"""

from __future__ import annotations

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
    """One shard per device (rank order) and the hub's rank."""

    shards: tuple[Shard, ...]
    devices: tuple[DeviceSpec, ...]
    hub: int
    dtype: str
    shard_bytes: tuple[int, ...] = field(default=())

    @property
    def world(self) -> int:
        return len(self.shards)

    def share(self, rank: int, config: ModelConfig) -> float:
        """Fraction of the decoder weights rank holds (kv projections counted where replicated)."""
        total = layer_bytes(config, Shard.full(config), self.dtype)
        return layer_bytes(config, self.shards[rank], self.dtype) / total


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


def block_bytes(config: ModelConfig, shard: Shard, dtype: str) -> tuple[int, int]:
    """Bytes of one layer's attention block and MLP block of a shard as files (the scheduler's unit)."""
    b = DTYPE_SIZES.get(dtype, 4)
    d, hd = config.hidden_size, config.head_dim
    kv0, kv1 = shard.kv_range(config)
    q, kv = shard.num_q * hd, (kv1 - kv0) * hd
    attn = d * (2 * q + 2 * kv) + d
    mlp = 3 * d * shard.num_mlp + d
    owned = d if shard.owns_bias else 0  # the o_proj / down_proj bias lives on one shard only
    if config.attention_bias:
        attn += q + 2 * kv + owned
    if config.mlp_bias:
        mlp += 2 * shard.num_mlp + owned
    return attn * b + FILE_SLACK, mlp * b + FILE_SLACK


def layer_bytes(config: ModelConfig, shard: Shard, dtype: str) -> int:
    """Bytes of one shard's weights over all layers (norms and biases included)."""
    return config.num_layers * (sum(block_bytes(config, shard, dtype)) - 2 * FILE_SLACK)


def head_bytes(config: ModelConfig, dtype: str) -> int:
    """Bytes of the originator's embedding, final norm and LM head."""
    b = DTYPE_SIZES.get(dtype, 4)
    n = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return (n + config.hidden_size) * b


def mlp_alignment(config: ModelConfig, world: int) -> int:
    """Column granularity: 64 where the width allows, smaller for small models."""
    for unit in (64, 32, 16, 8):
        if config.intermediate_size >= unit * world * 2:
            return unit
    return 1


def make_plan(config: ModelConfig, devices: Sequence[DeviceSpec], dtype: str, hub: int | None = None) -> Plan:
    """Split every layer over `devices` in proportion to their weights; fails early with the reason."""
    n = len(devices)
    if n == 0:
        raise PlanError("no devices to plan over")
    if n > config.num_heads:
        raise PlanError(
            f"{n} devices but the model has only {config.num_heads} attention heads: every device needs at least "
            f"one; use at most {config.num_heads} devices"
        )
    if any(not (d.weight > 0 and math.isfinite(d.weight)) for d in devices):
        raise PlanError("every device's capability weight must be a positive finite number, got "
                        + ", ".join(f"{d.name}={d.weight}" for d in devices))
    weights = [d.weight for d in devices]
    heads = _split(config.num_heads, weights, 1, 1)
    cols = _split(config.intermediate_size, weights, mlp_alignment(config, n), 0)
    shards, q, c = [], 0, 0
    for rank in range(n):
        shards.append(Shard(q, q + heads[rank], c, c + cols[rank], owns_bias=rank == 0))
        q += heads[rank]
        c += cols[rank]
    sizes = tuple(layer_bytes(config, s, dtype) for s in shards)
    for dev, shard in zip(devices, shards):
        smallest = max(block_bytes(config, shard, dtype))
        if dev.budget_bytes is not None and dev.budget_bytes < smallest:
            raise PlanError(
                f"device {dev.name}'s memory budget of {human_bytes(dev.budget_bytes)} cannot hold even one block of "
                f"its share (the largest is {human_bytes(smallest)}); the smallest budget that works is "
                f"{human_bytes(smallest)} ({smallest} bytes; more devices or a smaller weight for it also help)"
            )
    if hub is None:
        hub = elect_hub(devices)
    return Plan(tuple(shards), tuple(devices), hub, dtype, sizes)


# a device process before any weight: Python, torch and the runtime (an idle `meshllm join` measured 229 MiB of RSS)
PROCESS_BYTES = 256 * 2**20


def local_memory_need(config: ModelConfig, n: int, dtype: str, budget: int | None = None) -> int:
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
