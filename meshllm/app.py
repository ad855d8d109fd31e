"""`Mesh`: the app API. Finds the devices of a mesh on the LAN by mDNS and runs requests over them.

    async with Mesh(secret=...) as m:
        result = await m.generate("Hello", max_tokens=32)
        async for piece in m.stream("Tell me a story"):
            print(piece, end="")
        reply = await m.chat([{"role": "user", "content": "Hi"}])

Requests run one after another, never interleaved on the mesh. Between requests the mesh follows the LAN: a device
that left is dropped and one that joined is added, and the next request runs on a new plan (hub re-elected: the
highest advertised score, ties to the smallest node id). With no secret, or no device found, it runs on this
device alone and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import AsyncIterator, Sequence

from .discovery.records import PeerRecord, mesh_id
from .errors import MeshError, MeshTimeoutError
from .generation.loop import Result
from .generation.sampling import SamplingParams
from .net.link import Timeouts
from .wire.frames import PROTOCOL_VERSION

log = logging.getLogger("meshllm.app")

SETTLE_S = 0.3  # after the devices wanted are found: how long answers keep coming in a burst
PROBE_TIMEOUT_S = 1.0  # a LAN device that does not accept a TCP connection in this long is not there
UNREACHABLE_RETRY_S = 30.0  # a discovered device that refused a link is retried after this (or when it re-announces)


class Mesh:
    """A model run across the devices of one mesh (those that share its secret) on the LAN.

    model: a Hugging Face folder or .gguf (default: $MESHLLM_MODEL, else the embedded SmolLM2-135M-Instruct).
    secret: the mesh secret (default: $MESHLLM_SECRET). min_devices: wait for this many (default 1: with none
    found, run here alone). timeout: seconds to wait for them. interface: browse on this address only (default:
    $MESHLLM_INTERFACE, else every interface). quantize: the weight format, as `--quantize` (default:
    $MESHLLM_QUANTIZE, else the model's own: a quantized GGUF kept packed, anything else dense). prefix_cache:
    keep the KV cache of the last request on the devices, so a prompt that starts with it (the next turn of a
    chat) computes only what follows (default True; the same output in fp32, see the README for bf16). plan:
    'auto' (default, or $MESHLLM_PLAN) runs the plan the cost model predicts fastest over the devices found and
    their measured links; 'single', 'tp', 'pipeline' or 'hybrid' forces that kind over every device.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, secret: str | bytes | None = None,
                 min_devices: int = 1, timeout: float = 5.0, interface: str | None = None,
                 dtype: str | None = None, threads: int | None = None, memory_budget: int | None = None,
                 timeouts: Timeouts = Timeouts(), quantize: str | None = None, prefix_cache: bool = True,
                 plan: str | None = None) -> None:
        if min_devices < 0:
            raise MeshError(f"min_devices must be 0 or more, got {min_devices}")
        if timeout <= 0:
            raise MeshError(f"timeout must be positive, got {timeout}")
        self.model = model or os.environ.get("MESHLLM_MODEL") or None
        secret = secret if secret is not None else os.environ.get("MESHLLM_SECRET")
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self.min_devices = min_devices
        self.timeout = timeout
        self.interface = interface or os.environ.get("MESHLLM_INTERFACE") or None
        self.dtype, self.threads, self.memory_budget, self.timeouts = dtype, threads, memory_budget, timeouts
        self.quantize = quantize or os.environ.get("MESHLLM_QUANTIZE") or None
        self.prefix_cache = prefix_cache
        self.plan_kind = plan or os.environ.get("MESHLLM_PLAN") or "auto"
        if self.plan_kind not in ("auto", "single", "tp", "pipeline", "hybrid"):
            raise MeshError(f"plan must be auto, single, tp, pipeline or hybrid, got {self.plan_kind!r}")
        self.mesh_id: str | None = None
        self.ready_s = 0.0  # entering the context: discovery + plan + load
        self._browser = None
        self._engine = None  # MeshEngine, or LocalEngine when no device is there
        self._records: list[PeerRecord] = []  # the devices of the current plan
        self._unreachable: dict[str, tuple[PeerRecord, float]] = {}
        self._lock = asyncio.Lock()
        self._stack: contextlib.AsyncExitStack | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def __aenter__(self) -> "Mesh":
        from .model.default import default_model_path

        t0 = time.perf_counter()
        self._stack = contextlib.AsyncExitStack()
        try:
            if self.model is None:
                self.model = await asyncio.to_thread(default_model_path)
            else:
                from .model.hub import resolve_model

                self.model = await asyncio.to_thread(resolve_model, self.model)
            if not self._secret:
                if self.min_devices > 1:
                    raise MeshError("no mesh secret: pass secret=... or set MESHLLM_SECRET (make one with "
                                    "`meshllm secret`)")
                log.warning("no mesh secret given (secret=... or MESHLLM_SECRET): running on this device alone")
            else:
                from .discovery.mdns import Browser

                from .runtime.mesh import MeshEngine
                from .wire.keys import warn_if_weak

                warn_if_weak(self._secret, log)
                self.mesh_id = await asyncio.to_thread(mesh_id, self._secret)
                self._browser = await self._stack.enter_async_context(Browser(self.interface))
                # the head and tokenizer load while the devices are being found
                engine = MeshEngine(self.model, [], self._secret, dtype=self.dtype, threads=self.threads,
                                    timeouts=self.timeouts, memory_budget=self.memory_budget, quantize=self.quantize,
                                    skip_unreachable=True, defer=True, plan=self.plan_kind)
                loading = asyncio.ensure_future(engine.__aenter__())
                try:
                    found = await self._discover()
                finally:
                    await loading  # its failure (a bad model) is the error to report
                    self._engine = engine  # from here on, aclose() takes it down
                await self._use(found)
                if len(self._records) < self.min_devices and (self._records or self.min_devices > 1):
                    raise MeshTimeoutError(
                        f"{len(found)} device(s) of this mesh were found but only {len(self._records)} answered, "
                        f"wanted {self.min_devices}: check that they are reachable from here (`meshllm status`)")
            if self._engine is None:
                await self._use([])
        except BaseException:
            await self.aclose()
            raise
        self.ready_s = time.perf_counter() - t0
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        try:
            await self._drop_engine()
        finally:
            if self._stack is not None:
                stack, self._stack = self._stack, None
                await stack.aclose()

    # -- discovery and planning --------------------------------------------------------------------------------

    def _wanted(self) -> list[PeerRecord]:
        """Devices of our mesh now advertised, less those that refused us lately (until they re-announce)."""
        now = time.monotonic()
        out = []
        for r in self._browser.members(self.mesh_id, PROTOCOL_VERSION):
            bad = self._unreachable.get(r.address)
            if bad is not None and bad[0] == r and now - bad[1] < UNREACHABLE_RETRY_S:
                continue
            out.append(r)
        return out

    async def _discover(self) -> list[PeerRecord]:
        """Wait until min_devices of our mesh are seen (or the timeout), then for the burst of answers to end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        want = max(1, self.min_devices)
        while len(self._wanted()) < want:
            left = deadline - loop.time()
            if left <= 0:
                break
            await self._browser.changed(left)
        settle_until = min(deadline, loop.time() + SETTLE_S) if self._wanted() else loop.time()
        while loop.time() < settle_until and await self._browser.changed(max(0.0, settle_until - loop.time())):
            pass
        found = self._wanted()
        others = [r for r in self._browser.peers.values()
                  if r.mesh != self.mesh_id or r.version != PROTOCOL_VERSION]
        if others:
            log.info("ignoring %d device(s) of other meshes or protocol versions: %s", len(others),
                     ", ".join(sorted(r.node_id for r in others)))
        if len(found) < self.min_devices and (found or self.min_devices > 1):  # none at all: run here alone
            raise MeshTimeoutError(
                f"found {len(found)} device(s) of this mesh within {self.timeout} s, wanted {self.min_devices}: "
                f"start `python -m meshllm join` with the same secret on more devices, or lower min_devices")
        return found

    async def _use(self, records: list[PeerRecord]) -> None:
        """Bring the engine in line with `records`: a new plan over those that answer (and are who they say), or
        this device alone when there are none."""
        from .runtime.local import LocalEngine
        from .runtime.mesh import MeshEngine

        if not records:
            if isinstance(self._engine, LocalEngine):
                return
            if self._secret:
                log.warning("no device of this mesh found on the LAN: running on this device alone")
            engine = LocalEngine(self.model, dtype=self.dtype, threads=self.threads, quantize=self.quantize)
            await engine.__aenter__()
            await self._drop_engine()
            self._engine, self._records = engine, []
            return
        addresses = [r.address for r in records]
        if isinstance(self._engine, MeshEngine):  # the same engine (head loaded) on a new plan
            await self._engine.replan(addresses)
        else:
            engine = MeshEngine(self.model, addresses, self._secret, dtype=self.dtype, threads=self.threads,
                                timeouts=self.timeouts, memory_budget=self.memory_budget, quantize=self.quantize,
                                skip_unreachable=True, plan=self.plan_kind)
            await engine.__aenter__()
            await self._drop_engine()
            self._engine = engine
        now = time.monotonic()
        # who answered at each address: the plan's devices, and those it leaves idle
        by_address = {m.address: m.link.conn.peer_id for m in self._engine.members} | self._engine.idle
        bad = []
        for r in records:
            if r.address in self._engine.unreachable:
                bad.append(r)
            elif r.address in by_address and by_address[r.address] != r.node_id:
                log.warning("%s answered as %r, not as the %r it advertised: not used", r.address,
                            by_address[r.address], r.node_id)
                bad.append(r)
        for r in bad:
            self._unreachable[r.address] = (r, now)
        if any(r.address in by_address for r in bad):  # a plan that includes an impostor: plan again without it
            return await self._use([r for r in records if r not in bad])
        self._records = [r for r in records if r.address in by_address]
        if not self._records:
            return await self._use([])
        log.info("mesh of %d device(s), hub %s", len(self._records), self._hub_name())

    async def _drop_engine(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.__aexit__(None, None, None)

    def _hub_name(self) -> str | None:
        plan = self.plan
        if plan is None:
            return None
        return plan.devices[plan.hub].name

    async def _refresh(self) -> None:
        """Between requests: re-plan when a device left (link closed or goodbye) or a new one was announced."""
        if self._browser is None:
            return
        from .runtime.mesh import MeshEngine

        current = [(r.node_id, r.address) for r in self._records]
        wanted = await self._still_unreachable_dropped(self._wanted(), set(current))
        lost = isinstance(self._engine, MeshEngine) and any(not m.link.is_open for m in self._engine.members)
        if lost or [(r.node_id, r.address) for r in wanted] != current:
            log.info("devices changed (%d -> %d%s): re-planning", len(current), len(wanted),
                     ", a link was lost" if lost else "")
            try:
                await self._use(wanted)
            except BaseException:
                self._records = []
                await self._drop_engine()  # the next request starts again from scratch
                raise

    async def _still_unreachable_dropped(self, wanted: list[PeerRecord], current: set) -> list[PeerRecord]:
        """A device that refused us before (a crash leaves its record behind until it expires) is tried with a
        plain TCP connect before it can cause a new plan; if it still does not answer, it stays out."""
        out = []
        for r in wanted:
            if (r.node_id, r.address) not in current and r.address in self._unreachable:
                host, port = r.address.rsplit(":", 1)
                try:
                    _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), PROBE_TIMEOUT_S)
                    writer.close()
                except (OSError, TimeoutError):
                    self._unreachable[r.address] = (r, time.monotonic())
                    continue
                del self._unreachable[r.address]
            out.append(r)
        return out

    async def _engine_for_request(self):
        await self._refresh()
        if self._engine is None:
            await self._use(self._wanted() if self._browser is not None else [])
        self._engine.reuse_prefix = self.prefix_cache
        return self._engine

    # -- requests ----------------------------------------------------------------------------------------------

    @staticmethod
    def _params(max_tokens: int, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
                seed: int | None, stop: Sequence[str], ignore_eos: bool) -> SamplingParams:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop),
                                ignore_eos=ignore_eos)
        params.check()
        return params

    async def stream(self, prompt: str | list[dict], *, max_tokens: int = 128, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                     stop: Sequence[str] = (), ignore_eos: bool = False, chat: bool | None = None,
                     result: Result | None = None, params: SamplingParams | None = None) -> AsyncIterator[str]:
        """Yield the text as it is generated. `result`, if given, is filled in (ids, timings) as it goes.
        `params` (a SamplingParams) replaces the sampling keywords when given."""
        if params is None:
            params = self._params(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, ignore_eos)
        else:
            params.check()
        async with self._lock:
            engine = await self._engine_for_request()
            try:
                async with contextlib.aclosing(engine.stream(prompt, params, chat=chat, result=result)) as pieces:
                    async for piece in pieces:
                        yield piece
            finally:
                self._forget_lost()

    def _forget_lost(self) -> None:
        """After a request that resumed on fewer devices (the engine re-planned without a lost one): the devices in
        use are the engine's; a lost one stays out until it answers a connect again."""
        from .runtime.mesh import MeshEngine

        if not isinstance(self._engine, MeshEngine) or not self._engine.members:
            return
        members = {m.address for m in self._engine.members} | set(self._engine.idle)
        gone = [r for r in self._records if r.address not in members]
        now = time.monotonic()
        for r in gone:
            self._unreachable[r.address] = (r, now)
        if gone:
            self._records = [r for r in self._records if r.address in members]

    async def generate(self, prompt: str | list[dict], **kwargs) -> Result:
        """Run one request to the end: Result with text, token_ids, ttft_s, token_latency_s, finish_reason."""
        result = Result()
        async for _ in self.stream(prompt, result=result, **kwargs):
            pass
        return result

    async def chat(self, messages: list[dict], **kwargs) -> Result:
        """A chat turn: `messages` as [{"role": "user", "content": "..."}, ...], with the model's chat template."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
            raise MeshError('chat takes a list of messages like [{"role": "user", "content": "Hi"}]')
        return await self.generate(messages, chat=True, **kwargs)

    # -- what is in use ----------------------------------------------------------------------------------------

    @property
    def local(self) -> bool:
        """True when running on this device alone."""
        return not self._records

    @property
    def devices(self) -> list[dict]:
        """The devices of the current plan: node id, address, score, cores, memory, role, share."""
        plan = self.plan
        ranks = {m.address: m.rank for m in getattr(self._engine, "members", [])}
        hubs = {hub for _, hub in plan.groups} if plan is not None else set()
        out = []
        for r in self._records:
            d = r.to_dict()
            rank = ranks.get(r.address)
            if plan is not None and rank is not None and rank < plan.world:
                d["role"] = "hub" if rank in hubs else "worker"
                d["share"] = round(plan.share(rank, self._engine.config), 4)
                layers = plan.shards[rank].layers(self._engine.config)
                d["layers"] = [layers.start, layers.stop]
            elif plan is not None:
                d["role"], d["share"] = "idle", 0.0  # answered, but the fastest plan does without it
            out.append(d)
        return out

    @property
    def plan(self):
        """The current Plan (shards, hub), or None when running alone."""
        return getattr(self._engine, "plan", None)
