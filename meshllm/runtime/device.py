"""The device daemon: accepts authenticated links and computes its shard of every layer for each session.

A session is one originator's use of this device: a shard, a rank, and (star allreduce) either the links to
every worker (on the hub) or one link to the hub. Steps of a session run one at a time, in order, in a runner
task; an abort cancels the running step at once. A bad message closes only the link it came on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..collectives.driver import StarAllreduce
from ..errors import MeshError, MeshTimeoutError, ProtocolError
from ..cluster.plan import block_bytes, human_bytes
from ..discovery.probe import free_disk, host_id, page_cache_room
from ..model.config import ModelConfig
from ..model.loader import resolve_dtype
from ..model.shard import Shard
from ..model.default import cache_dir as default_cache_dir
from ..model.weights import LAYOUT, Format
from ..scheduler.slices import (BlockDamagedError, CacheError, SliceCache, block_name, cache_bytes, evict,
                                localize_block, tidy, touch)
from .blocks import BlockStore
from ..net.link import Link, Timeouts, connect, new_connection, parse_address
from ..wire.keys import prepare_async
from ..wire.frames import DEFAULT_MAX_FRAME, check_tensor
from .executors import compute_executor, cpu_count, io_executor, release_heap, set_torch_threads
from .originator import peak_rss_bytes, rss_bytes
from .tensors import from_record, to_record
from .worker import ShardWorker, act_dtype, warm_up

log = logging.getLogger("meshllm.device")

STEP_QUEUE = 8  # commands a session may have queued (begin/step/end); more is a protocol violation


@dataclass(frozen=True)
class Limits:
    """What peers may make a device hold. Connections not yet authenticated: anyone can open them, so they are
    capped in total and per address (the excess is reset at once, before any byte is read). Sessions: only peers
    that proved the secret open them, but one may err; a session holds a shard's weights."""

    pending: int = 64  # connections still in their handshake (each ends within the handshake timeout)
    pending_per_address: int = 8
    sessions: int = 8
    sessions_per_link: int = 2
MAX_PROBE_PEERS = 64  # devices one probe may time
BLOCK_SLACK = 64 * 1024  # a streamed block's safetensors header and alignment padding, with room to spare
BLOCK_RETRIES = 2  # a streamed block that arrives damaged is asked for again this many times, then the load fails


@dataclass
class Stats:
    """Per-session counters (seconds and counts), reported to the originator."""

    compute_s: float = 0.0
    framing_s: float = 0.0  # hidden states in and out (the allreduce counts its own)
    steps: int = 0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class Session:
    """One originator's use of this device."""

    id: str
    originator: Link
    rank: int
    world: int
    hub_rank: int
    reduce: StarAllreduce
    worker: ShardWorker | None = None
    commands: asyncio.Queue | None = None
    runner: asyncio.Task | None = None
    current: asyncio.Task | None = None  # the running step
    finished_req: int = -1  # requests up to this id are over: their stray parts/sums are dropped
    open_req: int | None = None  # the request whose begin has arrived and whose end (or abort) has not
    capacity: int = 0  # positions the last begin to arrive made room for (its steps are checked against it)
    kv_valid: int = 0  # positions of the KV caches the last request to end left for the next to reuse
    attached: asyncio.Future | None = None  # on a worker: the hub accepted our attach
    slices: asyncio.Queue | None = None  # streamed block chunks, one in flight
    store: BlockStore | None = None
    loader: asyncio.Task | None = None
    disk_mark: int = 0
    format: str = "dense"  # the weight format of the session's blocks
    stats: Stats = field(default_factory=Stats)
    broken: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.rank == self.hub_rank

    @property
    def peer_links(self) -> list[Link]:
        r = self.reduce
        return [*([r.hub_link] if r.hub_link else []), *r.worker_links.values()]


class Device:
    """A meshllm device: `async with Device(secret) as d: await d.serve_until(stop)`."""

    def __init__(self, secret: bytes, *, name: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 timeouts: Timeouts = Timeouts(), threads: int | None = None,
                 max_frame: int = DEFAULT_MAX_FRAME, capability: float | None = None,
                 cache_dir: str | os.PathLike | None = None, budget: int | None = None,
                 read_rate: float | None = None, fallback_port: bool = False, limits: Limits = Limits(),
                 cache_max: int | None = None, measured: dict | None = None) -> None:
        self.secret = secret
        self.limits = limits
        self.node_id = name or f"dev-{uuid.uuid4().hex[:8]}"
        self.host, self.port = host, port
        self.fallback_port = fallback_port  # `port` taken: listen on any free port instead of failing
        self.timeouts = timeouts
        self.threads = threads
        self.max_frame = max_frame
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.budget = budget  # bytes of weights this device may hold at once (None: no limit)
        self.cache_max = cache_max  # bytes the slice cache may hold (None: half of its disk's room, set at start)
        self.read_rate = read_rate  # test hook: cap block reads at this many bytes/s (a slow disk)
        self.info = {"cores": cpu_count(), "capability": capability or float(threads or cpu_count()),
                     "budget": budget, "threads": threads or cpu_count(), "host": host_id()}
        if measured:  # the probe's numbers, for the originator's planner
            self.info["phases"] = measured.get("phases")
            self.info["flops"] = measured.get("matmul_gflops", 0) * 1e9 or None
            self.info["read_rate"] = measured.get("read_bps")
        if read_rate:  # reads capped (a slow disk, for tests): the planner sees the cap
            self.info["read_rate"] = min(read_rate, self.info.get("read_rate") or read_rate)
        self.links: set[Link] = set()
        self.sessions: dict[str, Session] = {}
        self._refusals: dict[str, float] = {}  # address -> when its refusal was last logged
        self._probing: set[Link] = set()  # links whose probe is running (one each)
        self._loads: dict[str, Link] = {}  # session id -> its originator, from the load's arrival to its session
        self._stores: dict[Path, list] = {}  # a shard's folder -> [its resident BlockStore, sessions using it]
        self._server: asyncio.Server | None = None
        self._tasks: asyncio.TaskGroup | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def __aenter__(self) -> "Device":
        set_torch_threads(self.threads)
        self._compute = compute_executor()
        self._io = io_executor()
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._compute, warm_up)
        await prepare_async(self.secret)  # the mesh key, before the first link needs it
        await loop.run_in_executor(self._io, self._tidy_cache)
        try:
            try:
                self._server = await loop.create_server(self._accept, self.host, self.port)
            except OSError as e:
                if not (self.fallback_port and e.errno == errno.EADDRINUSE and self.port):
                    raise
                taken, self.port = self.port, 0
                self._server = await loop.create_server(self._accept, self.host, 0)
                log.info("port %d is taken (another device or program): listening on port %d instead",
                         taken, self._server.sockets[0].getsockname()[1])
        except OSError as e:
            await self.__aexit__(None, None, None)
            raise MeshError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}; choose a free --port "
                            f"(0 picks any) and an --interface address this machine has") from e
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("device %s listening on %s:%d", self.node_id, self.host, self.port)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions.values()):
            self._drop_session(session, "device shutting down")
        for link in list(self.links):
            link.close()
        try:
            await asyncio.wait_for(self._tasks.__aexit__(None, None, None), self.timeouts.close)
        except TimeoutError:
            log.warning("tasks did not stop within %.1f s", self.timeouts.close)
        self._compute.shutdown(wait=False, cancel_futures=True)
        self._io.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro, name: str) -> asyncio.Task:
        """Run a task owned by the device's TaskGroup; its failure is logged, never fatal to the daemon."""
        async def guarded():
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task %s failed", name)
        return self._tasks.create_task(guarded(), name=name)

    # -- the slice cache ----------------------------------------------------------------------------------------

    def _tidy_cache(self) -> None:
        """At start: drop what no finished shard owns; set the default cap (half of what the disk could hold)."""
        removed = tidy(self.cache_dir)
        if removed:
            log.info("slice cache: removed %d leftover file(s) or unfinished shard(s) under %s", len(removed),
                     self.cache_dir / "slices")
        if self.cache_max is None:
            held = cache_bytes(self.cache_dir)
            self.cache_max = (held + free_disk(self.cache_dir)) // 2

    def _enforce_cache_cap(self, cache: SliceCache) -> None:
        """After a load: the model just used is the most recent; over the cap, the least recently used models
        that no session uses go (blocking: the I/O executor)."""
        touch(cache.model_folder)
        keep = {s.store.cache.model_folder for s in self.sessions.values() if s.store is not None}
        keep.add(cache.model_folder)
        for folder, size in evict(self.cache_dir, self.cache_max, keep):
            log.info("slice cache over its cap of %s: removed model %s (%s, least recently used)",
                     human_bytes(self.cache_max), folder.name, human_bytes(size))
        held = cache_bytes(self.cache_dir)
        if held > self.cache_max:
            log.warning("slice cache holds %s, over its cap of %s, in models in use: raise --cache-max",
                        human_bytes(held), human_bytes(self.cache_max))

    # -- links ------------------------------------------------------------------------------------------------

    def _accept(self) -> Link:
        conn = new_connection(self.secret, self.node_id, initiator=False, info=self.info, max_frame=self.max_frame)
        link = Link(conn, self._on_message, self._on_close, self.timeouts, admit=self._admit)
        self.links.add(link)
        asyncio.get_running_loop().call_later(self.timeouts.handshake, self._handshake_deadline, link)
        return link

    def _admit(self, link: Link) -> bool:
        """A new connection from `link.host`: refused when too many are still in their handshake."""
        pending = [x for x in self.links if x is not link and not x.ready.done() and not x.closed.done()]
        here = sum(1 for x in pending if x.host == link.host)
        if len(pending) < self.limits.pending and here < self.limits.pending_per_address:
            return True
        now = time.monotonic()
        if now - self._refusals.get(link.host, -1e9) >= 60:  # once per address per minute
            self._refusals[link.host] = now
            if len(self._refusals) > 1024:  # forget the oldest: the log memory is bounded too
                for host in sorted(self._refusals, key=self._refusals.get)[:512]:
                    del self._refusals[host]
            log.warning("refusing connections from %s: %d of its connections (%d in all) have not finished the "
                        "handshake (limits: %d per address, %d in all); %s", link.host, here, len(pending),
                        self.limits.pending_per_address, self.limits.pending, descriptor_use())
        return False

    def _handshake_deadline(self, link: Link) -> None:
        if not link.ready.done():
            link.refuse(MeshTimeoutError(f"no handshake within {self.timeouts.handshake} s"), "timeout")

    def _on_close(self, link: Link, error: BaseException | None) -> None:
        self.links.discard(link)
        for session in list(self.sessions.values()):
            if link is session.originator:
                self._drop_session(session, f"originator closed the link ({error})")
            elif link in session.peer_links:
                self._break_session(session, f"device {link.peer} was lost: {error}")

    # -- messages ---------------------------------------------------------------------------------------------

    def _on_message(self, link: Link, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == "part":
            session = next((s for s in self.sessions.values() if link in s.reduce.worker_links.values()), None)
            if session is None:
                raise ProtocolError("part from a link that is not attached to a session on this hub")
            session.reduce.on_part(link, msg)
        elif kind == "sum":
            session = next((s for s in self.sessions.values() if s.reduce.hub_link is link), None)
            if session is None:
                raise ProtocolError("sum from a link that is not a hub of any session here")
            session.reduce.on_sum(msg)
        elif kind in ("step", "begin", "end"):
            session = self._session_of(link, msg)
            if session.worker is None:
                raise ProtocolError(f"{kind!r} before session {session.id} finished loading")
            self._check_command(session, msg)
            if session.broken:
                link.send({"t": "abort", "session": session.id, "req": msg.get("req", -1), "reason": session.broken})
                return
            try:
                session.commands.put_nowait(msg)
            except asyncio.QueueFull:
                raise ProtocolError(f"more than {STEP_QUEUE} commands queued for session {session.id}") from None
            # a request is open from the arrival of its begin to the arrival of its end (queued or running)
            if kind == "begin":
                session.open_req, session.capacity = msg["req"], msg["capacity"]
                session.reduce.begin(msg["req"])  # the hub takes this request's parts from now on
                # a prefix this device no longer holds (an abort dropped it) fails the request, never its output
                msg["reuse"] = msg.get("keep", 0) if msg.get("keep", 0) <= session.kv_valid else -1
                session.kv_valid = 0  # the caches change from here on
            elif kind == "end":
                if session.open_req == msg["req"]:
                    session.open_req = None
                session.kv_valid = min(msg.get("kept", 0), session.capacity)
        elif kind == "abort":
            session = self._session_of(link, msg)
            log.info("session %s: request %s aborted by the originator: %s", session.id, msg["req"], msg["reason"])
            self._abort_request(session, int(msg["req"]), str(msg["reason"]))
        elif kind == "slice":
            session = self._session_of(link, msg)
            try:
                session.slices.put_nowait(msg)
            except asyncio.QueueFull:
                raise ProtocolError("slice chunks sent without waiting for 'stored'") from None
        elif kind == "load":
            if not isinstance(msg["session"], str) or msg["session"] in self.sessions:
                raise ProtocolError(f"load for a bad or duplicate session id {msg['session']!r}")
            # sessions and loads under way (a burst of loads all arrive before the first registers its session)
            owners = [x.originator for x in self.sessions.values()] + list(self._loads.values())
            on_link = sum(1 for x in owners if x is link)
            if len(owners) >= self.limits.sessions or on_link >= self.limits.sessions_per_link:
                link.send({"t": "loaded", "session": msg["session"], "error":
                           f"SessionLimitError: this device holds {len(owners)} sessions, {on_link} of them "
                           f"this link's (limits: {self.limits.sessions}, {self.limits.sessions_per_link} per link); "
                           f"close one first"})
                return
            self._loads[msg["session"]] = link
            self._spawn(self._load(link, msg), f"load-{msg['session']}")
        elif kind == "connect_hub":
            session = self._session_of(link, msg)
            self._spawn(self._connect_hub(session, str(msg["hub"])), f"connect-{session.id}")
        elif kind == "attach":
            self._on_attach(link, msg)
        elif kind == "attached":
            session = next((x for x in self.sessions.values() if x.reduce.hub_link is link), None)
            if session is None or session.attached is None or session.attached.done():
                raise ProtocolError("unexpected 'attached'")
            session.attached.set_result(None)
        elif kind == "stats":
            session = self._session_of(link, msg)
            link.send({"t": "stats_reply", "session": session.id, "stats": self._stats(session)})
        elif kind == "ping":
            link.send({"t": "pong", "nonce": msg["nonce"]})
        elif kind == "probe":
            peers = msg["peers"]
            if not isinstance(peers, list) or len(peers) > MAX_PROBE_PEERS or \
                    not all(isinstance(p, str) and len(p) < 300 for p in peers):
                raise ProtocolError(f"probe peers must be a list of at most {MAX_PROBE_PEERS} addresses")
            if link in self._probing:
                raise ProtocolError("a probe while the last one is still running")
            self._probing.add(link)
            self._spawn(self._probe(link, msg["nonce"], peers), "probe")
        elif kind == "pong":
            pass
        else:
            raise ProtocolError(f"a device does not accept {kind!r} messages")

    def _session_of(self, link: Link, msg: dict[str, Any]) -> Session:
        session = self.sessions.get(msg.get("session"))
        if session is None or session.originator is not link:
            raise ProtocolError(f"{msg['t']!r} for unknown session {msg.get('session')!r}")
        return session

    def _stats(self, session: Session) -> dict[str, Any]:
        r = session.reduce.stats
        return {
            **session.stats.as_dict(),
            "allreduce_wait_s": r.wait_s, "rounds": r.rounds, "reduce_s": r.reduce_s,
            "framing_s": session.stats.framing_s + r.framing_s,
            "node": self.node_id,
            "rank": session.rank,
            "role": "hub" if session.is_hub else "worker",
            "peak_rss_bytes": peak_rss_bytes(),
            "rss_bytes": rss_bytes(),
            "weight_bytes": session.store.total_bytes if session.store else 0,
            "resident_weight_bytes": session.store.peak_resident_bytes if session.store else 0,
            "disk_read_bytes": session.store.disk_read_bytes - session.disk_mark if session.store else 0,
            "disk_read_total_bytes": session.store.disk_read_bytes if session.store else 0,
            "storage_read_total_bytes": storage_read_bytes(),  # what really came from the disk (page cache misses)
            "read_s": session.store.read_s if session.store else 0.0,
            "stall_s": session.store.stall_s if session.store else 0.0,
            "budget_bytes": self.budget,
            "weight_format": session.format,
        }

    # -- loading ----------------------------------------------------------------------------------------------

    async def _load(self, link: Link, msg: dict[str, Any]) -> None:
        sid = str(msg["session"])
        try:
            await self._load_session(link, msg, sid)
        finally:
            self._loads.pop(sid, None)

    async def _load_session(self, link: Link, msg: dict[str, Any], sid: str) -> None:
        try:
            fields = msg["shard"]
            if not isinstance(fields, list) or len(fields) not in (5, 7):
                raise ProtocolError(f"shard must be [q_start, q_stop, mlp_start, mlp_stop, owns_bias(, layer_start, "
                                    f"layer_stop)], got {str(fields)[:80]}")
            layers = [int(v) for v in fields[5:7]]
            shard = Shard(*[int(v) for v in fields[:4]], owns_bias=bool(fields[4]),
                          **({"layer_start": layers[0], "layer_stop": layers[1]} if layers else {}))
            rank, world, hub_rank = int(msg["rank"]), int(msg["world"]), int(msg["hub"])
            config = ModelConfig.from_dict(msg["config"])
            config.validate("the load message's config")
            if config.num_layers > 10_000:
                raise ProtocolError(f"implausible layer count {config.num_layers}")
            model_hash, dtype_name = str(msg["model_hash"]), str(msg["dtype"])
            dtype = resolve_dtype(dtype_name, config)
            fmt = Format.parse(str(msg["format"]))
            shard.check(config)
            if not (0 <= rank < world and 0 <= hub_rank < world):
                raise ProtocolError(f"bad load for session {sid}: rank {rank}, world {world}, hub {hub_rank}")
            if not model_hash.isalnum():  # it names a folder of the slice cache
                raise ProtocolError(f"model hash {model_hash[:80]!r} is not alphanumeric")
            if sid in self.sessions:  # two loads of one id in one burst both pass the check on arrival
                raise ProtocolError(f"load for a bad or duplicate session id {sid!r}")
        except (TypeError, ValueError, IndexError, KeyError, MeshError) as e:
            link.refuse(e if isinstance(e, ProtocolError) else ProtocolError(f"malformed load message: {e}"))
            return
        session = Session(sid, link, rank, world, hub_rank,
                          reduce=StarAllreduce(rank, world, hub_rank, self.timeouts.allreduce))
        session.commands = asyncio.Queue(maxsize=STEP_QUEUE)
        session.slices = asyncio.Queue(maxsize=2)
        session.loader = asyncio.current_task()  # so dropping the session mid-load cancels the load
        self.sessions[sid] = session
        self._loads.pop(sid, None)
        loop = asyncio.get_running_loop()
        store = None
        try:
            t0 = time.perf_counter()
            # int4 blocks are kept in this machine's kernel layout: a cache of another torch or CPU is not ours
            key = f"{dtype_name}-{fmt}".replace(":", "g") + (f"-{LAYOUT}" if fmt.quantized else "")
            cache = SliceCache(self.cache_dir, model_hash, shard, key, 2 * len(shard.layers(config)))
            # a streamed block holds what this device computes from the config and shard: its matrices at most as
            # wide as the compute dtype (a quantized format stores fewer bytes), norms in fp32, a header
            limit = max(block_bytes(config, shard, str(dtype).removeprefix("torch."))) + 8 * config.hidden_size \
                + BLOCK_SLACK
            missing, sizes = await loop.run_in_executor(self._io, cache.check)
            fetched = bool(missing)
            if missing:
                log.info("session %s: fetching %d of %d blocks from the originator", sid, len(missing),
                         cache.num_blocks)
            for _ in range(BLOCK_RETRIES + 1):
                if not missing:
                    break
                link.send({"t": "need", "session": sid, "blocks": missing})
                got = {i: await self._receive_block(session, cache, i, limit) for i in missing}
                sizes.update({i: size for i, size in got.items() if size is not None})
                missing = [i for i, size in got.items() if size is None]  # damaged in transit: asked for again
            if missing:
                raise CacheError(f"block {block_name(missing[0])} arrived damaged {BLOCK_RETRIES + 1} times "
                                 f"(SHA-256 mismatch): the link or the originator's copy corrupts it")
            await loop.run_in_executor(self._io, cache.mark_complete)
            await loop.run_in_executor(self._io, self._enforce_cache_cap, cache)
            if fetched:
                # the frames and conversions of the stream are freed, but glibc keeps freed heap pages: give them
                # back before the weights load, or they stay in this device's memory for good
                await loop.run_in_executor(self._io, release_heap)
            store = self._shared_store(cache.folder)  # another session's blocks of this shard: one copy for both
            if store is None:
                room = await loop.run_in_executor(self._io, page_cache_room,
                                                  min(self.budget or 0, sum(sizes.values())))
                store = BlockStore(cache, sizes, config, shard, self.budget, self._io, self.read_rate, room)
                await store.start()
                if store.window.fits:  # a streaming window is one request's cursor: shared only when resident
                    self._stores[cache.folder] = [store, 1]
            session.store = store
            session.worker = ShardWorker(config, shard, [], [], dtype, act_dtype(dtype, fmt))
            session.format = str(fmt)
            log.info("session %s: rank %d/%d%s, shard %s ready in %.2f s (%s of weights, %s)", sid, rank, world,
                     " (hub)" if session.is_hub else "", shard, time.perf_counter() - t0,
                     human_bytes(store.total_bytes),
                     "all resident" if store.window.fits else
                     f"window under {human_bytes(self.budget)}, {len(store.window.pinned)} blocks pinned, "
                     f"{len(store.uncached)} streamed blocks dropped from the page cache after use "
                     f"(room for {human_bytes(room or 0)})")
        except Exception as e:  # any failure here fails this load only, with the reason sent back
            if not isinstance(e, (MeshError, OSError)):
                log.exception("session %s: load failed", sid)
            self.sessions.pop(sid, None)
            if store is not None:
                self._release_store(store)
            if link.is_open and isinstance(e, ProtocolError):
                link.refuse(e)  # a malformed slice closes the link, like any malformed frame
            elif link.is_open:
                link.send({"t": "loaded", "session": sid, "error": f"{type(e).__name__}: {e}"})
            return
        finally:
            session.loader = None
        session.runner = self._spawn(self._run_session(session), f"session-{sid}")
        link.send({"t": "loaded", "session": sid, "weight_bytes": store.total_bytes,
                   "resident_bytes": store.resident_bytes, "peak_rss_bytes": peak_rss_bytes()})

    async def _receive_block(self, session: Session, cache: SliceCache, expected: int, limit: int) -> int | None:
        """Write one streamed block (chunks acknowledged one by one) into the cache; returns its size, or None
        when it arrived damaged (its SHA-256 differs) and must be asked for again. A block may not grow past
        `limit` bytes: the chunk that would is refused before anything of it is written."""
        loop = asyncio.get_running_loop()
        writer, index = None, None
        try:
            while True:
                try:
                    async with asyncio.timeout(self.timeouts.load):  # not wait_for: it can drop a cancellation
                        msg = await session.slices.get()
                except TimeoutError:
                    raise MeshTimeoutError(f"no slice data from the originator for {self.timeouts.load} s") from None
                if writer is None:
                    index = msg["block"]
                    if index != expected or msg["offset"] != 0:
                        raise ProtocolError(f"slice for block {index!r} at {msg['offset']!r}; expected block "
                                            f"{expected} from offset 0")
                    writer = await loop.run_in_executor(self._io, cache.begin_block, index)
                elif msg["block"] != index or msg["offset"] != writer.size:
                    raise ProtocolError(f"slice chunk for block {msg['block']} at {msg['offset']} out of order")
                if not isinstance(msg["data"], bytes):
                    raise ProtocolError("slice data must be bytes")
                if writer.size + len(msg["data"]) > limit:
                    raise ProtocolError(f"slice stream for block {index} passes {limit} bytes, the most this device "
                                        f"computes for it from the config, shard and format")
                await loop.run_in_executor(self._io, writer.write, msg["data"])
                if msg.get("sha256"):
                    size = None
                    try:
                        digest = await loop.run_in_executor(self._io, writer.finish, str(msg["sha256"]))
                    except BlockDamagedError as e:
                        log.warning("session %s: %s", session.id, e)
                        digest = None
                    else:
                        # verified as sent; then kept in this machine's kernel form (what the manifest vouches for)
                        size, digest = await loop.run_in_executor(self._io, localize_block, cache.path(index), digest)
                        await loop.run_in_executor(self._io, cache.record, index, size, digest)
                    # acknowledged either way: the originator finishes this round of blocks before a new `need`
                    session.originator.send({"t": "stored", "session": session.id, "block": index,
                                             "offset": writer.size, "done": True})
                    return size
                session.originator.send({"t": "stored", "session": session.id, "block": index,
                                         "offset": writer.size, "done": False})
        except BaseException:
            if writer is not None:
                writer.abort()
            raise

    async def _probe(self, link: Link, nonce, peers: list[str]) -> None:
        """Round trips from here to each of `peers` over authenticated links (None where one does not answer)."""
        from ..discovery.status import link_rtt

        out: list[float | None] = []
        try:
            for address in peers:  # one at a time: concurrent pings would time each other's queueing
                try:
                    out.append(await link_rtt(address, self.secret, self.timeouts.connect, self.node_id))
                except (MeshError, OSError, ValueError, TimeoutError) as e:
                    log.info("probe: %s does not answer: %s", address, e)
                    out.append(None)
        finally:
            self._probing.discard(link)
        if link.is_open:
            link.send({"t": "probe_reply", "nonce": nonce, "rtt_s": out})

    async def _connect_hub(self, session: Session, hub: str) -> None:
        try:
            host, port = parse_address(hub)
            link = await connect(host, port, self.secret, self.node_id, timeouts=self.timeouts, info=self.info,
                                 on_message=self._on_message, on_close=self._on_close, max_frame=self.max_frame)
            self.links.add(link)
            session.reduce.hub_link = link
            session.attached = asyncio.get_running_loop().create_future()
            link.send({"t": "attach", "session": session.id, "rank": session.rank})
            try:
                await asyncio.wait_for(asyncio.shield(session.attached), self.timeouts.handshake)
            except TimeoutError:
                raise MeshTimeoutError(f"the hub did not accept the attach within {self.timeouts.handshake} s") \
                    from None
            session.originator.send({"t": "connected", "session": session.id})
        except (MeshError, ValueError) as e:
            session.originator.send({"t": "connected", "session": session.id,
                                     "error": f"cannot reach the hub at {hub}: {e}"})

    def _on_attach(self, link: Link, msg: dict[str, Any]) -> None:
        session = self.sessions.get(msg["session"])
        rank = msg["rank"]
        if session is None or not session.is_hub or not session.reduce.attach(rank, link):
            raise ProtocolError(f"bad attach for session {msg['session']!r} rank {rank!r}")
        link.send({"t": "attached", "session": session.id})

    # -- requests ---------------------------------------------------------------------------------------------

    async def _run_session(self, session: Session) -> None:
        """Execute the session's begin/step/end commands in order; a failed command fails its request only."""
        loop = asyncio.get_running_loop()
        while True:
            msg = await session.commands.get()
            kind, req = msg["t"], msg["req"]  # checked when queued
            if req <= session.finished_req:
                continue  # aborted already
            # each command is a child of this runner (awaited right here), so an abort can cancel it alone
            session.current = loop.create_task(self._command(session, kind, msg))
            try:
                await session.current
            except asyncio.CancelledError:
                if session.current.cancelled() and not asyncio.current_task().cancelling():
                    continue  # the request was aborted, the session goes on
                raise
            except MeshError as e:
                self._fail_request(session, req, str(e))
            except Exception as e:  # e.g. no memory for a KV cache: fail the request, keep serving
                log.exception("session %s: %s failed", session.id, kind)
                self._fail_request(session, req, f"{type(e).__name__}: {e}")
            finally:
                session.current = None

    async def _command(self, session: Session, kind: str, msg: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        if kind == "begin":
            session.disk_mark = session.store.disk_read_bytes  # disk_read_bytes counts per request
            session.store.rewind()  # an aborted request may have left the window anywhere
            if msg["reuse"] < 0:
                raise MeshError(f"asked to keep {msg['keep']} cached positions, but this device's KV caches were "
                                f"dropped since (an aborted request): run the request again")
            await loop.run_in_executor(self._compute, session.worker.begin, msg["capacity"], msg["reuse"])
        elif kind == "end":
            session.finished_req = max(session.finished_req, msg["req"])
            await loop.run_in_executor(self._compute, session.worker.end, msg.get("kept", 0) > 0)
        else:
            await self._step(session, msg)

    def _check_command(self, session: Session, msg: dict[str, Any]) -> None:
        """Fields of begin/step/end, checked before anything acts on them (raises ProtocolError)."""
        for key in ("req", "capacity", "start", "step", "keep", "kept"):
            if key in msg and (type(msg[key]) is not int or msg[key] < 0):
                raise ProtocolError(f"{msg['t']!r} field {key!r} must be a non-negative integer")
        context = session.worker.config.max_position_embeddings
        if msg["t"] == "begin" and not 0 < msg["capacity"] <= context:
            raise ProtocolError(f"begin capacity {msg['capacity']} outside 1..{context}")
        if msg["t"] == "begin" and msg.get("keep", 0) >= msg["capacity"]:
            raise ProtocolError(f"begin keeps {msg['keep']} positions of a request of {msg['capacity']}")
        if msg["t"] == "step" and msg["start"] >= context:
            raise ProtocolError(f"step start {msg['start']} beyond the context of {context}")
        if msg["t"] == "step" and type(msg.get("all", False)) is not bool:
            raise ProtocolError("step field 'all' must be a boolean")
        if msg["t"] == "step":
            _, shape, _ = check_tensor(msg["x"], "hidden state")
            d = session.worker.config.hidden_size
            if len(shape) != 3 or shape[0] != 1 or shape[2] != d or shape[1] == 0:
                raise ProtocolError(f"hidden state of shape {shape}; this model needs [1, T, {d}]")
            if msg["start"] + shape[1] > session.capacity:
                raise ProtocolError(f"step covers positions {msg['start']}..{msg['start'] + shape[1]} but the "
                                    f"request began with room for {session.capacity}")

    async def _step(self, session: Session, msg: dict[str, Any]) -> None:
        """One forward step over this shard: per layer, attention then MLP, each followed by an allreduce."""
        loop = asyncio.get_running_loop()
        req, step, start = int(msg["req"]), int(msg["step"]), int(msg["start"])
        t = time.perf_counter()
        x = from_record(msg["x"], "hidden state").to(session.worker.dtype)  # its shape was checked on arrival
        session.stats.framing_s += time.perf_counter() - t
        add = None
        store = session.store
        layers = len(session.worker.shard.layers(session.worker.config))
        if session.world == 1 and store.window.fits:
            # alone in its stage, every block resident: nothing to wait for between layers, so one executor job
            # runs them all (a job per phase costs ~0.2 ms of hops each: 12 ms a token on a 30-layer model)
            blocks = [await store.get(i) for i in range(2 * layers)]  # resident: no wait
            t = time.perf_counter()
            x = await loop.run_in_executor(self._compute, self._layers, session.worker, x, start, blocks)
            session.stats.compute_s += time.perf_counter() - t
            del blocks
            layers = 0  # done
        for layer in range(layers):  # counted from its first
            for phase in (0, 1):
                if req <= session.finished_req:  # aborted: stop at the next phase whatever the awaits did
                    raise asyncio.CancelledError(f"request {req} was aborted")
                block = await store.get(2 * layer + phase)  # resident, or read now (the window prefetches ahead)
                t = time.perf_counter()
                x, part = await loop.run_in_executor(self._compute, self._phase, session.worker, layer, phase, x,
                                                     add, start, block)
                session.stats.compute_s += time.perf_counter() - t
                del block  # no reference may outlive the release, or the window holds one block too many
                store.done(2 * layer + phase)  # released before the allreduce: the next reads overlap the wire
                add = await session.reduce((req, step, layer, phase), part)
        if session.is_hub:
            t = time.perf_counter()
            # the hidden state of the last position (the LM head's input), or of every position for the next
            # pipeline stage to go on from
            out = x if add is None else x + add
            last = out if msg.get("all") else out[:, -1:]
            session.originator.send({"t": "result", "session": session.id, "req": req, "step": step,
                                     "x": to_record(last)})
            session.stats.framing_s += time.perf_counter() - t
        session.stats.steps += 1

    @staticmethod
    def _layers(worker: ShardWorker, x: torch.Tensor, start: int, blocks: list) -> torch.Tensor:
        with torch.inference_mode():
            for layer in range(len(blocks) // 2):
                x = x + worker.attn(layer, x, start, blocks[2 * layer])
                x = x + worker.mlp(layer, x, blocks[2 * layer + 1])
            return x

    @staticmethod
    def _phase(worker: ShardWorker, layer: int, phase: int, x: torch.Tensor, add: torch.Tensor | None,
               start: int, block) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            if add is not None:
                x = x + add  # the residual update of the previous allreduce, folded into this job
            part = worker.attn(layer, x, start, block) if phase == 0 else worker.mlp(layer, x, block)
            return x, part

    # -- failure ----------------------------------------------------------------------------------------------

    def _abort_request(self, session: Session, req: int, reason: str) -> None:
        """Stop `req` now: drop its queued commands, cancel its running step."""
        session.finished_req = max(session.finished_req, req)
        session.kv_valid = 0  # whatever the caches hold now is not a clean prefix
        if session.open_req is not None and session.open_req <= req:
            session.open_req = None
        session.reduce.abort(req)
        if session.current is not None and not session.current.done():
            session.current.cancel()

    def _fail_request(self, session: Session, req: int, reason: str) -> None:
        log.warning("session %s: request %d failed: %s", session.id, req, reason)
        self._abort_request(session, req, reason)
        if session.originator.is_open:
            session.originator.send({"t": "abort", "session": session.id, "req": req, "reason": reason})

    def _break_session(self, session: Session, reason: str) -> None:
        """A peer of the session is gone: fail the running request and every later one."""
        if session.broken:
            return
        session.broken = reason
        if session.open_req is None:
            # between requests (a clean shutdown closes the hub's links first): no request fails; the next one
            # is refused with this reason
            log.info("session %s: %s; its next request will be refused", session.id, reason)
            return
        self._fail_request(session, session.open_req, reason)

    def _drop_session(self, session: Session, reason: str) -> None:
        log.info("session %s closed: %s", session.id, reason)
        self.sessions.pop(session.id, None)
        if session.loader is not None:
            session.loader.cancel()
        if session.current is not None:
            session.current.cancel()
        if session.runner is not None:
            session.runner.cancel()
        for link in session.peer_links:
            link.close()
        if session.worker is not None:
            session.worker.end()
        if session.store is not None:
            self._release_store(session.store)
        # the weights and caches leave with this call, whatever reference cycle the session's tasks keep: its
        # memory is free now (the executor returns the freed heap pages to the system), not at the next GC pass
        session.store = session.worker = None
        try:
            self._io.submit(release_heap)
        except (AttributeError, RuntimeError):  # not started, or shutting down: the process frees it all anyway
            pass

    def _shared_store(self, folder) -> BlockStore | None:
        entry = self._stores.get(folder)
        if entry is None:
            return None
        entry[1] += 1
        return entry[0]

    def _release_store(self, store: BlockStore) -> None:
        """One session less uses `store`: closed with its last user."""
        entry = self._stores.get(store.cache.folder)
        if entry is not None and entry[0] is store:
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._stores[store.cache.folder]
        store.close()

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set."""
        await stop.wait()


def descriptor_use() -> str:
    """'N of M file descriptors open' for this process (Linux), or ''."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return f"{len(os.listdir('/proc/self/fd'))} of {soft} file descriptors open"
    except (OSError, ImportError, ValueError):
        return ""


def storage_read_bytes() -> int:
    """Bytes this process caused to be read from storage (Linux /proc/self/io; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def new_secret() -> str:
    """A random mesh secret (URL-safe text)."""
    import secrets

    return secrets.token_urlsafe(24)


def secret_bytes(secret: str | bytes | None) -> bytes:
    """The mesh secret from the argument or MESHLLM_SECRET, as bytes; a clear error when there is none."""
    if secret is None:
        secret = os.environ.get("MESHLLM_SECRET")
    if not secret:
        raise MeshError("no mesh secret: pass --secret S or set MESHLLM_SECRET (make one with `meshllm secret`)")
    return secret if isinstance(secret, bytes) else secret.encode()

