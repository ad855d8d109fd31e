"""StarAllreduce: the asyncio driver of the star rounds, over authenticated links.

Workers send `part` frames to the hub and await the `sum`; the hub sums in fp32 in rank order (HubRounds says
when a round is complete, and what is a protocol error) and sends the sum to every worker. A world of one is the
identity. Strays of an aborted request are dropped; anything else out of order closes the offending link.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import MeshTimeoutError, ProtocolError
from ..net.link import broadcast
from ..runtime.tensors import from_record, to_record
from .star import HubRounds, Key, RoundError


@dataclass
class ReduceStats:
    """Counters of one StarAllreduce (seconds are sums over rounds)."""

    rounds: int = 0
    wait_s: float = 0.0  # from our part leaving to the sum arriving
    framing_s: float = 0.0  # encoding and decoding tensors and frames
    reduce_s: float = 0.0  # the hub's fp32 sums


class StarAllreduce:
    """One member's side of the star allreduce of one session."""

    def __init__(self, rank: int, world: int, hub_rank: int, timeout: float) -> None:
        self.rank, self.world, self.hub_rank = rank, world, hub_rank
        self.timeout = timeout
        self.hub_link = None  # on a worker
        self.worker_links: dict[int, Any] = {}  # on the hub: rank -> link
        self.rounds = HubRounds(world) if rank == hub_rank else None
        self.finished_req = -1
        self.begun_req = -1  # hub: the newest request the originator has begun here; parts of later ones wait
        self._held: dict[int, tuple[Key, torch.Tensor]] = {}  # hub: rank -> its part of a request not yet begun
        self.stats = ReduceStats()
        self._key: Key | None = None
        self._future: asyncio.Future | None = None
        self._like: tuple[torch.Size, torch.dtype] | None = None  # worker: the sum must have our part's shape

    @property
    def is_hub(self) -> bool:
        return self.rank == self.hub_rank

    async def __call__(self, key: Key, part: torch.Tensor) -> torch.Tensor:
        """Sum `part` over the world for round `key` (all members call with the same key, in the same order)."""
        if self.world == 1:
            return part
        fut = asyncio.get_running_loop().create_future()
        self._key, self._future, self._like = key, fut, (part.shape, part.dtype)
        t = time.perf_counter()
        if self.is_hub:
            self._add(key, self.rank, part)
        else:
            req, step, layer, phase = key
            self.hub_link.send({"t": "part", "req": req, "step": step, "layer": layer, "phase": phase,
                                "rank": self.rank, "x": to_record(part)})
        t1 = time.perf_counter()
        self.stats.framing_s += t1 - t
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancellation that lands as the sum
            # arrives, and an aborted request would then run on into rounds nobody else joins
            async with asyncio.timeout(self.timeout):
                total = await fut
        except TimeoutError as e:
            who = self.rounds.missing() if self.rounds else ["the hub"]
            held = "".join(f"; rank {r} sent a part for request {k[0]}, which the originator has not begun here"
                           for r, (k, _) in sorted(self._held.items()) if r in who)
            raise MeshTimeoutError(f"allreduce round {key} timed out after {self.timeout} s waiting for rank(s) "
                                   f"{who}{held}") from e
        finally:
            self._key = self._future = None
        self.stats.wait_s += time.perf_counter() - t1
        self.stats.rounds += 1
        return total

    def attach(self, rank: Any, link) -> bool:
        """Hub: take `link` as the link of worker `rank`; False (nothing taken) for a rank out of range, the hub's
        own, or one already attached."""
        if not self.is_hub or not isinstance(rank, int) or not 0 <= rank < self.world or rank == self.rank \
                or rank in self.worker_links:
            return False
        self.worker_links[rank] = link
        return True

    def on_part(self, link, msg: dict[str, Any]) -> None:
        """Hub: a worker's part arrived (raises ProtocolError for a part that breaks the rounds)."""
        key = _key(msg)
        if key[0] <= self.finished_req:
            return  # a straggler of an aborted request
        rank = msg["rank"]
        if self.worker_links.get(rank) is not link:
            raise ProtocolError(f"part claims rank {rank!r} on the link of another rank")
        t = time.perf_counter()
        part = from_record(msg["x"], "partial sum")
        self.stats.framing_s += time.perf_counter() - t
        if key[0] > self.begun_req:
            # a request the originator has not begun here yet: its begin is on the way (the worker heard first),
            # or the part is forged. Either way it waits for the begin; it never ends the open round on its word
            if rank in self._held:
                raise ProtocolError(f"rank {rank} sent a second part for a request the originator has not begun "
                                    f"here (request {key[0]}; begun: {self.begun_req})")
            self._held[rank] = (key, part)
            return
        try:
            self._add(key, rank, part)
        except RoundError as e:
            raise ProtocolError(str(e)) from e

    def begin(self, req: int) -> None:
        """Hub: the originator began request `req` here: parts of it that arrived early join their round now."""
        self.begun_req = max(self.begun_req, req)
        held = sorted(self._held.items())
        self._held = {r: (k, p) for r, (k, p) in held if k[0] > self.begun_req}
        for rank, (key, part) in held:
            if key[0] == req and key[0] > self.finished_req:
                try:
                    self._add(key, rank, part)
                except RoundError as e:
                    self.worker_links[rank].refuse(ProtocolError(str(e)))

    def on_sum(self, msg: dict[str, Any]) -> None:
        """Worker: the hub's sum arrived."""
        key = _key(msg)
        if key[0] <= self.finished_req:
            return
        if key != self._key or self._future is None or self._future.done():
            raise ProtocolError(f"sum for round {key} while waiting for {self._key}")
        t = time.perf_counter()
        total = from_record(msg["x"], "allreduce sum")
        self.stats.framing_s += time.perf_counter() - t
        if self._like is not None and (total.shape, total.dtype) != self._like:
            raise ProtocolError(f"sum for round {key} has shape {list(total.shape)} ({_dtype(total.dtype)}); our "
                                f"part has {list(self._like[0])} ({_dtype(self._like[1])})")
        self._future.set_result(total)

    def _add(self, key: Key, rank: int, part: torch.Tensor) -> None:
        ordered = self.rounds.add(key, rank, part)
        if ordered is None:
            return
        ours = ordered[self.rank]
        for r, p in enumerate(ordered):
            if p.shape != ours.shape or p.dtype != ours.dtype:
                # never broadcast-summed: the worker that sent it is cut off, the round fails naming it
                err = ProtocolError(f"part from rank {r} for round {key} has shape {list(p.shape)} "
                                    f"({_dtype(p.dtype)}); the hub's part has {list(ours.shape)} ({_dtype(ours.dtype)})")
                self.worker_links[r].refuse(err)
                if self._key == key and self._future is not None and not self._future.done():
                    self._future.set_exception(err)
                return
        t = time.perf_counter()
        total = ordered[0].float()
        for p in ordered[1:]:
            total = total + p.float()  # fp32, rank order: the same bits wherever it runs
        total = total.to(ordered[0].dtype)
        t1 = time.perf_counter()
        req, step, layer, phase = key
        # one encoding of the sum for every worker
        broadcast(self.worker_links.values(), {"t": "sum", "req": req, "step": step, "layer": layer,
                                               "phase": phase, "x": to_record(total)})
        self.stats.reduce_s += t1 - t
        self.stats.framing_s += time.perf_counter() - t1
        if self._key != key or self._future is None or self._future.done():
            raise RoundError(f"round {key} completed while this hub waits for {self._key}")
        self._future.set_result(total)

    def abort(self, req: int) -> None:
        """Forget request `req` (and earlier): drop its open round; its strays are dropped from now on."""
        self.finished_req = max(self.finished_req, req)
        if self.rounds is not None and self.rounds.key is not None and self.rounds.key[0] <= req:
            self.rounds.reset()
        self._held = {r: (k, p) for r, (k, p) in self._held.items() if k[0] > self.finished_req}


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _key(msg: dict[str, Any]) -> Key:
    key = (msg["req"], msg["step"], msg["layer"], msg["phase"])
    if not all(type(k) is int for k in key):
        raise ProtocolError(f"round key {key!r} must be integers")
    return key
