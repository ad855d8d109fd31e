"""Shard: which part of every decoder layer one device computes."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class Shard:
    """Query heads [q_start, q_stop) and MLP columns [mlp_start, mlp_stop) of the layers [layer_start, layer_stop)
    (every layer when layer_stop is None: tensor parallelism; a pipeline stage holds a range of whole layers).

    A device computes the kv heads its query heads read, so kv projections are replicated, not split, when
    devices outnumber kv heads. Exactly one shard of a plan `owns_bias`: it adds the o_proj / down_proj bias,
    which must enter the allreduced sum once.
    """

    q_start: int
    q_stop: int
    mlp_start: int
    mlp_stop: int
    owns_bias: bool = True
    layer_start: int = 0
    layer_stop: int | None = None

    @classmethod
    def full(cls, config: ModelConfig) -> "Shard":
        """The whole layer: the single-device case."""
        return cls(0, config.num_heads, 0, config.intermediate_size, True)

    def layers(self, config: ModelConfig) -> range:
        """The decoder layers this shard computes (its block i is layer layers[i // 2]'s attention or MLP)."""
        return range(self.layer_start, config.num_layers if self.layer_stop is None else self.layer_stop)

    @property
    def partial_layers(self) -> bool:
        return self.layer_start != 0 or self.layer_stop is not None

    @property
    def num_q(self) -> int:
        return self.q_stop - self.q_start

    @property
    def num_mlp(self) -> int:
        return self.mlp_stop - self.mlp_start

    def kv_range(self, config: ModelConfig) -> tuple[int, int]:
        """The kv heads this shard's query heads attend with."""
        if self.num_q == 0:
            return 0, 0
        g = config.kv_group
        return self.q_start // g, (self.q_stop - 1) // g + 1

    def check(self, config: ModelConfig) -> None:
        """Raise ValueError when the shard does not fit the model."""
        if not 0 <= self.q_start <= self.q_stop <= config.num_heads:
            raise ValueError(f"query heads [{self.q_start}, {self.q_stop}) outside 0..{config.num_heads}")
        if not 0 <= self.mlp_start <= self.mlp_stop <= config.intermediate_size:
            raise ValueError(
                f"MLP columns [{self.mlp_start}, {self.mlp_stop}) outside 0..{config.intermediate_size}"
            )
        stop = config.num_layers if self.layer_stop is None else self.layer_stop
        if not 0 <= self.layer_start < stop <= config.num_layers:
            raise ValueError(f"layers [{self.layer_start}, {stop}) outside 0..{config.num_layers} or empty")
