"""MeshEngine: the originator of a tensor-parallel mesh of device daemons.

Per token: embed here -> `step` to every device -> each computes its shard of every layer, with a star
allreduce on the hub after each attention and MLP -> the hub returns the last hidden state -> LM head and
sampling here. Only hidden states leave this process; prompt text and token ids never do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..cluster.plan import DeviceSpec, Plan, make_plan
from ..errors import DeviceLostError, MeshError, MeshTimeoutError, ProtocolError, RemoteError
from ..model.source import ModelSource
from ..net.link import Link, Timeouts, connect, parse_address
from ..wire.frames import DEFAULT_MAX_FRAME
from .originator import Originator, peak_rss_bytes
from .tensors import from_record, to_record

log = logging.getLogger("meshllm.mesh")


@dataclass
class Member:
    """A device of the mesh as the originator sees it."""

    address: str
    link: Link
    rank: int = -1
    weight_bytes: int = 0

    @property
    def name(self) -> str:
        return f"{self.link.conn.peer_id} ({self.address})"


class MeshEngine(Originator):
    """`async with MeshEngine(model, ["host:port", ...], secret) as m: await m.generate(...)`."""

    def __init__(self, model, devices: Sequence[str], secret: bytes, *, dtype: str | None = None,
                 weights: Sequence[float] | None = None, threads: int | None = None,
                 timeouts: Timeouts = Timeouts(), max_frame: int = DEFAULT_MAX_FRAME,
                 node_id: str | None = None) -> None:
        super().__init__(model, dtype=dtype, threads=threads)
        if not devices:
            raise MeshError("no devices given: pass --devices HOST:PORT,... or --local-devices N")
        self.addresses = list(devices)
        self.secret = secret
        self.weights = list(weights) if weights else None
        if self.weights is not None and len(self.weights) != len(self.addresses):
            raise MeshError(f"{len(self.weights)} split weights for {len(self.addresses)} devices")
        self.timeouts = timeouts
        self.max_frame = max_frame
        self.node_id = node_id or f"orig-{uuid.uuid4().hex[:8]}"
        self.session = uuid.uuid4().hex[:12]
        self.members: list[Member] = []
        self.plan: Plan | None = None
        self.req = 0
        self.step = 0
        self._pending: dict[tuple[str, Any], asyncio.Future] = {}
        self._failure: BaseException | None = None
        self.forward_s: list[float] = []

    # -- bring-up ----------------------------------------------------------------------------------------------

    def _load_more(self, src: ModelSource) -> None:
        self._model_ref = str(Path(src.path).resolve())

    async def _start(self) -> None:
        links = await asyncio.gather(*(self._connect(a) for a in self.addresses), return_exceptions=True)
        errors = [e for e in links if isinstance(e, BaseException)]
        self.members = [Member(a, link) for a, link in zip(self.addresses, links) if isinstance(link, Link)]
        if errors:
            raise errors[0]
        specs = [DeviceSpec(m.link.conn.peer_id or m.address,
                            self.weights[i] if self.weights else float(m.link.conn.peer_info.get("capability", 1.0)))
                 for i, m in enumerate(self.members)]
        dtype_name = str(self.dtype).replace("torch.", "")
        self.plan = make_plan(self.config, specs, dtype_name)
        hub = self.members[self.plan.hub]
        log.info("mesh of %d: hub %s; shards %s", len(self.members), hub.name,
                 ", ".join(f"{m.link.conn.peer_id}: heads {s.q_start}-{s.q_stop} mlp {s.mlp_start}-{s.mlp_stop}"
                           for m, s in zip(self.members, self.plan.shards)))
        loads = []
        for rank, (m, shard) in enumerate(zip(self.members, self.plan.shards)):
            m.rank = rank
            loads.append(self._request(m, "loaded", {
                "t": "load", "session": self.session, "model": self._model_ref, "dtype": dtype_name,
                "shard": [shard.q_start, shard.q_stop, shard.mlp_start, shard.mlp_stop, shard.owns_bias],
                "rank": rank, "world": len(self.members), "hub": self.plan.hub,
            }, self.timeouts.load, "loading its shard"))
        for m, reply in zip(self.members, await asyncio.gather(*loads)):
            m.weight_bytes = int(reply.get("weight_bytes", 0))
        hub_address = hub.address
        await asyncio.gather(*(self._request(m, "connected", {"t": "connect_hub", "session": self.session,
                                                               "hub": hub_address},
                                             self.timeouts.connect + self.timeouts.handshake, "joining the hub")
                               for m in self.members if m.rank != self.plan.hub))

    async def _connect(self, address: str) -> Link:
        try:
            host, port = parse_address(address)
        except ValueError as e:
            raise MeshError(str(e)) from e
        return await connect(host, port, self.secret, self.node_id, timeouts=self.timeouts,
                             on_message=self._on_message, on_close=self._on_close, max_frame=self.max_frame)

    async def _stop(self) -> None:
        members, self.members = self.members, []
        for m in members:
            m.link.close()

    # -- messages ----------------------------------------------------------------------------------------------

    def _member(self, link: Link) -> Member:
        return next(m for m in self.members if m.link is link)

    def _on_message(self, link: Link, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if msg.get("session") != self.session:
            raise ProtocolError(f"{kind!r} for session {msg.get('session')!r}, expected {self.session}")
        if kind == "result":
            key = ("result", (msg["req"], msg["step"]))
        elif kind == "abort":
            self._fail(RemoteError(f"device {link.peer} stopped request {msg['req']}: {msg['reason']}"))
            return
        elif kind in ("loaded", "connected", "stats_reply"):
            key = (kind, link)
        else:
            raise ProtocolError(f"an originator does not accept {kind!r} messages")
        fut = self._pending.get(key)
        if fut is None or fut.done():
            raise ProtocolError(f"unexpected {kind!r} from {link.peer}")
        fut.set_result(msg)

    def _on_close(self, link: Link, error: BaseException | None) -> None:
        if not self.members:
            return
        member = next((m for m in self.members if m.link is link), None)
        name = member.name if member else link.peer
        self._fail(DeviceLostError(f"lost device {name}: {error}"))

    def _fail(self, error: BaseException) -> None:
        """Fail every wait in progress: the mesh cannot finish this request."""
        if self._failure is None:
            self._failure = error
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)

    async def _request(self, member: Member, reply: str, msg: dict[str, Any], timeout: float, what: str) -> dict:
        key = (reply, member.link)
        fut = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            member.link.send(msg)
            try:
                answer = await asyncio.wait_for(fut, timeout)
            except TimeoutError as e:
                raise MeshTimeoutError(f"device {member.name} did not finish {what} within {timeout} s") from e
        finally:
            self._pending.pop(key, None)
        if answer.get("error"):
            raise RemoteError(f"device {member.name} failed {what}: {answer['error']}")
        return answer

    def _broadcast(self, msg: dict[str, Any]) -> None:
        if self._failure is not None:
            raise self._failure
        for m in self.members:
            m.link.send(msg)

    # -- Backend -------------------------------------------------------------------------------------------

    async def begin(self, capacity: int) -> None:
        self.req += 1
        self.step = 0
        self._broadcast({"t": "begin", "session": self.session, "req": self.req, "capacity": capacity})

    async def end(self) -> None:
        if self._failure is None:
            for m in self.members:
                if m.link.is_open:
                    m.link.send({"t": "end", "session": self.session, "req": self.req})

    def abort(self, reason: str) -> None:
        for m in self.members:
            if m.link.is_open:
                m.link.send({"t": "abort", "session": self.session, "req": self.req, "reason": reason})

    async def _forward_hidden(self, x: torch.Tensor, start: int) -> torch.Tensor:
        # a prefill larger than half a frame goes as several steps (the KV caches make that exact)
        per_token = x.shape[-1] * x.element_size()
        chunk = max(1, (self.max_frame // 2) // per_token)
        out = None
        for i in range(0, x.shape[1], chunk):
            out = await self._one_step(x[:, i:i + chunk], start + i)
        return out

    async def _one_step(self, x: torch.Tensor, start: int) -> torch.Tensor:
        self.step += 1
        key = ("result", (self.req, self.step))
        fut = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        t0 = time.perf_counter()
        try:
            self._broadcast({"t": "step", "session": self.session, "req": self.req, "step": self.step,
                             "start": start, "x": to_record(x)})
            try:
                msg = await asyncio.wait_for(fut, self.timeouts.step)
            except TimeoutError as e:
                raise MeshTimeoutError(f"step {self.step} got no result from the hub within "
                                       f"{self.timeouts.step} s") from e
        finally:
            self._pending.pop(key, None)
        self.forward_s.append(time.perf_counter() - t0)
        return from_record(msg["x"], "result")

    # -- reports -----------------------------------------------------------------------------------------------

    def weight_bytes(self) -> int:
        return self.head.nbytes()

    async def device_stats(self) -> list[dict[str, Any]]:
        """Each device's counters for this session (compute, allreduce wait, framing, peak RSS)."""
        replies = await asyncio.gather(*(self._request(m, "stats_reply", {"t": "stats", "session": self.session},
                                                       self.timeouts.connect, "reporting stats")
                                         for m in self.members))
        return [r["stats"] for r in replies]

    async def devices(self) -> list[dict]:
        stats = await self.device_stats()
        out = [{"id": self.node_id, "role": "originator", "peak_rss_bytes": peak_rss_bytes(),
                "weight_bytes": self.head.nbytes(), "share": 0.0,
                "holds": "tokenizer, embedding, final norm, LM head"}]
        for m, s in zip(self.members, stats):
            shard = self.plan.shards[m.rank]
            out.append({
                "id": s["node"], "address": m.address, "role": s["role"], "rank": m.rank,
                "peak_rss_bytes": s["peak_rss_bytes"], "weight_bytes": s["weight_bytes"],
                "share": round(self.plan.share(m.rank, self.config), 4),
                "q_heads": [shard.q_start, shard.q_stop], "mlp_columns": [shard.mlp_start, shard.mlp_stop],
            })
        return out


def local_secret() -> bytes:
    """A throwaway secret for a mesh that lives only inside this run."""
    return os.urandom(24).hex().encode()
