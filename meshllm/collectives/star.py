"""Star allreduce rounds, pure: which parts arrived, which round is open, what is an error.

Every worker sends its partial to the hub; the hub sums them in rank order (deterministic) and sends the sum to
all. A round is keyed (request, step, layer, phase) and rounds run in strict order, one at a time: a worker
cannot start round k+1 before it has the sum of round k. So a part for a closed round is late, a second part
from a rank is a duplicate, and a part for any round but the open one is out of order: all errors, never
silently summed. Missing parts are the runtime's timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Key = tuple[int, int, int, int]  # (request, step, layer, phase)


class RoundError(Exception):
    """A part that breaks the round protocol (duplicate, late, out of order, unknown rank)."""


@dataclass
class HubRounds:
    """The hub's view: parts of the open round by rank, and the last round closed."""

    world: int
    key: Key | None = None
    parts: dict[int, Any] = field(default_factory=dict)
    last_closed: Key | None = None

    def add(self, key: Key, rank: int, part: Any) -> list[Any] | None:
        """Record `rank`'s part of round `key`; return all parts in rank order when the round completes."""
        if not 0 <= rank < self.world:
            raise RoundError(f"part from rank {rank}, but the world has ranks 0..{self.world - 1}")
        if self.last_closed is not None and key <= self.last_closed:
            raise RoundError(f"late part from rank {rank} for round {key}: round {self.last_closed} is already "
                             f"closed")
        if self.key is None:
            self.key = key
        elif key != self.key:
            raise RoundError(f"part from rank {rank} for round {key} while round {self.key} is still open")
        if rank in self.parts:
            raise RoundError(f"duplicate part from rank {rank} for round {key}")
        self.parts[rank] = part
        if len(self.parts) < self.world:
            return None
        ordered = [self.parts[r] for r in range(self.world)]
        self.last_closed, self.key, self.parts = key, None, {}
        return ordered

    def missing(self) -> list[int]:
        """Ranks whose part of the open round has not arrived."""
        return [r for r in range(self.world) if r not in self.parts] if self.key is not None else []

    def reset(self) -> None:
        """Forget the open round and the order (a new request starts)."""
        self.key, self.parts, self.last_closed = None, {}, None
