"""MeshEngine: the originator of a tensor-parallel mesh of device daemons.

Per token: embed here -> `step` to every device -> each computes its shard of every layer, with a star
allreduce on the hub after each attention and MLP -> the hub returns the last hidden state -> LM head and
sampling here. Only hidden states leave this process; prompt text and token ids never do.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import statistics
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..cluster.cost import KINDS, PHASE_S, READ_RATE, Candidate, DeviceCost, Network, choose
from ..cluster.plan import DeviceSpec, Plan, human_bytes, make_plan, staged_plan
from ..errors import DeviceLostError, MeshError, MeshTimeoutError, PlanError, ProtocolError, RemoteError
from ..model.default import cache_dir
from ..model.fingerprint import model_hash
from ..model.source import ModelSource
from ..net.link import Link, Timeouts, broadcast, connect, parse_address
from ..wire.frames import DEFAULT_MAX_FRAME
from .originator import Originator, peak_rss_bytes
from .tensors import from_record, to_record

log = logging.getLogger("meshllm.mesh")

PINGS = 3  # round trips timed per pair when planning (the median counts)
# the decode loop's own time per token besides the head (two compute-job hops, the stop checks, detokenizing):
# a one-device SmolLM2 mesh's token minus its step round trip minus the head, 2.5-3 ms here
LOOP_S = 2.5e-3
UNREACHABLE_S = 10.0  # the round trip counted for a pair of devices that cannot reach each other
CONTROL_QUEUE = 16  # control replies a device may have outstanding; more is a protocol violation
CHUNK = 2**20  # bytes of a block file per `slice` frame (a device holds about two at a time while it writes)
FORWARD_HISTORY = 1024  # step round trips kept for reports (an app lives for millions of steps)


@dataclass
class Member:
    """A device of the mesh as the originator sees it."""

    address: str
    link: Link
    rank: int = -1
    weight_bytes: int = 0
    inbox: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=CONTROL_QUEUE))

    @property
    def name(self) -> str:
        return f"{self.link.conn.peer_id} ({self.address})"


class MeshEngine(Originator):
    """`async with MeshEngine(model, ["host:port", ...], secret) as m: await m.generate(...)`."""

    def __init__(self, model, devices: Sequence[str], secret: bytes, *, dtype: str | None = None,
                 weights: Sequence[float] | None = None, threads: int | None = None,
                 timeouts: Timeouts = Timeouts(), max_frame: int = DEFAULT_MAX_FRAME,
                 node_id: str | None = None, memory_budget: int | None = None,
                 skip_unreachable: bool = False, defer: bool = False, quantize: str | None = None,
                 plan: str | None = None,
                 layout: "tuple[Sequence[Sequence[int]], Sequence[int] | None] | Candidate | None" = None,
                 plan_only: bool = False) -> None:
        super().__init__(model, dtype=dtype, threads=threads, quantize=quantize)
        if plan is not None and plan not in ("auto", *KINDS):
            raise MeshError(f"unknown plan {plan!r}: use auto, {', '.join(KINDS)}")
        # auto: the planner's choice; a kind: the fastest plan of that kind; None: tensor parallelism over every
        # device given, unmeasured (as named, with --weights)
        self.plan_kind = plan
        self.layout = layout  # (stages of device indices, layers per stage or None): exactly this plan
        self.plan_only = plan_only  # measure and plan, load nothing (`status --plan`)
        if not devices and not defer:
            raise MeshError("no devices given: pass --devices HOST:PORT,... or --local-devices N")
        self.addresses = list(devices)
        self.secret = secret
        self.weights = list(weights) if weights else None
        if self.weights is not None and len(self.weights) != len(self.addresses):
            raise MeshError(f"{len(self.weights)} split weights for {len(self.addresses)} devices")
        self.timeouts = timeouts
        self.max_frame = max_frame
        self.budget = memory_budget  # this originator's own: its embedding and LM head must fit
        self.skip_unreachable = skip_unreachable  # plan over the devices that answer (discovered ones may be gone)
        self.unreachable: dict[str, BaseException] = {}  # address -> why, from the last bring-up
        self._stream_src = None
        self._active = False  # a request is between begin and end
        self.node_id = node_id or f"orig-{uuid.uuid4().hex[:8]}"
        self.session = uuid.uuid4().hex[:12]
        self.members: list[Member] = []
        self.plan: Plan | None = None
        self.chosen: Candidate | None = None  # the planner's pick, with its prediction
        self.candidates: list[Candidate] = []  # everything it considered, fastest first
        self.network: Network | None = None  # the round trips it planned with
        self.origin_s: float | None = None  # this process's own time per token (embedding, LM head, sampling)
        self.idle: dict[str, str] = {}  # address -> node id of the devices that answered but the plan leaves out
        self.req = 0
        self.step = 0
        self._pending: dict[tuple[str, Any], asyncio.Future] = {}
        self._result_from: dict[tuple[str, Any], Link] = {}  # the stage hub each pending step's result must come from
        self._failure: BaseException | None = None
        self.forward_s: deque[float] = deque(maxlen=FORWARD_HISTORY)  # the last steps' round trips, seconds

    # -- bring-up ----------------------------------------------------------------------------------------------

    def _load_more(self, src: ModelSource) -> None:
        self._model_ref = Path(src.path).resolve()
        self.model_hash = model_hash(self._model_ref, src.config, cache_dir())

    async def _start(self) -> None:
        if not self.addresses:
            return  # deferred (no devices yet): only the head is loaded; `replan` brings devices in
        links = await asyncio.gather(*(self._connect(a) for a in self.addresses), return_exceptions=True)
        errors = [e for e in links if isinstance(e, BaseException)]
        self.members = [Member(a, link) for a, link in zip(self.addresses, links) if isinstance(link, Link)]
        self.unreachable = {a: e for a, e in zip(self.addresses, links) if isinstance(e, BaseException)}
        if errors and (not self.skip_unreachable or any(not isinstance(e, Exception) for e in errors)):
            raise errors[0]
        for a, e in self.unreachable.items():
            log.warning("device %s is unreachable, planning without it: %s", a, e)
        if not self.members:
            return  # skip_unreachable and nobody answered: no plan (the caller decides what to do)
        if self.budget is not None and self.head.nbytes() > self.budget:
            raise PlanError(f"the originator's embedding and LM head take {human_bytes(self.head.nbytes())}, over "
                            f"its budget of {human_bytes(self.budget)}; the smallest budget that works here is "
                            f"{human_bytes(self.head.nbytes())}")
        await self._choose_plan()
        if self.plan_only:
            return
        dtype_name = str(self.dtype).replace("torch.", "")
        log.info("mesh of %d: %s; shards %s", len(self.members), self.plan.describe(),
                 ", ".join(f"{m.link.conn.peer_id}: heads {s.q_start}-{s.q_stop} mlp {s.mlp_start}-{s.mlp_stop}"
                           + (f" layers {s.layer_start}-{s.layer_stop}" if s.partial_layers else "")
                           for m, s in zip(self.members, self.plan.shards)))
        for rank, m in enumerate(self.members):
            m.rank = rank
        try:
            await gather_or_cancel(*(self._load_member(m, dtype_name) for m in self.members))
        finally:
            if self._stream_src is not None:
                self._stream_src.close()
                self._stream_src = None
        self._active = False  # a request is between begin and end
        joins = []
        for ranks, hub in self.plan.groups:  # each stage's workers join its hub
            joins += [self._request(self.members[r], "connected", {"t": "connect_hub", "session": self.session,
                                                                   "hub": self.members[hub].address},
                                    self.timeouts.connect + self.timeouts.handshake, "joining the hub")
                      for r in ranks if r != hub]
        await gather_or_cancel(*joins)

    def _specs(self) -> list[DeviceSpec]:
        specs = []
        for i, m in enumerate(self.members):
            info = m.link.conn.peer_info
            budget = info.get("budget")
            specs.append(DeviceSpec(m.link.conn.peer_id or m.address,
                                    self.weights[i] if self.weights else float(info.get("capability", 1.0)),
                                    int(budget) if isinstance(budget, int) else None))
        return specs

    async def _choose_plan(self) -> None:
        """The plan: tensor parallelism over every device with given split weights; else the planner's pick among
        the plans of `plan_kind` (every kind for auto), from the devices' advertised numbers and round trips
        measured now. The members become the plan's devices in rank order; the others are let go."""
        specs = self._specs()
        self.chosen, self.candidates, self.network = None, [], None
        if isinstance(self.layout, Candidate):  # a plan the planner made over these devices, as it is
            self.plan, self.chosen = self.layout.plan, self.layout
            self._keep_members([i for stage in self.layout.stages for i in stage])
            return
        if self.layout is not None:
            stages, layers = self.layout
            self.plan = staged_plan(self.config, specs, self.sizes, stages, layers)
            self._keep_members([i for stage in stages for i in stage])
            return
        if self.weights is not None or self.plan_kind is None:
            self.plan = make_plan(self.config, specs, self.sizes)
            return
        self.network = await self._measure_network()
        if self.origin_s is None:
            self.origin_s = await asyncio.get_running_loop().run_in_executor(self._compute, self._time_origin)
        costs = [device_cost(s, m.link.conn.peer_info, self.sizes) for s, m in zip(specs, self.members)]
        self.chosen, self.candidates = choose(self.config, self.sizes, costs, self.network, kind=self.plan_kind,
                                              origin_s=self.origin_s)
        self.plan = self.chosen.plan
        self._keep_members([i for stage in self.chosen.stages for i in stage])
        p = self.chosen.prediction
        log.info("plan %s: predicted %.1f ms/token (compute %.1f, allreduce rounds %.1f, hops %.1f, disk %.1f); "
                 "%d candidates, next best %s", self.plan.describe(), p.token_s * 1e3, p.compute_s * 1e3,
                 p.rounds_s * 1e3, p.hops_s * 1e3, p.disk_s * 1e3, len(self.candidates),
                 next((f"{c.label} at {c.prediction.token_s * 1e3:.1f}" for c in self.candidates[1:] if c.plan),
                      "none"))

    def _time_origin(self) -> float:
        """This originator's own time per token: embedding a token, the LM head and greedy sampling (median of a
        few, on the compute thread), and the decode loop around them."""
        runs = []
        for i in range(5):
            t0 = time.perf_counter()
            x = self._embed([i])
            int(self._logits(x).argmax())
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs[1:]) + LOOP_S

    def _keep_members(self, used: list[int]) -> None:
        """The plan's devices become the members, in its rank order; the others are let go."""
        members, self.members = self.members, [self.members[i] for i in used]
        self.idle = {m.address: m.link.conn.peer_id for i, m in enumerate(members) if i not in used}
        for i, m in enumerate(members):
            if i not in used:
                m.link.close()  # not a member any more: its close is no loss

    async def _measure_network(self) -> Network:
        """Round trips: originator to each device (pings over its link) and between devices (each device pings
        the others over links of its own), medians of a few, in seconds. A pair that does not answer counts as
        very far (the planner then never puts the two in one group)."""
        n = len(self.members)

        async def origin(m: Member) -> float:
            runs = []
            for nonce in range(PINGS):
                t0 = time.perf_counter()
                await self._request(m, "pong", {"t": "ping", "nonce": nonce}, self.timeouts.connect, "answering a ping")
                runs.append(time.perf_counter() - t0)
            return statistics.median(runs)

        async def pairs(i: int) -> list[float]:
            if n == 1 or self.plan_kind in ("single", "pipeline"):
                return [0.0] * n  # no group of two: pairs never enter the prediction
            peers = [m.address for j, m in enumerate(self.members) if j != i]
            reply = await self._request(self.members[i], "probe_reply", {"t": "probe", "nonce": i, "peers": peers},
                                        self.timeouts.connect * (len(peers) + 1) + self.timeouts.handshake,
                                        "timing its links to the other devices")
            times = reply["rtt_s"]
            if not isinstance(times, list) or len(times) != len(peers):
                raise ProtocolError(f"device {self.members[i].name} answered a probe of {len(peers)} devices with "
                                    f"{str(times)[:80]}")
            rest = iter(float(t) if isinstance(t, (int, float)) and t >= 0 else UNREACHABLE_S for t in times)
            return [0.0 if j == i else next(rest) for j in range(n)]

        # one device at a time: timings taken side by side would include each other's queueing
        to_origin = [await origin(m) for m in self.members]
        rows = [await pairs(i) for i in range(n)]
        return Network(tuple(to_origin), tuple(tuple(row) for row in rows))

    async def _load_member(self, m: Member, dtype_name: str) -> None:
        """Send the load; stream any blocks the device lacks; wait until it holds its shard."""
        shard = self.plan.shards[m.rank]
        ranks, hub = next(g for g in self.plan.groups if m.rank in g[0])  # its stage: ranks count from 0 there
        fields = [shard.q_start, shard.q_stop, shard.mlp_start, shard.mlp_stop, shard.owns_bias]
        if shard.partial_layers:
            fields += [shard.layer_start, len(shard.layers(self.config)) + shard.layer_start]
        m.link.send({
            "t": "load", "session": self.session, "model_hash": self.model_hash, "config": self.config.to_dict(),
            "dtype": dtype_name, "format": str(self.format), "rank": ranks.index(m.rank), "world": len(ranks),
            "hub": ranks.index(hub), "shard": fields,
        })
        while True:
            reply = await self._reply(m, ("need", "loaded"), self.timeouts.load, "loading its shard")
            if reply["t"] == "loaded":
                m.weight_bytes = int(reply.get("weight_bytes", 0))
                return
            await self._stream_blocks(m, shard, [int(b) for b in reply["blocks"]])

    async def _stream_blocks(self, m: Member, shard, blocks: list[int]) -> None:
        """Send a device the block files of its shard it lacks, one acknowledged chunk at a time."""
        from ..model.loader import attn_tensors, mlp_tensors
        from ..model.source import open_model
        from ..scheduler.slices import serialize_block

        loop = asyncio.get_running_loop()

        def build(index: int) -> tuple[bytes, str]:
            """A block file's bytes and their SHA-256, made in the I/O thread (hashing MBs would stall the loop)."""
            if self._stream_src is None:  # opened once (GGUF parsing is slow), closed when the mesh is up
                self._stream_src = open_model(self._model_ref)
            src, layer = self._stream_src, shard.layer_start + index // 2
            # the portable form (int4 as plain nibbles): the device turns it into its own kernels' layout
            cut = attn_tensors if index % 2 == 0 else mlp_tensors
            data = serialize_block(cut(src, layer, shard, self.dtype, self.format))
            src.forget()
            return data, hashlib.sha256(data).hexdigest()

        sent, t0, shown = 0, time.perf_counter(), -1
        chunk = min(CHUNK, self.max_frame // 2)  # a chunk and its frame's fields fit this link's frame limit
        for n, index in enumerate(blocks):
            data, digest = await loop.run_in_executor(self._io, build, index)
            for off in range(0, max(len(data), 1), chunk):
                msg = {"t": "slice", "session": self.session, "block": index, "offset": off,
                       "data": data[off:off + chunk]}
                if off + chunk >= len(data):
                    msg["sha256"] = digest
                m.link.send(msg)
                await self._reply(m, ("stored",), self.timeouts.load, "storing a slice")
            sent += len(data)
            pct = 100 * (n + 1) // len(blocks)
            if pct // 10 != shown:
                shown = pct // 10
                log.info("streaming slices to %s: %d%% (%d/%d blocks, %s, %.1f s)", m.name, pct, n + 1,
                         len(blocks), human_bytes(sent), time.perf_counter() - t0)

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

    async def replan(self, devices: Sequence[str]) -> None:
        """Between requests: leave the current devices and bring up a new plan over `devices` (a new session;
        each device keeps its slice cache, so a shard it held before is not sent again)."""
        async with self._lock:  # never while a request runs
            await self._replan(devices)

    async def recover(self, error: BaseException) -> bool:
        """A device was lost mid-request (`error`): a new plan over the devices still here, so the request goes on
        (the decode loop feeds the prompt and the tokens so far to it). False when none is left."""
        open_members = [m.address for m in self.members if m.link.is_open]
        alive = open_members + [a for a in self.idle if a not in open_members]  # idle devices answered too
        if not alive or isinstance(error, MeshTimeoutError) and len(open_members) == len(self.members):
            return False  # no device left; or a step timed out with every device still answering (and beating):
            # a new plan over the same devices would wait the same way
        log.warning("%s: re-planning over %d device(s) and resuming the request", error, len(alive))
        skip, self.skip_unreachable = self.skip_unreachable, True  # one that stopped answering is left out
        try:
            await self._replan(alive)
        finally:
            self.skip_unreachable = skip
        return bool(self.members)

    async def _replan(self, devices: Sequence[str]) -> None:
        """A new plan over `devices`; a forced kind they can no longer make (a device left) gives way to the
        planner's choice, said once."""
        kind = self.plan_kind
        try:
            await self._replan_as(devices)
        except PlanError as e:
            if kind in (None, "auto"):
                raise
            log.warning("%s: planning as auto instead of %s over the devices left", e, kind)
            self.plan_kind = "auto"
            try:
                await self._replan_as(devices)
            finally:
                self.plan_kind = kind

    async def _replan_as(self, devices: Sequence[str]) -> None:
        await self._stop()
        self.idle = {}
        self.addresses = list(devices)
        self.weights = None  # split weights were per address: the new plan uses what devices advertise
        self.session = uuid.uuid4().hex[:12]
        self.plan = None
        self._kv_ids = []  # a new session: the devices hold no caches of ours
        self._failure = None
        self._pending.clear()
        self._result_from.clear()
        self._active = False
        try:
            await self._start()
        except BaseException:
            await self._stop()  # never leave a half-built plan behind: no members means a new bring-up
            self.plan = None
            raise

    # -- messages ----------------------------------------------------------------------------------------------

    def _on_message(self, link: Link, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind in ("pong", "probe_reply"):  # answers to the planner's timings: no session yet
            self._to_inbox(link, msg)
            return
        if msg.get("session") != self.session:
            raise ProtocolError(f"{kind!r} for session {msg.get('session')!r}, expected {self.session}")
        if kind == "result":
            key = ("result", (msg["req"], msg["step"]))
            req, step = key[1]
            waiting = self._pending.get(key)
            if waiting is not None and waiting.cancelled() or waiting is None and type(req) is int and (
                    req < self.req or req == self.req and type(step) is int and step <= self.step):
                # the hub's answer to a step we stopped waiting for: cancelled (the wait's cleanup may not have run
                # yet) or aborted; only an answer to a step never sent, or a second answer, breaks the protocol
                return
            if waiting is not None and self._result_from.get(key) is not link:
                raise ProtocolError(f"result for step {step} from {link.peer}, which is not the hub of the stage "
                                    f"that step went to")
        elif kind == "abort":
            if msg["req"] == self.req:  # an abort of an earlier request (which already ended) is old news
                self._fail(RemoteError(f"device {link.peer} stopped request {msg['req']}: {msg['reason']}"))
            return
        elif kind in ("loaded", "connected", "stats_reply", "need", "stored"):
            self._to_inbox(link, msg)
            return
        else:
            raise ProtocolError(f"an originator does not accept {kind!r} messages")
        fut = self._pending.get(key)
        if fut is None or fut.done():
            raise ProtocolError(f"unexpected {kind!r} for {key[1]} from {link.peer} (request {self.req} is running)")
        fut.set_result(msg)

    def _to_inbox(self, link: Link, msg: dict[str, Any]) -> None:
        member = next((m for m in self.members if m.link is link), None)
        if member is None:
            raise ProtocolError(f"{msg['t']!r} from a link that is not a member")
        try:
            member.inbox.put_nowait(msg)
        except asyncio.QueueFull:
            raise ProtocolError(f"{link.peer} sent more than {CONTROL_QUEUE} unsolicited replies") from None

    def _on_close(self, link: Link, error: BaseException | None) -> None:
        if not self.members:
            return
        member = next((m for m in self.members if m.link is link), None)
        if member is None:
            return  # a link of an earlier plan (replan closed it): not this session's loss
        self._fail(DeviceLostError(f"lost device {member.name}: {error}"))

    def _fail(self, error: BaseException) -> None:
        """Fail every wait in progress: the mesh cannot finish this request."""
        if self._failure is None:
            self._failure = error
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)

    async def _reply(self, member: Member, kinds: tuple[str, ...], timeout: float, what: str) -> dict:
        """The next control reply from `member`, which must be one of `kinds`."""
        get = asyncio.ensure_future(member.inbox.get())
        try:
            done, _ = await asyncio.wait({get, member.link.closed}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            get.cancel()
        if get in done and not get.cancelled():
            answer = get.result()
        elif member.link.closed.done():
            raise DeviceLostError(f"lost device {member.name} while {what}: {member.link.error}")
        else:
            raise MeshTimeoutError(f"device {member.name} did not finish {what} within {timeout} s")
        if answer.get("error"):
            raise RemoteError(f"device {member.name} failed {what}: {answer['error']}")
        if answer["t"] not in kinds:
            raise ProtocolError(f"device {member.name} answered {answer['t']!r} while {what}")
        return answer

    async def _request(self, member: Member, reply: str, msg: dict[str, Any], timeout: float, what: str) -> dict:
        member.link.send(msg)
        return await self._reply(member, (reply,), timeout, what)

    def _broadcast(self, msg: dict[str, Any]) -> None:
        if self._failure is not None:
            raise self._failure
        broadcast((m.link for m in self.members), msg)  # a step's hidden state is encoded once, not per device

    # -- Backend -------------------------------------------------------------------------------------------

    async def begin(self, capacity: int, keep: int = 0) -> None:
        if self._failure is not None and all(m.link.is_open for m in self.members):
            self._failure = None  # the last request failed on a device, but every device is still here
        self.req += 1
        self.step = 0
        self._active = True
        self._kv_ids = []
        msg = {"t": "begin", "session": self.session, "req": self.req, "capacity": capacity}
        if keep:
            msg["keep"] = keep
        self._broadcast(msg)

    async def end(self, history: list[int] | None = None) -> None:
        self._active = False
        if self._failure is None:
            kept = len(history) if history is not None and self.reuse_prefix else 0
            for m in self.members:
                if m.link.is_open:
                    m.link.send({"t": "end", "session": self.session, "req": self.req, "kept": kept})
            if kept:
                self._kv_ids = list(history)

    def abort(self, reason: str) -> None:
        if not self._active:
            return  # the request already ended: never abort the next one by mistake
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
        t0 = time.perf_counter()
        groups = self.plan.groups
        for i, (ranks, hub) in enumerate(groups):
            # stage by stage: each returns the hidden state of every position for the next (the last, of the last
            # position for the LM head)
            x = await self._stage_step(x, start, [self.members[r].link for r in ranks], self.members[hub].link,
                                       i < len(groups) - 1)
        self.forward_s.append(time.perf_counter() - t0)
        return x

    async def _stage_step(self, x: torch.Tensor, start: int, links: list[Link], hub: Link,
                          every: bool) -> torch.Tensor:
        self.step += 1
        key = ("result", (self.req, self.step))
        fut = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        self._result_from[key] = hub
        msg = {"t": "step", "session": self.session, "req": self.req, "step": self.step, "start": start,
               "x": to_record(x)}
        if every:
            msg["all"] = True
        try:
            if self._failure is not None:
                raise self._failure
            broadcast(links, msg)  # a step's hidden state is encoded once, not per device
            try:
                async with asyncio.timeout(self.timeouts.step):  # not wait_for: it can drop a cancellation
                    msg = await fut
            except TimeoutError as e:
                raise MeshTimeoutError(f"step {self.step} got no result from the hub within "
                                       f"{self.timeouts.step} s") from e
        finally:
            self._pending.pop(key, None)
            self._result_from.pop(key, None)
        out = from_record(msg["x"], "result")
        if out.shape[0] != 1 or out.shape[2] != x.shape[2] or out.shape[1] != (x.shape[1] if every else 1):
            raise ProtocolError(f"a stage returned a hidden state of shape {list(out.shape)} for one of "
                                f"{list(x.shape)}")
        return out

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
                "weight_bytes": self.head.nbytes(), "resident_weight_bytes": self.head.nbytes(), "disk_read_bytes": 0,
                "memory_budget_bytes": self.budget, "share": 0.0, "weight_format": str(self.format),
                "holds": "tokenizer, embedding, final norm, LM head"}]
        for m, s in zip(self.members, stats):
            shard = self.plan.shards[m.rank]
            out.append({
                "id": s["node"], "address": m.address, "role": s["role"], "rank": m.rank,
                "peak_rss_bytes": s["peak_rss_bytes"], "rss_bytes": s.get("rss_bytes"), "weight_bytes": s["weight_bytes"],
                "resident_weight_bytes": s["resident_weight_bytes"], "disk_read_bytes": s["disk_read_bytes"],
                "memory_budget_bytes": s["budget_bytes"], "weight_format": s.get("weight_format"),
                "share": round(self.plan.share(m.rank, self.config), 4),
                "q_heads": [shard.q_start, shard.q_stop], "mlp_columns": [shard.mlp_start, shard.mlp_stop],
                "layers": [shard.layer_start, shard.layer_start + len(shard.layers(self.config))],
                "stage": next(i for i, (ranks, _) in enumerate(self.plan.groups) if m.rank in ranks),
            })
        return out


def device_cost(spec: DeviceSpec, info: dict, sizes) -> DeviceCost:
    """The cost model's view of a device from what it advertised in its hello (each number checked: a peer may
    err): for the weight kind of `sizes`, the fixed time and byte rate of a decode phase its probe measured; else
    its score (decode GEMV GB/s) and the default fixed time."""
    def positive(v, default):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e15 else default

    kind = "int4" if "int4" in str(sizes) else "int8" if "int8" in str(sizes) else "dense"
    phases = info.get("phases")
    fit = phases.get(kind) if isinstance(phases, dict) else None
    fixed, rate = fit if isinstance(fit, list) and len(fit) == 2 else (None, None)
    host = info.get("host")
    return DeviceCost(spec.name, positive(rate, positive(info.get("capability"), 1.0) * 1e9), spec.budget_bytes,
                      phase_s=positive(fixed, PHASE_S), read_rate=positive(info.get("read_rate"), READ_RATE),
                      flops=positive(info.get("flops"), None),
                      host=host[:64] if isinstance(host, str) and host else None,
                      threads=int(positive(info.get("threads"), 1)), cores=int(positive(info.get("cores"), 1)))


async def gather_or_cancel(*aws) -> list:
    """Like gather, but the first failure cancels the others (and is raised once they have stopped)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    if not tasks:
        return []
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:  # we were cancelled
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()
    return [t.result() for t in tasks]


def local_secret() -> bytes:
    """A throwaway secret for a mesh that lives only inside this run."""
    return os.urandom(24).hex().encode()
