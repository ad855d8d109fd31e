"""A device under a stream of mutated frames from a peer that knows the secret (an authenticated peer that errs):
each bad frame closes that link only, with a reason; the device never crashes, and serves a clean request after.
Seeded mutations of every message type a device takes; hypothesis properties of the pure validators."""

from __future__ import annotations

import asyncio
import random

import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.checkpoints import VARIANTS
from meshllm.errors import LinkError, ProtocolError
from meshllm.generation.sampling import SamplingParams
from meshllm.net.link import connect
from meshllm.runtime.launcher import LocalCluster
from meshllm.runtime.mesh import MeshEngine, local_secret
from meshllm.wire.connection import Connection
from meshllm.wire.frames import PROTOCOL_VERSION, check_tensor, decode_body, encode_frame, tensor_record

PROMPT = "fuzz me gently"
PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)
D = VARIANTS["gqa_tied"]["hidden_size"]


def _tensor(*shape):
    n = 4
    for s in shape:
        n *= s
    return tensor_record("float32", list(shape), bytes(n))


def templates(sid: str) -> list[dict]:
    """One well-formed message of every type a device takes."""
    return [
        {"t": "load", "session": sid, "model_hash": "abc", "config": {"hidden_size": D}, "dtype": "float32",
         "format": "dense", "shard": [0, 4, 0, 160, True], "rank": 0, "world": 1, "hub": 0},
        {"t": "begin", "session": sid, "req": 1, "capacity": 4},
        {"t": "step", "session": sid, "req": 1, "step": 1, "start": 0, "x": _tensor(1, 1, D)},
        {"t": "end", "session": sid, "req": 1},
        {"t": "abort", "session": sid, "req": 1, "reason": "x"},
        {"t": "slice", "session": sid, "block": 0, "offset": 0, "data": b"0123"},
        {"t": "stats", "session": sid},
        {"t": "ping", "nonce": 1},
        {"t": "attach", "session": sid, "rank": 1},
        {"t": "attached", "session": sid},
        {"t": "connect_hub", "session": sid, "hub": "127.0.0.1:9"},
        {"t": "part", "req": 1, "step": 1, "layer": 0, "phase": 0, "rank": 1, "x": _tensor(1, 1, D)},
        {"t": "sum", "req": 1, "step": 1, "layer": 0, "phase": 0, "x": _tensor(1, 1, D)},
        {"t": "result", "session": sid, "req": 1, "step": 1, "x": _tensor(1, 1, D)},
    ]


def junk(rnd: random.Random):
    return rnd.choice([
        None, True, -1, 0, 2**63, -(2**70), 1.5, float("inf"), "", "x" * rnd.randint(1, 300), b"", b"\x00" * 17,
        [], [1, "a"], [[[]]], {}, {"a": 1}, {"dtype": "float32", "shape": [1, 1, 1], "data": bytes(4)},
        {"dtype": "float64", "shape": [2], "data": bytes(16)}, {"dtype": "float32", "shape": [-1], "data": b""},
        _tensor(1, rnd.randint(0, 3), rnd.choice([1, D, D + 1])), [0, 4, 0, 160], [0, 4, 0, 160, True, 9],
        "../../etc", "127.0.0.1:1",
    ])


def mutate(msg: dict, rnd: random.Random) -> dict:
    msg = dict(msg)
    for _ in range(rnd.randint(1, 3)):
        op = rnd.random()
        fields = [k for k in msg if k != "t"] or ["t"]
        if op < 0.6:
            msg[rnd.choice(fields)] = junk(rnd)
        elif op < 0.75:
            msg.pop(rnd.choice(fields), None)
        elif op < 0.85:
            msg["t"] = rnd.choice(["hello", "auth", "error", "beat", "warp", "load", "part"])
        else:
            msg[rnd.choice(["extra", "keep", "kept", "sha256", "error"])] = junk(rnd)
    return msg


@pytest_asyncio.fixture
async def device(make_model):
    folder = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    secret = local_secret()
    async with LocalCluster(1, secret) as addresses:
        async with MeshEngine(folder, addresses, secret) as m:  # its slices cached on the device
            expected = (await m.generate(PROMPT, PARAMS, chat=False)).token_ids
        yield folder, addresses[0], secret, expected


async def fuzz(address: str, secret: bytes, frames: int, seed: int) -> dict:
    rnd = random.Random(seed)
    host, port = address.rsplit(":", 1)
    counts = {"sent": 0, "closed": 0}
    link = None
    while counts["sent"] < frames:
        if link is None or not link.is_open:
            if link is not None:
                counts["closed"] += 1
            link = await asyncio.wait_for(connect(host, int(port), secret, f"fuzz-{counts['sent']}"), 10)
            sid = f"s{counts['sent']}"
        burst = [mutate(rnd.choice(templates(sid)), rnd) for _ in range(rnd.randint(1, 4))]
        try:
            link.transport.write(b"".join(link.conn.encode(m) for m in burst))
        except (LinkError, ValueError, TypeError, OverflowError):
            continue  # not even encodable (msgpack refuses it): nothing was sent
        counts["sent"] += len(burst)
        await asyncio.sleep(0)
        if rnd.random() < 0.05:
            await asyncio.sleep(0.01)
    link.close()
    return counts


async def _fuzz_and_check(device, frames: int, seed: int) -> None:
    folder, address, secret, expected = device
    counts = await asyncio.wait_for(fuzz(address, secret, frames, seed), 600)
    assert counts["closed"] > frames // 20  # the bad frames did close links
    async with asyncio.timeout(60), MeshEngine(folder, [address], secret) as m:
        assert (await m.generate(PROMPT, PARAMS, chat=False)).token_ids == expected  # still serving, unchanged


async def test_a_device_survives_mutated_frames(device):
    await _fuzz_and_check(device, 400, seed=1)


@pytest.mark.slow
async def test_a_device_survives_ten_thousand_mutated_frames(device):
    await _fuzz_and_check(device, 10_000, seed=2)


# -- the pure validators, as properties -------------------------------------------------------------------------

_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
                       | st.binary(max_size=16),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                   max_size=4), max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_message_or_a_protocol_error(body):
    try:
        msg = decode_body(body)
    except ProtocolError:
        return
    assert isinstance(msg, dict) and isinstance(msg["t"], str)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_any_value_is_a_tensor_or_a_protocol_error(value):
    try:
        dtype, shape, data = check_tensor(value)
    except ProtocolError:
        return
    assert isinstance(data, bytes) and all(type(s) is int and s >= 0 for s in shape)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["version", "node", "nonce", "key", "ciphers", "info", "mac"]), _values))
def test_any_hello_or_auth_is_taken_or_refused_with_a_link_error(fields):
    c = Connection(b"fuzz secret", "alpha", b"A" * 32, initiator=False)
    c.start()
    for kind in ("hello", "auth"):
        try:
            c.receive_data(encode_frame({"t": kind, **fields}))
        except LinkError:
            assert c.state == "closed"
            return
    assert c.state in ("hello_sent", "auth_sent")


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32))
def test_a_hello_with_random_version_is_refused_unless_it_is_ours(version):
    c = Connection(b"fuzz secret", "alpha", b"A" * 32, initiator=False)
    c.start()
    hello = {"t": "hello", "version": version, "node": "beta", "nonce": b"B" * 32, "key": bytes(range(32)),
             "ciphers": ["chacha20-poly1305"]}
    try:
        c.receive_data(encode_frame(hello))
    except LinkError:
        assert version != PROTOCOL_VERSION or c.state == "closed"
        return
    assert version == PROTOCOL_VERSION
