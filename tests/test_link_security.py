"""Sealed links against an attacker on the path, with real device processes and real sockets.

A relay between the originator and a device records, alters, replays or reorders frames; a stranger connects and
takes what the handshake gives anyone. The references are the primitives themselves (hashlib.scrypt, HKDF, HMAC)
and the model's own embedding table read with safetensors.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time

import pytest
import pytest_asyncio
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from safetensors.torch import load_file

from helpers.checkpoints import VARIANTS
from helpers.devices import pid_listening_on
from helpers.wire import Relay, frame_bodies, handshake_and_sealed
from meshllm.discovery.records import mesh_id
from meshllm.errors import LinkError
from meshllm.generation.sampling import SamplingParams
from meshllm.net.link import connect
from meshllm.runtime.launcher import LocalCluster
from meshllm.runtime.mesh import MeshEngine, local_secret
from meshllm.wire.frames import PROTOCOL_VERSION, FrameDecoder, encode_frame, tensor_record

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = "My bank PIN is 4921 and my password is hunter2"
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(make_model):
    folder = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    secret = local_secret()
    async with LocalCluster(2, secret) as addresses:
        async with MeshEngine(folder, addresses, secret) as m:
            expected = (await m.generate(PROMPT, PARAMS, chat=False)).token_ids
        yield folder, addresses, secret, expected


async def run_through(folder, address: str, secret: bytes, relay: Relay):
    async with asyncio.timeout(60), relay as tapped, MeshEngine(folder, [tapped], secret) as m:
        return (await m.generate(PROMPT, PARAMS, chat=False)).token_ids


def embedding_rows(folder, ids: list[int]) -> list[bytes]:
    """The exact bytes of each prompt token's embedding row, as fp32 and as bf16."""
    weights = load_file(str(folder / "model.safetensors"))
    table = weights["model.embed_tokens.weight"]
    out = []
    for i in ids:
        row = table[i].contiguous()
        out += [row.float().numpy().tobytes(), row.to(torch.bfloat16).view(torch.int16).numpy().tobytes()]
    return out


async def test_a_tap_finds_no_embedding_row_of_the_prompt(mesh):
    folder, addresses, secret, expected = mesh
    taps = [Relay(a) for a in addresses]
    async with asyncio.timeout(60):
        tapped = [await t.__aenter__() for t in taps]
        try:
            async with MeshEngine(folder, tapped, secret) as m:
                ids = m.encode_prompt(PROMPT, chat=False)
                result = await m.generate(PROMPT, PARAMS, chat=False)
        finally:
            for t in taps:
                await t.__aexit__()
    assert result.token_ids == expected  # the relays passed everything on
    rows = embedding_rows(folder, ids)
    # control: the search finds the rows where a step's hidden states travel in the clear (protocol 4's frames)
    clear = encode_frame({"t": "step", "session": "s", "req": 1, "step": 0, "start": 0,
                          "x": tensor_record("float32", [1, len(ids), 64],
                                             b"".join(rows[0::2]))})
    assert all(r in clear for r in rows[0::2])
    captured = b"".join(bytes(b) for t in taps for b in t.seen.values())
    assert len(captured) > 20_000
    for r in rows:
        assert r not in captured
    assert b"4921" not in captured and b"hunter2" not in captured
    for t in taps:
        for direction in ("up", "down"):
            clear_frames, sealed = handshake_and_sealed(bytes(t.seen[direction]))
            assert [f["t"] for f in clear_frames] == ["hello", "auth"] and len(sealed) >= 2


@pytest.mark.parametrize("direction", ["down", pytest.param("up", marks=pytest.mark.slow)])
async def test_one_flipped_byte_fails_the_request_with_an_integrity_error(mesh, direction):
    folder, addresses, secret, expected = mesh
    flipped = []

    def flip(d, n, frame):
        if d == direction and n == 6 and not flipped:  # a sealed frame in the middle of the request
            frame = bytearray(frame)
            frame[len(frame) // 2] ^= 0x20
            flipped.append(n)
        return [bytes(frame)]

    with pytest.raises(LinkError, match="failed its integrity check") as e:
        await run_through(folder, addresses[0], secret, Relay(addresses[0], flip))
    assert flipped
    assert "altered, replayed, reordered or dropped" in str(e.value)
    assert await run_through(folder, addresses[0], secret, Relay(addresses[0])) == expected  # still serving


@pytest.mark.parametrize("trick", ["replay", pytest.param("reorder", marks=pytest.mark.slow),
                                   pytest.param("drop", marks=pytest.mark.slow)])
async def test_a_replayed_reordered_or_dropped_frame_closes_the_link(mesh, trick):
    folder, addresses, secret, expected = mesh
    held: list[bytes] = []

    def edit(d, n, frame):
        if d != "up" or n < 4:
            return [frame]
        if trick == "replay" and n == 4:
            return [frame, frame]
        if trick == "reorder" and n == 4:
            held.append(frame)
            return []
        if trick == "reorder" and n == 5:
            return [frame, *held]
        if trick == "drop" and n == 4:
            return []
        return [frame]

    with pytest.raises(LinkError, match="integrity") as e:
        await run_through(folder, addresses[0], secret, Relay(addresses[0], edit))
    assert "failed its integrity check" in str(e.value)


async def test_a_stranger_can_test_a_guess_no_faster_than_the_kdf(mesh):
    """Everything a stranger gets without the secret: a device's hello and its proof (connect, say hello), and
    the mesh id its TXT record shows. Each is a function of the scrypt-stretched key, so checking a guessed secret
    against them costs one scrypt: measured here against scrypt alone, and against the HMAC protocol 4 exposed."""
    _, addresses, secret, _ = mesh
    host, port = addresses[0].rsplit(":", 1)
    ours = X25519PrivateKey.generate()
    pub, nonce = ours.public_key().public_bytes_raw(), os.urandom(32)
    offer = ["chacha20-poly1305"]
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(encode_frame({"t": "hello", "version": PROTOCOL_VERSION, "node": "stranger", "nonce": nonce,
                               "key": pub, "ciphers": offer, "info": {}}))
    data = b""
    while len(frame_bodies(data)) < 2:
        data += await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    hello, auth = FrameDecoder().feed(data)[:2]
    assert auth["t"] == "auth" and set(hello) == {"t", "version", "node", "nonce", "key", "ciphers", "info"}
    shared = ours.exchange(X25519PublicKey.from_public_bytes(hello["key"]))
    fields = [nonce, hello["nonce"], b"stranger", hello["node"].encode(), pub, hello["key"], b"chacha20-poly1305",
              ",".join(hello["ciphers"]).encode()]
    context = b"".join(len(f).to_bytes(4, "big") + f for f in fields)

    def kdf(guess: bytes) -> bytes:
        return hashlib.scrypt(guess, salt=b"meshllm mesh key v1", n=2**15, r=8, p=1, maxmem=2**26, dklen=32)

    def matches_handshake(guess: bytes) -> bool:
        okm = HKDF(algorithm=SHA256(), length=96, salt=kdf(guess), info=b"meshllm link keys v1" + context)
        return hmac.compare_digest(hmac.new(okm.derive(shared)[:32], b"responder", hashlib.sha256).digest(),
                                   auth["mac"])

    def matches_mesh_id(guess: bytes) -> bool:
        return hmac.new(kdf(guess), b"meshllm mesh id v2", hashlib.sha256).digest()[:8].hex() == mesh_id(secret)

    assert matches_handshake(secret) and matches_mesh_id(secret)  # what the stranger got is what we said
    assert not matches_handshake(b"sunshine") and not matches_mesh_id(b"sunshine")

    def rate(check, n: int) -> float:
        t0 = time.process_time()  # this process's CPU time: other load on the machine does not count
        for i in range(n):
            check(b"guess %d" % i)
        return n / (time.process_time() - t0)

    kdf_rate = max(rate(kdf, 4) for _ in range(2))
    handshake_rate = max(rate(matches_handshake, 4) for _ in range(2))
    id_rate = max(rate(matches_mesh_id, 4) for _ in range(2))
    old_rate = rate(lambda g: hmac.new(g, context, hashlib.sha256).digest(), 20_000)  # protocol 4's oracle
    print(f"guesses/s: scrypt {kdf_rate:.1f}, against the handshake {handshake_rate:.1f}, against the mesh id "
          f"{id_rate:.1f}; protocol 4's HMAC of the secret {old_rate:.0f}")
    assert handshake_rate < kdf_rate * 1.5 and id_rate < kdf_rate * 1.5
    assert old_rate > 1000 * handshake_rate


FLOODED = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))
sys.argv = ["meshllm", *sys.argv[1:]]
runpy.run_module("meshllm", run_name="__main__")
"""


async def test_a_connection_flood_at_a_low_descriptor_limit_leaves_a_request_served(make_model, tmp_path):
    """A device limited to 160 descriptors; 300 idle connections from one address (127.0.0.2) that never say
    hello, held open. A request from another address (127.0.0.1) is served meanwhile; the flood is refused at
    once past 8 pending connections, and logged once."""
    import socket
    import sys

    folder = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    secret = local_secret()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FLOODED, "join", "--host", "127.0.0.1", "--port", "0", "--no-advertise", "--name",
        "flooded", "--threads", "1", "--cache-dir", str(tmp_path), "--verbose",
        env={**os.environ, "MESHLLM_SECRET": secret.decode()}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    flood: list[socket.socket] = []
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        address = line.split()[-1]
        host, port = address.rsplit(":", 1)
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            s.bind(("127.0.0.2", 0))
            s.connect_ex((host, int(port)))
            flood.append(s)
            if len(flood) % 50 == 0:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        async with asyncio.timeout(60), MeshEngine(folder, [address], secret) as m:
            result = await m.generate(PROMPT, PARAMS, chat=False)
        assert len(result.token_ids) == PARAMS.max_tokens
        reset = 0
        for s in flood:
            try:
                reset += s.recv(1) == b""
            except ConnectionResetError:
                reset += 1
            except BlockingIOError:
                pass  # still open: one of the 8 pending (until the handshake timeout)
        assert reset >= 280
    finally:
        for s in flood:
            s.close()
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    log = err.decode()
    assert log.count("refusing connections from 127.0.0.2") == 1, log[-3000:]
    assert "(limits: 8 per address, 64 in all)" in log and "file descriptors open" in log



async def test_two_apps_on_the_same_devices_hold_one_copy_of_the_weights(make_model):
    """Two originators (two apps) load the same model on the same two devices: the second session shares the
    first one's blocks, so no device's memory grows by anything like its share of the weights."""
    folder = make_model("wide_shared", hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    secret = local_secret()
    async with asyncio.timeout(120), LocalCluster(2, secret) as addresses:
        async with MeshEngine(folder, addresses, secret) as first:
            ids = (await first.generate(PROMPT, PARAMS, chat=False)).token_ids
            one = {d["id"]: d for d in await first.devices() if d["role"] != "originator"}
            async with MeshEngine(folder, addresses, secret) as second:
                assert (await second.generate(PROMPT, PARAMS, chat=False)).token_ids == ids
                two = {d["id"]: d for d in await second.devices() if d["role"] != "originator"}
            assert (await first.generate(PROMPT, PARAMS, chat=False)).token_ids == ids  # the first goes on
    assert one.keys() == two.keys() and len(one) == 2
    for node, d in one.items():
        assert d["weight_bytes"] > 8 << 20  # a share big enough to see twice
        grew = two[node]["rss_bytes"] - d["rss_bytes"]
        assert grew < d["weight_bytes"] // 4, (node, grew, d["weight_bytes"])


async def test_a_msgpack_bomb_is_refused_without_the_device_growing(mesh):
    """An authenticated peer sends frames that would unpack into hundreds of millions of objects (an array of 8M
    empty arrays is 8 MB on the wire and over 450 MB in Python): each is refused on its container counts, the
    link closes with the reason, and the device's memory grows by no more than the frame itself."""
    folder, addresses, secret, expected = mesh
    host, port = addresses[0].rsplit(":", 1)
    pid = pid_listening_on(addresses[0])

    def rss() -> int:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    n = 8 << 20
    bombs = [
        b"\x82\xa1t\xa4ping\xa5nonce" + b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n,  # [[], [], ...]
        b"\x82\xa1t\xa4ping\xa5nonce" + b"\xdd" + (1 << 16).to_bytes(4, "big")
        + (b"\xdd" + (1 << 7).to_bytes(4, "big") + b"\xc0" * (1 << 7)) * (1 << 16),  # 65536 arrays of 128 nils
    ]
    before = rss()
    for bomb in bombs:
        link = await asyncio.wait_for(connect(host, int(port), secret, "bomber"), 10)
        link.write_frame(link.conn.frame(bomb))
        await asyncio.wait_for(asyncio.shield(link.closed), 30)
        assert "frame" in str(link.error) and ("unpack limit" in str(link.error) or "more than" in str(link.error))
    grew = rss() - before
    assert grew < 2 * n + (32 << 20), f"the device grew by {grew >> 20} MiB"
    assert await run_through(folder, addresses[0], secret, Relay(addresses[0])) == expected  # still serving
