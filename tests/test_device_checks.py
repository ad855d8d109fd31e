"""A device against peers that hold the secret but break the protocol, stall or damage what they send, over real
sockets and device processes: every check closes the offending link with its reason, every wait ends in a
MeshTimeoutError naming its phase, a block damaged in transit is fetched again, and the device keeps serving."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from helpers.checkpoints import VARIANTS
from helpers.wire import split_frames
from meshllm.errors import MeshTimeoutError, ProtocolError, RemoteError
from meshllm.generation.sampling import SamplingParams
from meshllm.net.link import WRITE_LIMIT, Link, Timeouts, connect, new_connection
from meshllm.runtime.device import BLOCK_RETRIES, STEP_QUEUE
from meshllm.runtime.launcher import READY
from meshllm.runtime.local import LocalEngine
from meshllm.runtime.mesh import MeshEngine, local_secret
from meshllm.scheduler.slices import block_name
from meshllm.wire.frames import tensor_record

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = "the quick brown fox"
PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)
MODEL = VARIANTS["gqa_tied"]  # hidden 64, 4 query heads over 2 kv heads, MLP 160, 3 layers, context 256
D = MODEL["hidden_size"]
# short enough to wait out in a test, long enough for a loaded machine to stream and reduce a small model
DEVICE_TIMEOUTS = dict(handshake=1.0, load=3.0, allreduce=2.0)

DEVICE = """
import asyncio, json, logging, os, signal, sys
from meshllm.net.link import Timeouts
from meshllm.runtime.device import Device
from meshllm.runtime.launcher import READY

async def main(name, cache, timeouts):
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Device(os.environ["MESHLLM_SECRET"].encode(), name=name, threads=1, capability=1.0,
                      cache_dir=cache, timeouts=Timeouts(**timeouts)) as device:
        print(READY, name, f"127.0.0.1:{device.port}", flush=True)
        await device.serve_until(stop)

logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
"""


class Devices:
    """Device processes on 127.0.0.1 with DEVICE_TIMEOUTS (`meshllm join` has no flag for timeouts)."""

    def __init__(self, n: int, secret: bytes, folder: Path) -> None:
        self.n, self.secret, self.folder = n, secret, folder
        self.procs: list[asyncio.subprocess.Process] = []

    async def __aenter__(self) -> list[str]:
        env = {**os.environ, "MESHLLM_SECRET": self.secret.decode()}
        for i in range(self.n):
            with open(self.folder / f"dev-{i}.log", "wb") as log:
                self.procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-c", DEVICE, f"dev-{i}", str(self.folder / "cache"), json.dumps(DEVICE_TIMEOUTS),
                    stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL, stderr=log, env=env))
        try:
            lines = await asyncio.wait_for(asyncio.gather(*(p.stdout.readline() for p in self.procs)), 60)
        except BaseException:
            await self.__aexit__()
            raise
        assert all(line.decode().startswith(READY) for line in lines), lines
        return [line.decode().split()[-1] for line in lines]

    async def __aexit__(self, *exc) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.terminate()
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 10)
            except TimeoutError:
                p.kill()
                await asyncio.wait_for(p.wait(), 10)


@dataclass
class Cluster:
    """Two device processes, the model they serve, and what a clean run of it gives."""

    addresses: list[str]
    secret: bytes
    cache: Path  # the devices' slice cache (shared)
    folder: Path
    expected: list[int]  # greedy ids of a clean run
    model_hash: str
    config: dict
    dtype: str
    shards: dict[int, list[list]]  # world -> the shard of each rank, as a load message carries it (all cached)


def shard_fields(s) -> list:
    return [s.q_start, s.q_stop, s.mlp_start, s.mlp_stop, s.owns_bias]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(make_model, tmp_path_factory):
    """Two device processes for the module, their slice caches (shared) warm for worlds of one and two."""
    folder = make_model("gqa_tied", **MODEL)
    reference = await reference_ids(folder)
    secret = local_secret()
    logs = tmp_path_factory.mktemp("devices")
    async with Devices(2, secret, logs) as addresses:
        shards = {}
        async with asyncio.timeout(60):
            for world in (1, 2):
                async with MeshEngine(folder, addresses[:world], secret) as m:
                    assert (await m.generate(PROMPT, PARAMS, chat=False)).token_ids == reference
                    assert m.plan.hub == 0  # equal scores: the smallest node id, dev-0
                    shards[world] = [shard_fields(s) for s in m.plan.shards]
                    state = (m.model_hash, m.config.to_dict(), str(m.dtype).replace("torch.", ""))
        yield Cluster(addresses, secret, logs / "cache", folder, reference, *state, shards)


async def reference_ids(folder) -> list[int]:
    """Greedy ids of one process holding the whole model."""
    async with asyncio.timeout(60), LocalEngine(folder) as engine:
        return (await engine.generate(PROMPT, PARAMS, chat=False)).token_ids


async def keep_serving(cluster: Cluster) -> None:
    """A fresh MeshEngine over both devices generates what a clean run does."""
    async def run():
        async with MeshEngine(cluster.folder, cluster.addresses, cluster.secret) as m:
            return (await m.generate(PROMPT, PARAMS, chat=False)).token_ids
    assert await asyncio.wait_for(run(), 30) == cluster.expected


# -- peers the tests play ----------------------------------------------------------------------------------------


class Peer:
    """Our end of an authenticated link: sends whatever a test says, keeps every message that comes back."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.link: Link | None = None

    @classmethod
    async def connect(cls, address: str, secret: bytes, name: str = "rogue", **kw) -> "Peer":
        peer = cls()
        host, port = address.rsplit(":", 1)
        peer.link = await asyncio.wait_for(connect(host, int(port), secret, name, on_message=peer.on_message, **kw),
                                           10)
        return peer

    def on_message(self, link: Link, msg: dict) -> None:
        self.inbox.put_nowait(msg)

    def send(self, *messages: dict) -> None:
        """Write the messages in one burst (encoded here: no check on what they hold)."""
        self.link.transport.write(b"".join(self.link.conn.encode(m) for m in messages))

    async def expect(self, kind: str, timeout: float = 10.0) -> dict:
        msg = await asyncio.wait_for(self.inbox.get(), timeout)
        assert msg["t"] == kind, msg
        return msg

    async def refused(self, timeout: float = 10.0) -> BaseException:
        """The error our link was closed with (the device's reason arrives as a RemoteError)."""
        await asyncio.wait_for(asyncio.shield(self.link.closed), timeout)
        return self.link.error


class FakeHub:
    """A hub played by the test: it takes one worker's link and attach, then says what the test says."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.peer = Peer()

    async def __aenter__(self) -> str:
        def accept() -> Link:
            self.peer.link = Link(new_connection(self.secret, "fake-hub", initiator=False), self.peer.on_message)
            return self.peer.link

        self.server = await asyncio.get_running_loop().create_server(accept, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        if self.peer.link is not None:
            self.peer.link.close()


def tensor(*shape: int, nbytes: int | None = None) -> dict:
    n = 4
    for s in shape:
        n *= s
    return tensor_record("float32", list(shape), bytes(n if nbytes is None else nbytes))


def load(cluster: Cluster, sid, *, world: int = 1, rank: int = 0, **fields) -> dict:
    """A load of a shard the devices have cached, with `fields` changed."""
    shard = fields.pop("shard") if "shard" in fields else cluster.shards[world][rank]
    return {"t": "load", "session": sid, "model_hash": cluster.model_hash, "config": cluster.config,
            "dtype": cluster.dtype, "format": "dense", "shard": shard, "rank": rank, "world": world, "hub": 0, **fields}


def begin(sid, req=1, capacity=4) -> dict:
    return {"t": "begin", "session": sid, "req": req, "capacity": capacity}


def step(sid, start=0, x=None, req=1, n=1) -> dict:
    return {"t": "step", "session": sid, "req": req, "step": n, "start": start, "x": x or tensor(1, 1, D)}


def part(key=(1, 1, 0, 0), rank=1, x=None) -> dict:
    req, n, layer, phase = key
    return {"t": "part", "req": req, "step": n, "layer": layer, "phase": phase, "rank": rank,
            "x": x or tensor(1, 1, D)}


def sum_(key=(1, 1, 0, 0), x=None) -> dict:
    req, n, layer, phase = key
    return {"t": "sum", "req": req, "step": n, "layer": layer, "phase": phase, "x": x or tensor(1, 1, D)}


def slice_(sid, block=0, offset=0, data=b"0123456789", **fields) -> dict:
    return {"t": "slice", "session": sid, "block": block, "offset": offset, "data": data, **fields}


class Scene:
    """A device in a given state, with the link a case sends its bad frames on (`sender`) and the links that must
    stay open (`others`).

    link: a bare authenticated link. loaded / begun: our world-of-one session on dev-0 (begun: request 1 with
    room for 4). loading / streaming: our session on dev-0 waits for its first block (streaming: one chunk of it
    stored). mesh_hub / mesh_worker: a MeshEngine session runs; we send on a link of our own to its hub / worker.
    hub / hub_closed: our world-of-two session on dev-0 as hub, with us as its worker (hub_closed: request 1's
    first round done). worker / worker_waiting: our world-of-two session on dev-1 as worker, with us as its hub
    (worker_waiting: its part of round (1, 1, 0, 0) has reached us).
    """

    def __init__(self, cluster: Cluster, kind: str) -> None:
        self.cluster, self.kind = cluster, kind
        self.sid = uuid.uuid4().hex[:12]
        self.sender: Peer | None = None
        self.origin: Peer | None = None  # our originator link, where there is one
        self.engine: MeshEngine | None = None
        self.hub: FakeHub | None = None
        self.others: list[Link] = []

    async def __aenter__(self) -> "Scene":
        try:
            await asyncio.wait_for(self._enter(), 30)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _enter(self) -> None:
        m, kind = self.cluster, self.kind
        dev0, dev1 = m.addresses
        if kind == "link":
            self.sender = await Peer.connect(dev0, m.secret)
        elif kind in ("mesh_hub", "mesh_worker"):
            self.engine = await MeshEngine(m.folder, m.addresses, m.secret).__aenter__()
            self.sid = self.engine.session
            self.others = [x.link for x in self.engine.members]
            self.sender = await Peer.connect(dev0 if kind == "mesh_hub" else dev1, m.secret)
        elif kind in ("loaded", "begun"):
            self.sender = self.origin = await Peer.connect(dev0, m.secret)
            self.origin.send(load(m, self.sid))
            assert "error" not in await self.origin.expect("loaded")
            if kind == "begun":
                self.origin.send(begin(self.sid))
        elif kind in ("loading", "streaming"):
            self.sender = self.origin = await Peer.connect(dev0, m.secret)
            self.origin.send(load(m, self.sid, model_hash=uuid.uuid4().hex))  # a model nobody has: streamed
            assert (await self.origin.expect("need"))["blocks"][0] == 0
            if kind == "streaming":
                self.origin.send(slice_(self.sid))
                await self.origin.expect("stored")
        elif kind in ("hub", "hub_closed"):
            self.origin = await Peer.connect(dev0, m.secret)
            self.origin.send(load(m, self.sid, world=2, rank=0))
            assert "error" not in await self.origin.expect("loaded")
            self.sender = await Peer.connect(dev0, m.secret, "rogue-worker")
            self.sender.send({"t": "attach", "session": self.sid, "rank": 1})
            await self.sender.expect("attached")
            self.others = [self.origin.link]
            if kind == "hub":
                self.origin.send(begin(self.sid))  # the hub takes parts of a request it has begun only
                await asyncio.sleep(0.2)
            if kind == "hub_closed":
                self.origin.send(begin(self.sid), step(self.sid))
                self.sender.send(part())
                assert (await self.sender.expect("sum"))["layer"] == 0
        elif kind in ("worker", "worker_waiting"):
            self.hub = FakeHub(m.secret)
            hub_address = await self.hub.__aenter__()
            self.origin = await Peer.connect(dev1, m.secret)
            self.origin.send(load(m, self.sid, world=2, rank=1))
            assert "error" not in await self.origin.expect("loaded")
            self.origin.send({"t": "connect_hub", "session": self.sid, "hub": hub_address})
            self.sender = self.hub.peer
            await self.sender.expect("attach")
            self.sender.link.send({"t": "attached", "session": self.sid})
            assert "error" not in await self.origin.expect("connected")
            self.others = [self.origin.link]
            if kind == "worker_waiting":
                self.origin.send(begin(self.sid), step(self.sid))
                got = await self.sender.expect("part")
                assert (got["req"], got["step"], got["layer"], got["phase"]) == (1, 1, 0, 0)
        else:
            raise AssertionError(kind)

    async def __aexit__(self, *exc) -> None:
        for peer in (self.sender, self.origin):
            if peer is not None and peer.link is not None:
                peer.link.close()
        if self.hub is not None:
            await self.hub.__aexit__()
        if self.engine is not None:
            await asyncio.wait_for(self.engine.__aexit__(None, None, None), 10)


# -- every check on an authenticated but malformed frame -----------------------------------------------------------

CASES = [
    # (name, scene, frames(scene, cluster), reason the device gives; {sid} is the scene's session)
    # Device._on_message / _session_of: frames that name no session of this link, or a type a device never takes
    ("part-from-an-unattached-link", "link", lambda s, m: [part()],
     "part from a link that is not attached to a session on this hub"),
    ("sum-from-a-link-that-is-no-hub", "link", lambda s, m: [sum_()],
     "sum from a link that is not a hub of any session here"),
    ("begin-for-an-unknown-session", "link", lambda s, m: [begin("nope")], "'begin' for unknown session 'nope'"),
    ("slice-for-an-unknown-session", "link", lambda s, m: [slice_("nope")], "'slice' for unknown session 'nope'"),
    ("stats-for-an-unknown-session", "link", lambda s, m: [{"t": "stats", "session": "nope"}],
     "'stats' for unknown session 'nope'"),
    ("step-for-another-originators-session", "mesh_hub", lambda s, m: [step(s.sid)],
     "'step' for unknown session '{sid}'"),
    ("abort-for-another-originators-session", "mesh_worker",
     lambda s, m: [{"t": "abort", "session": s.sid, "req": 1, "reason": "hijack"}],
     "'abort' for unknown session '{sid}'"),
    ("connect_hub-for-another-originators-session", "mesh_worker",
     lambda s, m: [{"t": "connect_hub", "session": s.sid, "hub": "127.0.0.1:9"}],
     "'connect_hub' for unknown session '{sid}'"),
    ("a-type-only-originators-take", "link", lambda s, m: [{"t": "result", "session": "x", "req": 1, "step": 1,
                                                             "x": tensor(1, 1, D)}],
     "a device does not accept 'result' messages"),
    ("attached-unasked", "link", lambda s, m: [{"t": "attached", "session": "x"}], "unexpected 'attached'"),
    ("abort-req-not-a-number", "loaded", lambda s, m: [{"t": "abort", "session": s.sid, "req": "soon",
                                                        "reason": "x"}],
     "malformed 'abort' message: ValueError"),
    # Device._load: the load message
    ("load-session-id-not-text", "link", lambda s, m: [load(m, 5)], "load for a bad or duplicate session id 5"),
    ("load-session-id-taken", "loaded", lambda s, m: [load(m, s.sid)],
     "load for a bad or duplicate session id '{sid}'"),
    ("load-twice-in-one-burst", "link", lambda s, m: [load(m, "twin"), load(m, "twin")],
     "load for a bad or duplicate session id 'twin'"),
    ("load-shard-heads-beyond-the-model", "link", lambda s, m: [load(m, s.sid, shard=[0, 9, 0, 160, True])],
     "query heads [0, 9) outside 0..4"),
    ("load-shard-columns-beyond-the-model", "link", lambda s, m: [load(m, s.sid, shard=[0, 4, 0, 999, True])],
     "MLP columns [0, 999) outside 0..160"),
    ("load-shard-too-short", "link", lambda s, m: [load(m, s.sid, shard=[0, 4])],
     "shard must be [q_start, q_stop, mlp_start, mlp_stop, owns_bias(, layer_start, layer_stop)], got [0, 4]"),
    ("load-shard-layers-backwards", "link", lambda s, m: [load(m, s.sid, shard=[0, 4, 0, 160, True, 2, 1])],
     "layers [2, 1) outside 0..3 or empty"),
    ("load-shard-layers-beyond-the-model", "link", lambda s, m: [load(m, s.sid, shard=[0, 4, 0, 160, True, 1, 9])],
     "layers [1, 9) outside 0..3 or empty"),
    ("load-rank-beyond-world", "link", lambda s, m: [load(m, s.sid, rank=2, world=2, shard=m.shards[2][1])],
     "bad load for session {sid}: rank 2, world 2, hub 0"),
    ("load-hub-beyond-world", "link", lambda s, m: [load(m, s.sid, hub=1)],
     "bad load for session {sid}: rank 0, world 1, hub 1"),
    ("load-config-lacks-a-key", "link",
     lambda s, m: [load(m, s.sid, config={k: v for k, v in m.config.items() if k != "hidden_size"})],
     "malformed load message: ModelConfig.__init__() missing 1 required positional argument: 'hidden_size'"),
    ("load-config-the-math-cannot-run", "link", lambda s, m: [load(m, s.sid, config={**m.config, "num_heads": 3})],
     "num_attention_heads (3) must be a multiple of num_key_value_heads (2)"),
    ("load-config-implausible-layers", "link",
     lambda s, m: [load(m, s.sid, config={**m.config, "num_layers": 20_000})], "implausible layer count 20000"),
    ("load-dtype-unsupported", "link", lambda s, m: [load(m, s.sid, dtype="float64")],
     "dtype 'float64' is not supported"),
    ("load-model-hash-a-path", "link", lambda s, m: [load(m, s.sid, model_hash="../../etc")],
     "model hash '../../etc' is not alphanumeric"),
    # Device._on_message and _check_command: begin / step / end
    ("begin-before-the-load-finished", "loading", lambda s, m: [begin(s.sid)],
     "'begin' before session {sid} finished loading"),
    ("begin-req-not-an-integer", "loaded", lambda s, m: [begin(s.sid, req="1")],
     "'begin' field 'req' must be a non-negative integer"),
    ("begin-req-negative", "loaded", lambda s, m: [begin(s.sid, req=-1)],
     "'begin' field 'req' must be a non-negative integer"),
    ("begin-capacity-zero", "loaded", lambda s, m: [begin(s.sid, capacity=0)], "begin capacity 0 outside 1..256"),
    ("begin-capacity-beyond-the-context", "loaded", lambda s, m: [begin(s.sid, capacity=257)],
     "begin capacity 257 outside 1..256"),
    ("step-number-negative", "begun", lambda s, m: [{**step(s.sid), "step": -1}],
     "'step' field 'step' must be a non-negative integer"),
    ("step-start-beyond-the-context", "begun", lambda s, m: [step(s.sid, start=256)],
     "step start 256 beyond the context of 256"),
    ("commands-beyond-the-queue", "loaded",
     lambda s, m: [{"t": "end", "session": s.sid, "req": 1}] * (STEP_QUEUE + 1),
     f"more than {STEP_QUEUE} commands queued for session {{sid}}"),
    # Device._step's checks (made on arrival)
    ("step-hidden-state-too-wide", "begun", lambda s, m: [step(s.sid, x=tensor(1, 1, D + 1))],
     f"hidden state of shape [1, 1, {D + 1}]; this model needs [1, T, {D}]"),
    ("step-hidden-state-batch-of-two", "begun", lambda s, m: [step(s.sid, x=tensor(2, 1, D))],
     f"hidden state of shape [2, 1, {D}]"),
    ("step-hidden-state-no-positions", "begun", lambda s, m: [step(s.sid, x=tensor(1, 0, D))],
     f"hidden state of shape [1, 0, {D}]"),
    ("step-hidden-state-bytes-short", "begun", lambda s, m: [step(s.sid, x=tensor(1, 1, D, nbytes=4))],
     f"hidden state of shape [1, 1, {D}] and dtype float32 needs {4 * D} bytes, got 4"),
    ("step-positions-beyond-the-capacity", "begun", lambda s, m: [step(s.sid, start=3, x=tensor(1, 2, D))],
     "step covers positions 3..5 but the request began with room for 4"),
    # Device._receive_block: the streamed chunks of a block
    ("slice-of-another-block-first", "loading", lambda s, m: [slice_(s.sid, block=1)],
     "slice for block 1 at 0; expected block 0 from offset 0"),
    ("slice-starting-mid-block", "loading", lambda s, m: [slice_(s.sid, offset=7)],
     "slice for block 0 at 7; expected block 0 from offset 0"),
    ("slice-chunk-out-of-order", "streaming", lambda s, m: [slice_(s.sid, offset=99)],
     "slice chunk for block 0 at 99 out of order"),
    ("slice-chunk-of-another-block", "streaming", lambda s, m: [slice_(s.sid, block=1, offset=10)],
     "slice chunk for block 1 at 10 out of order"),
    ("slice-data-not-bytes", "loading", lambda s, m: [slice_(s.sid, data="text")], "slice data must be bytes"),
    ("slices-without-waiting-for-stored", "loading", lambda s, m: [slice_(s.sid)] * 3,
     "slice chunks sent without waiting for 'stored'"),
    # Device._on_attach
    ("attach-unknown-session", "link", lambda s, m: [{"t": "attach", "session": "nope", "rank": 1}],
     "bad attach for session 'nope' rank 1"),
    ("attach-to-a-worker", "mesh_worker", lambda s, m: [{"t": "attach", "session": s.sid, "rank": 0}],
     "bad attach for session '{sid}' rank 0"),
    ("attach-a-rank-already-attached", "mesh_hub", lambda s, m: [{"t": "attach", "session": s.sid, "rank": 1}],
     "bad attach for session '{sid}' rank 1"),
    ("attach-the-hubs-own-rank", "mesh_hub", lambda s, m: [{"t": "attach", "session": s.sid, "rank": 0}],
     "bad attach for session '{sid}' rank 0"),
    ("attach-a-rank-beyond-the-world", "mesh_hub", lambda s, m: [{"t": "attach", "session": s.sid, "rank": 2}],
     "bad attach for session '{sid}' rank 2"),
    ("attach-a-rank-not-an-integer", "mesh_hub", lambda s, m: [{"t": "attach", "session": s.sid, "rank": "1"}],
     "bad attach for session '{sid}' rank '1'"),
    # collectives/driver.py: on_part on the hub, on_sum on a worker
    ("part-claiming-another-rank", "hub", lambda s, m: [part(rank=0)],
     "part claims rank 0 on the link of another rank"),
    ("part-round-key-not-integers", "hub", lambda s, m: [part(key=("1", 1, 0, 0))],
     "round key ('1', 1, 0, 0) must be integers"),
    ("part-tensor-bytes-short", "hub", lambda s, m: [part(x=tensor(1, 1, D, nbytes=8))],
     f"partial sum of shape [1, 1, {D}] and dtype float32 needs {4 * D} bytes, got 8"),
    ("part-twice", "hub", lambda s, m: [part(), part()], "duplicate part from rank 1 for round (1, 1, 0, 0)"),
    ("part-out-of-order", "hub", lambda s, m: [part(), part(key=(1, 1, 0, 1))],
     "part from rank 1 for round (1, 1, 0, 1) while round (1, 1, 0, 0) is still open"),
    ("part-late", "hub_closed", lambda s, m: [part()],
     "late part from rank 1 for round (1, 1, 0, 0): round (1, 1, 0, 0) is already closed"),
    ("part-of-another-shape", "hub_closed", lambda s, m: [part(key=(1, 1, 0, 1), x=tensor(1, 1, 1))],
     f"part from rank 1 for round (1, 1, 0, 1) has shape [1, 1, 1] (float32); the hub's part has [1, 1, {D}] "
     f"(float32)"),
    ("parts-of-a-request-not-begun-twice", "hub", lambda s, m: [part(key=(2, 1, 0, 0)), part(key=(2, 1, 0, 1))],
     "rank 1 sent a second part for a request the originator has not begun here (request 2; begun: 1)"),
    ("sum-round-key-not-integers", "worker", lambda s, m: [sum_(key=(1, 1.5, 0, 0))],
     "round key (1, 1.5, 0, 0) must be integers"),
    ("sum-nobody-waits-for", "worker", lambda s, m: [sum_()], "sum for round (1, 1, 0, 0) while waiting for None"),
    ("sum-for-another-round", "worker_waiting", lambda s, m: [sum_(key=(1, 1, 0, 1))],
     "sum for round (1, 1, 0, 1) while waiting for (1, 1, 0, 0)"),
    ("sum-tensor-bytes-short", "worker_waiting", lambda s, m: [sum_(x=tensor(1, 1, D, nbytes=8))],
     f"allreduce sum of shape [1, 1, {D}] and dtype float32 needs {4 * D} bytes, got 8"),
    ("sum-of-another-shape", "worker_waiting", lambda s, m: [sum_(x=tensor(1, 1, 1))],
     f"sum for round (1, 1, 0, 0) has shape [1, 1, 1] (float32); our part has [1, 1, {D}] (float32)"),
]


@pytest.mark.parametrize("scene,frames,reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_a_malformed_frame_closes_only_its_link_with_the_reason(cluster, scene, frames, reason):
    async with Scene(cluster, scene) as s:
        s.sender.send(*frames(s, cluster))
        error = await s.sender.refused()
        assert isinstance(error, RemoteError), repr(error)  # the device said why in an error frame
        assert reason.format(sid=s.sid) in str(error)
        assert all(link.is_open for link in s.others)
        if s.engine is not None:  # the session the frame tried to use goes on undisturbed
            result = await asyncio.wait_for(s.engine.generate(PROMPT, PARAMS, chat=False), 30)
            assert result.token_ids == cluster.expected
    await keep_serving(cluster)


async def test_a_part_of_a_request_not_begun_never_ends_the_open_round(cluster):
    """A worker's part for a request the originator has not begun on the hub (forged, or ahead of its begin) waits
    for that begin: the open round is not dropped on its word. Here no begin comes, so the open round times out,
    and the request fails naming the rank and what it sent."""
    async with Scene(cluster, "hub_closed") as s:  # the hub waits for rank 1's part of round (1, 1, 0, 1)
        s.sender.send(part(key=(2, 1, 0, 0)))
        abort = await s.origin.expect("abort", DEVICE_TIMEOUTS["allreduce"] + 5)
        assert abort["req"] == 1
        assert abort["reason"] == (f"allreduce round (1, 1, 0, 1) timed out after {DEVICE_TIMEOUTS['allreduce']} s "
                                   f"waiting for rank(s) [1]; rank 1 sent a part for request 2, which the "
                                   f"originator has not begun here")
        assert s.sender.link.is_open and s.origin.link.is_open
    await keep_serving(cluster)


async def test_an_oversized_slice_stream_is_refused_before_it_is_written(cluster):
    """A slice stream may carry only what the device computes for the block: an 8 MiB chunk for a block of a few
    tens of KB is refused before a byte of it reaches the disk, naming the bound."""
    real = max(p.stat().st_size for p in cluster.cache.rglob("L*.safetensors"))  # the blocks as streamed
    async with Scene(cluster, "loading") as s:
        s.origin.send(slice_(s.sid, data=bytes(8 << 20)))
        error = await s.origin.refused()
        match = re.search(r"slice stream for block 0 passes (\d+) bytes, the most this device computes for it "
                          r"from the config, shard and format", str(error))
        assert match, error
        assert real <= int(match.group(1)) < 1 << 20
    assert not [p for p in cluster.cache.rglob("*.part") if p.stat().st_size]
    await keep_serving(cluster)


async def test_sessions_are_capped_per_link_and_freed_when_the_link_closes(cluster):
    origin = await Peer.connect(cluster.addresses[0], cluster.secret, "many-sessions")
    try:
        origin.send(*[load(cluster, f"s{i}") for i in range(5)])  # one burst: all arrive before any loads
        replies = [await origin.expect("loaded", 30) for _ in range(5)]
        refused = [r for r in replies if "error" in r]
        assert len(refused) == 3 and {r["session"] for r in replies if "error" not in r} == {"s0", "s1"}
        assert all(r["error"].startswith("SessionLimitError: this device holds 2 sessions, 2 of them this "
                                         "link's (limits: 8, 2 per link); close one first") for r in refused)
    finally:
        origin.link.close()
    again = await Peer.connect(cluster.addresses[0], cluster.secret, "after")
    try:
        again.send(load(cluster, "s9"))
        assert "error" not in await again.expect("loaded", 30)  # the closed link's sessions are gone
    finally:
        again.link.close()
    await keep_serving(cluster)


# -- the write limit ------------------------------------------------------------------------------------------------


async def test_a_peer_that_stops_reading_is_cut_off_at_the_links_write_limit():
    secret, limit, message = b"write-limit", 2**20, {"t": "ping", "nonce": bytes(64 * 2**10)}
    sinks: list[Link] = []

    def accept() -> Link:
        sinks.append(Link(new_connection(secret, "sink", initiator=False)))
        return sinks[-1]

    server = await asyncio.get_running_loop().create_server(accept, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        default = await asyncio.wait_for(connect("127.0.0.1", port, secret, "source"), 5)
        assert default.write_limit == WRITE_LIMIT == 256 * 2**20
        default.close()
        link = await asyncio.wait_for(connect("127.0.0.1", port, secret, "source", write_limit=limit), 5)
        sink = sinks[-1]
        await asyncio.wait_for(sink.ready, 5)
        sink.transport.pause_reading()  # the peer stops reading: the kernel buffers fill, then the link's own
        queued, sent = [], 0
        with pytest.raises(ProtocolError, match=r"does not read what we send \(\d+ bytes queued, over the limit "
                                                rf"of {limit}\)"):
            while sent < 64 * 2**20:  # far beyond what the kernel buffers hold: the limit must have cut in
                queued.append(link.transport.get_write_buffer_size())
                link.send(message)
                sent += 64 * 2**10
                await asyncio.sleep(0)  # the transport writes what the socket takes
        assert queued[-1] > limit >= max(queued[:-1])  # cut at the first send that found the limit passed
        assert not link.is_open and isinstance(link.error, ProtocolError)
    finally:
        server.close()
        for s in sinks:
            s.close()


# -- timeouts: each phase ends in a MeshTimeoutError that names it -------------------------------------------------


async def test_connect_times_out_against_a_peer_that_accepts_nothing():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: once its queue is full, further SYNs go unanswered
        port = listener.getsockname()[1]
        fill = [socket.socket() for _ in range(2)]
        try:
            for s in fill:
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
            t0 = time.monotonic()
            with pytest.raises(MeshTimeoutError, match=rf"connecting to 127.0.0.1:{port} timed out after 0.5 s"):
                await asyncio.wait_for(connect("127.0.0.1", port, b"s", "x", timeouts=Timeouts(connect=0.5)), 5)
            assert time.monotonic() - t0 < 3
        finally:
            for s in fill:
                s.close()


async def test_connect_times_out_against_a_peer_that_never_answers_the_hello():
    writers = []

    async def silent(reader, writer):
        writers.append(writer)
        await asyncio.wait_for(reader.read(), 10)  # takes our hello and says nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        t0 = time.monotonic()
        with pytest.raises(MeshTimeoutError, match=rf"handshake with 127.0.0.1:{port} timed out after 0.5 s"):
            await asyncio.wait_for(connect("127.0.0.1", port, b"s", "x", timeouts=Timeouts(handshake=0.5)), 5)
        assert time.monotonic() - t0 < 3
    finally:
        server.close()
        for w in writers:
            w.close()


@pytest.mark.parametrize("says", ["nothing", "hello only"])
async def test_a_device_closes_a_link_that_does_not_finish_the_handshake(cluster, says):
    host, port = cluster.addresses[0].rsplit(":", 1)
    t0 = time.monotonic()  # before the connection: the device's clock starts when it accepts (a busy test loop
    # may see the connection open only later)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
    try:
        if says == "hello only":
            conn = new_connection(cluster.secret, "slow", initiator=True)
            conn.start()
            writer.write(conn.data_to_send())  # and never the auth
        data = await asyncio.wait_for(reader.read(), DEVICE_TIMEOUTS["handshake"] + 5)  # until the device closes
        elapsed = time.monotonic() - t0
    finally:
        writer.close()
    assert DEVICE_TIMEOUTS["handshake"] - 0.1 < elapsed < DEVICE_TIMEOUTS["handshake"] + 2
    frames = split_frames(data)
    assert [f["t"] for f in frames] == ["hello"] + (["auth"] if says == "hello only" else []) + ["error"]
    assert frames[-1]["reason"] == f"no handshake within {DEVICE_TIMEOUTS['handshake']} s"
    await keep_serving(cluster)


async def test_a_device_gives_up_a_load_whose_stream_stops_mid_block(cluster):
    async with Scene(cluster, "streaming") as s:  # one chunk of block 0 stored, and then nothing
        t0 = time.monotonic()
        reply = await s.origin.expect("loaded", DEVICE_TIMEOUTS["load"] + 5)
        assert time.monotonic() - t0 > DEVICE_TIMEOUTS["load"] - 0.5
        assert reply["error"] == f"MeshTimeoutError: no slice data from the originator for {DEVICE_TIMEOUTS['load']} s"
        assert s.origin.link.is_open  # the load failed, not the link
    assert list(cluster.cache.rglob("L*.safetensors"))  # the cache is where we look (it holds the warm shards)
    assert not list(cluster.cache.rglob("*.part"))  # and the half-written block was removed
    await keep_serving(cluster)


class ResultLost(MeshEngine):
    """An originator that never hears from its hub: every `result` frame is lost on the way."""

    def _on_message(self, link, msg):
        if msg["t"] != "result":
            super()._on_message(link, msg)


async def test_the_originator_times_out_a_step_whose_result_never_comes(cluster):
    async with asyncio.timeout(30), ResultLost(cluster.folder, cluster.addresses, cluster.secret,
                                               timeouts=Timeouts(step=1.0)) as engine:
        t0 = time.monotonic()
        with pytest.raises(MeshTimeoutError, match=r"step 1 got no result from the hub within 1.0 s"):
            await engine.generate(PROMPT, PARAMS, chat=False)
        assert time.monotonic() - t0 < 3
    await keep_serving(cluster)


@pytest.mark.parametrize("silent,missing", [("hub", "['the hub']"), ("worker", "[1]")])
async def test_an_allreduce_round_times_out_naming_who_is_missing(cluster, silent, missing):
    """A worker whose hub never sends the sum, and a hub whose worker never sends its part (we play the silent
    one), fail the request with the round and the missing ranks, and keep their session."""
    async with Scene(cluster, "worker" if silent == "hub" else "hub") as s:
        s.origin.send(begin(s.sid), step(s.sid))
        if silent == "hub":
            await s.sender.expect("part")  # the round began on the device
        t0 = time.monotonic()
        abort = await s.origin.expect("abort", DEVICE_TIMEOUTS["allreduce"] + 5)
        assert time.monotonic() - t0 > DEVICE_TIMEOUTS["allreduce"] - 0.5
        assert abort["req"] == 1
        assert abort["reason"] == (f"allreduce round (1, 1, 0, 0) timed out after {DEVICE_TIMEOUTS['allreduce']} s "
                                   f"waiting for rank(s) {missing}")
        assert s.origin.link.is_open and s.sender.link.is_open
    await keep_serving(cluster)


# -- a slice damaged in transit -----------------------------------------------------------------------------------


class Damaging(MeshEngine):
    """An originator whose `slice` frames of the first block it streams carry one flipped byte, in the first `times`
    of them (None: all): damage the link's seal cannot see (a bad disk or memory on the way to the socket). It
    records the blocks the device asks for, each time."""

    def __init__(self, *args, times: int | None, **kw) -> None:
        super().__init__(*args, **kw)
        self.times = times
        self.block: int | None = None
        self.damaged = 0
        self.needs: list[list[int]] = []

    async def _stream_blocks(self, m, shard, blocks):
        self.needs.append(list(blocks))
        m.link.send = functools.partial(self._send, type(m.link).send.__get__(m.link))
        try:
            await super()._stream_blocks(m, shard, blocks)
        finally:
            del m.link.send

    def _send(self, send, msg: dict) -> None:
        if msg["t"] == "slice" and msg["data"]:
            if self.block is None:
                self.block = msg["block"]
            if msg["block"] == self.block and (self.times is None or self.damaged < self.times):
                self.damaged += 1
                data = bytearray(msg["data"])
                data[len(data) // 2] ^= 0x01
                msg = {**msg, "data": bytes(data)}
        send(msg)


async def test_a_block_damaged_on_the_way_is_fetched_again(cluster, make_model):
    folder = make_model("damaged_once", seed=11, **MODEL)  # weights no device has cached: they are streamed
    relay = Damaging(folder, cluster.addresses[:1], cluster.secret, times=1)
    async with asyncio.timeout(60), relay as engine:
        result = await engine.generate(PROMPT, PARAMS, chat=False)
    assert result.token_ids == await reference_ids(folder)
    assert relay.damaged == 1
    assert relay.needs == [list(range(2 * MODEL["num_hidden_layers"])), [relay.block]]  # asked again, once


async def test_a_block_damaged_on_every_attempt_fails_the_load_naming_it(cluster, make_model):
    folder = make_model("damaged_always", seed=12, **MODEL)
    relay = Damaging(folder, cluster.addresses[:1], cluster.secret, times=None)
    async with asyncio.timeout(60):
        with pytest.raises(RemoteError, match=rf"failed loading its shard: CacheError: block "
                                              rf"{block_name(0)} arrived damaged {BLOCK_RETRIES + 1} times"):
            async with relay:
                pass
    assert relay.block == 0 and relay.damaged == BLOCK_RETRIES + 1
    assert relay.needs[1:] == [[0]] * BLOCK_RETRIES
    async with asyncio.timeout(60), MeshEngine(folder, cluster.addresses[:1], cluster.secret) as engine:  # undamaged
        result = await engine.generate(PROMPT, PARAMS, chat=False)
    assert result.token_ids == await reference_ids(folder)
