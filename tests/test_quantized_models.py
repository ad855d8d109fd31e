"""A Hugging Face test checkpoint quantized when its slices are cut (`--quantize int4`, `int8`): perplexity next to
transformers in fp32 on the same text, greedy ids the same on 1, 2 and 3 devices, slices that hold packed bytes,
a memory budget over packed blocks, and formats a shape cannot take."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from helpers.reference import NEAR_TIE, top2_margins
from meshllm.discovery.probe import proc_kib
from meshllm.generation.sampling import SamplingParams
from meshllm.runtime.launcher import LocalCluster
from meshllm.runtime.local import LocalEngine
from meshllm.model.weights import Format
from meshllm.runtime.mesh import MeshEngine, local_secret

pytestmark = pytest.mark.asyncio(loop_scope="module")

# head_dim 32 and an MLP of 384: whole int4 groups of 32 on every split of 1, 2 or 3 devices
MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
TEXT = (Path(__file__).parent / "data" / "paragraph.txt").read_text().strip()
PROMPT = "the quick brown fox jumps over the lazy dog"
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(make_model):
    return make_model("quant128", **MODEL)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory):
    secret = local_secret()
    async with LocalCluster(3, secret, threads=1, log_dir=tmp_path_factory.mktemp("logs"),
                            cache_dir=tmp_path_factory.mktemp("cache")) as addresses:
        yield addresses, secret


def transformers_perplexity(folder, ids: list[int]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return math.exp(float(nll))


@pytest.mark.parametrize("fmt, tolerance", [("int4", 0.05), ("int4:64", 0.05), ("int8", 0.01), ("none", 1e-4)])
async def test_quantized_perplexity_is_close_to_transformers_in_fp32(folder, fmt, tolerance):
    async with LocalEngine(folder, quantize=fmt) as engine:
        ids = engine.encode_prompt(TEXT, chat=False)
        ours = math.exp(-sum(lp := await engine.token_logprobs(ids)) / len(lp))
        spec = engine.worker.attn_blocks[0].wqkv.spec
    reference = transformers_perplexity(folder, ids)
    print(f"{fmt}: perplexity {ours:.3f}, transformers fp32 {reference:.3f} ({ours / reference - 1:+.2%})")
    assert spec == {"int4": "int4:32", "int4:64": "int4:64", "int8": "int8", "none": "dense"}[fmt]
    assert abs(ours / reference - 1) <= tolerance


@pytest.mark.parametrize("fmt", ["int4", "int8"])
async def test_quantized_greedy_ids_are_the_same_on_1_2_and_3_devices(folder, cluster, fmt):
    """The same ids on every split, up to a genuine near-tie. The kernels return bf16: one device rounds each
    output of a matrix once, several devices round their partial sums each, so a step whose two likeliest logits
    are closer than that rounding can go either way (bit-identical ids across splits cannot be had from these
    kernels); a split that gets the math wrong diverges at a clear margin, or at once."""
    addresses, secret = cluster
    async with LocalEngine(folder, quantize=fmt) as engine:
        prompt_ids = engine.encode_prompt(PROMPT, chat=False)
        expected = (await engine.generate(PROMPT, PARAMS, chat=False)).token_ids
        margin = top2_margins(engine, prompt_ids, expected)
        one = await engine.score(prompt_ids)
    for n in (2, 3):
        async with MeshEngine(folder, addresses[:n], secret, quantize=fmt) as mesh:
            got = (await mesh.generate(PROMPT, PARAMS, chat=False)).token_ids
            split = await mesh.score(prompt_ids)
            assert {d["weight_format"] for d in await mesh.devices()} == {str(Format.parse(fmt))}
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        print(f"{fmt} N={n}: first divergence {first}, margin there {margin[first] if first is not None else '-'}")
        assert first is None or margin[first] < NEAR_TIE, (n, first, margin[first])
        assert float((split - one).norm() / one.norm()) < 3e-2  # the same logits, to bf16 rounding (a wrong split: ~1)


async def test_slices_hold_packed_bytes_and_a_budget_bounds_memory_over_them(folder, tmp_path):
    """int4 slice files are about a quarter of fp32's, and a device under a budget of a quarter of its packed
    share gives the same ids while its real peak RSS stays within idle + budget + a small allowance."""
    secret = local_secret()
    cache = tmp_path / "cache"
    sizes = {}
    for fmt in ("none", "int4"):
        async with LocalCluster(1, secret, threads=1, cache_dir=cache) as addresses, \
                MeshEngine(folder, addresses, secret, quantize=fmt) as mesh:
            expected = (await mesh.generate(PROMPT, PARAMS, chat=False)).token_ids
            sizes[fmt] = (await mesh.devices())[1]["weight_bytes"]
    files = {fmt: sum(p.stat().st_size for p in cache.rglob("*.safetensors") if (fmt in str(p))) for fmt in
             ("float32-dense", "float32-int4g32")}
    assert files["float32-int4g32"] < files["float32-dense"] / 4 * 1.3  # 4.5 bits a weight, plus file headers
    assert sizes["int4"] < sizes["none"] / 4 * 1.3
    budget = int(sizes["int4"] * 0.35)  # a third of the share: above its largest block (this model has 6)
    cluster = LocalCluster(1, secret, threads=1, cache_dir=cache, memory_budget=budget)
    async with cluster as addresses:
        status = f"/proc/{cluster.procs[0].pid}/status"
        idle = proc_kib(status, "VmRSS")
        async with MeshEngine(folder, addresses, secret, quantize="int4") as mesh:
            assert (await mesh.generate(PROMPT, PARAMS, chat=False)).token_ids == expected
            (device,) = (await mesh.devices())[1:]
        peak = proc_kib(status, "VmHWM")
    assert device["disk_read_bytes"] > 0 and device["resident_weight_bytes"] <= budget  # it streamed
    assert peak - idle <= budget + 48 * 2**20


async def test_a_shape_the_int4_kernel_cannot_take_stays_dense_and_says_so(make_model, caplog):
    """odd sizes: a head_dim of 18 and an MLP of 173 columns are not whole groups of 32: those matrices stay dense
    (in bf16, the quantized formats' activations) and the log says which; the output still matches fp32 closely."""
    import logging

    from helpers.checkpoints import VARIANTS

    folder = make_model("odd_sizes", **VARIANTS["odd_sizes"])
    with caplog.at_level(logging.INFO, logger="meshllm.model"):
        async with LocalEngine(folder, quantize="int4") as engine:
            blk = engine.worker.mlp_blocks[0]
            assert blk.w2.spec == "dense" and blk.w2.dtype == torch.bfloat16
            ours = await engine.score(engine.encode_prompt(PROMPT, chat=False))
    said = " ".join(r.message for r in caplog.records)
    assert "kept dense" in said and "groups of 32" in said
    async with LocalEngine(folder, quantize="none") as engine:
        ref = await engine.score(engine.encode_prompt(PROMPT, chat=False))
    assert float((ours - ref).norm() / ref.norm()) < 0.05


async def test_an_unknown_quantize_is_a_one_line_error(capsys):
    from meshllm import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--prompt", "x", "--quantize", "int3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.splitlines() == [
        "meshllm generate: error: argument --quantize: 'int3': choose none, int8, int4, int4:64, int4:128 or gguf "
        "(see `meshllm generate --help`)"]
