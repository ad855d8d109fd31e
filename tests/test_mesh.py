"""N real device processes on loopback: greedy ids identical to one device and to transformers."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import pytest_asyncio
import torch

from helpers.checkpoints import VARIANTS
from helpers.wire import Relay, handshake_and_sealed
from meshllm.generation.sampling import SamplingParams
from meshllm.runtime.launcher import LocalCluster
from meshllm.runtime.local import LocalEngine
from meshllm.runtime.mesh import MeshEngine, local_secret

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = "the quick brown fox jumps over the lazy dog"
N_NEW = 24


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory):
    """Four `meshllm join` processes, shared by the module; each test uses the first N."""
    secret = local_secret()
    async with LocalCluster(4, secret, threads=1, log_dir=tmp_path_factory.mktemp("logs")) as addresses:
        yield addresses, secret


async def single_device(folder, n=N_NEW):
    async with LocalEngine(folder) as engine:
        result = await engine.generate(PROMPT, SamplingParams(max_tokens=n, ignore_eos=True), chat=False)
        ids = engine.encode_prompt(PROMPT, chat=False)
        return result.token_ids, await engine.score(ids), ids


def transformers_greedy(folder, ids, n=N_NEW):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    prompt = torch.tensor([ids])
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gc)[0, len(ids):].tolist()


CASES = [
    # (variant, N, split weights or None)
    ("gqa_tied", 1, None),
    ("gqa_tied", 2, None),
    ("gqa_tied", 3, None),  # 3 devices, 2 kv heads: kv projections replicated
    ("gqa_tied", 4, None),  # one q head each
    ("gqa_tied", 2, [3, 1]),  # uneven
    ("llama3_rope", 3, [1, 2, 1]),
    ("odd_sizes", 4, [2, 1, 1, 1]),  # biases, odd widths, MHA
    ("mha_untied", 2, None),
]


@pytest.mark.parametrize("variant,n,weights", CASES, ids=[f"{v}-N{n}-{w or 'even'}" for v, n, w in CASES])
async def test_mesh_matches_single_device_and_transformers(make_model, cluster, variant, n, weights):
    addresses, secret = cluster
    folder = make_model(variant, **VARIANTS[variant])
    expected, expected_logits, prompt_ids = await single_device(folder)
    assert expected == transformers_greedy(folder, prompt_ids)
    async with MeshEngine(folder, addresses[:n], secret, weights=weights) as mesh:
        assert mesh.plan.world == n
        result = await mesh.generate(PROMPT, SamplingParams(max_tokens=N_NEW, ignore_eos=True), chat=False)
        assert result.token_ids == expected
        logits = await mesh.score(prompt_ids)
        err = (logits - expected_logits).abs().max().item()
        assert err <= 1e-4 * expected_logits.abs().max().item(), err
        # the JSON report names every device with its role and share
        devices = await mesh.devices()
        assert [d["role"] for d in devices].count("originator") == 1
        assert [d["role"] for d in devices].count("hub") == 1
        shares = [d["share"] for d in devices[1:]]
        assert all(s > 0 for s in shares) and sum(shares) >= 0.999  # above 1 where kv heads are replicated


async def test_second_request_and_stream_on_the_same_mesh(make_model, cluster):
    addresses, secret = cluster
    folder = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    expected, _, _ = await single_device(folder, 12)
    async with MeshEngine(folder, addresses[:3], secret) as mesh:
        pieces = [p async for p in mesh.stream(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True), chat=False)]
        again = await mesh.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True), chat=False)
        assert again.token_ids == expected
        assert "".join(pieces) == again.text


async def test_a_prefill_larger_than_half_a_frame_goes_as_several_steps(make_model, cluster):
    """The originator cuts a prefill whose hidden states exceed half its frame limit into steps of whole tokens;
    the KV caches make the result exact."""
    addresses, secret = cluster
    folder = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    long_prompt = " ".join([PROMPT] * 4)
    async with LocalEngine(folder) as engine:
        expected = await engine.generate(long_prompt, SamplingParams(max_tokens=8, ignore_eos=True), chat=False)
    per_token = 64 * 4  # hidden size 64, fp32
    # room for 10 tokens of hidden state in half a frame
    async with MeshEngine(folder, addresses[:2], secret, max_frame=20 * per_token) as mesh:
        prompt_ids = mesh.encode_prompt(long_prompt, chat=False)
        assert len(prompt_ids) > 30
        result = await mesh.generate(long_prompt, SamplingParams(max_tokens=8, ignore_eos=True), chat=False)
        assert result.token_ids == expected.token_ids
        # one step per 10 prompt tokens, then one per generated token after the first
        assert mesh.step == -(-len(prompt_ids) // 10) + 7


async def test_prompt_text_and_token_ids_never_leave_the_originator(make_model, cluster):
    addresses, secret = cluster
    folder = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    secret_prompt = "zebra quantum marmalade"
    taps = [Relay(a) for a in addresses[:3]]
    tapped = [await t.__aenter__() for t in taps]
    try:
        async with MeshEngine(folder, tapped, secret) as mesh:
            ids = mesh.encode_prompt(secret_prompt, chat=False)
            result = await mesh.generate(secret_prompt, SamplingParams(max_tokens=8, ignore_eos=True), chat=False)
    finally:
        for t in taps:
            await t.__aexit__()
    await asyncio.sleep(0.2)
    streams = [bytes(s) for t in taps for s in t.seen.values()]
    assert sum(map(len, streams)) > 10_000  # the taps saw the traffic (steps, parts, sums)
    everything = b"".join(streams)
    for word in secret_prompt.split():
        assert word.encode() not in everything
    sealed = 0
    for stream in streams:
        # in the clear: only the handshake; every later frame is sealed (the links' own tests open them)
        clear, rest = handshake_and_sealed(stream)
        assert [f["t"] for f in clear] == ["hello", "auth"]
        assert all(len(body) >= 16 for body in rest)
        sealed += len(rest)
    assert sealed > 50  # steps, parts, sums, results
    # the id sequences, as any integer encoding, are absent too
    for seq in (ids, result.token_ids):
        for dtype in (torch.int64, torch.int32):
            assert torch.tensor(seq, dtype=dtype).numpy().tobytes() not in everything
        assert msgpack.packb(seq) not in everything
