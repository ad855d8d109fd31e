"""The single-device engine against transformers: greedy ids identical, fp32 logits within 1e-4 relative."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.checkpoints import VARIANTS
from helpers.reference import N_NEW, PROMPTS, assert_close_rel, hf_greedy, hf_model, ours_greedy
from meshllm.model.shard import Shard
from meshllm.runtime.local import LocalEngine


@pytest.mark.parametrize("variant", sorted(VARIANTS))
async def test_greedy_ids_match_transformers(make_model, variant):
    folder = make_model(variant, **VARIANTS[variant])
    ref = hf_model(folder)
    async with LocalEngine(folder) as engine:
        for ids in PROMPTS:
            ids = [i % engine.config.vocab_size for i in ids]
            expected = hf_greedy(ref, ids, N_NEW)
            assert len(expected) == N_NEW
            assert await ours_greedy(engine, ids, N_NEW) == expected


@pytest.mark.parametrize("variant", sorted(VARIANTS))
async def test_logits_match_transformers(make_model, variant):
    """Prefill logits at every position, then decode-step logits through the KV cache."""
    folder = make_model(variant, **VARIANTS[variant])
    ref = hf_model(folder)
    ids = [1, 17, 230, 45, 99, 311, 8, 140, 12, 200]
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0]
    async with LocalEngine(folder) as engine:
        engine.worker.begin(len(ids))
        prefill = engine.forward_sync(ids[:6], 0, all_logits=True)
        assert_close_rel(prefill, ref_logits[:6])
        for pos in range(6, len(ids)):
            step = engine.forward_sync([ids[pos]], pos)
            assert_close_rel(step[-1], ref_logits[pos])
        # a multi-token chunk after a cached prefix goes through the explicit causal mask
        engine.worker.begin(len(ids))
        engine.forward_sync(ids[:4], 0)
        chunk = engine.forward_sync(ids[4:], 4, all_logits=True)
        assert_close_rel(chunk, ref_logits[4:])


async def test_kv_caches_grow_past_the_capacity_a_request_began_with(make_model):
    """A cache begun too small grows (by doubling) and keeps every position: logits as transformers' at each step."""
    folder = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    ref = hf_model(folder)
    ids = [1, 17, 230, 45, 99, 311, 8, 140, 12, 200, 3, 77]
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0]
    async with LocalEngine(folder) as engine:
        engine.worker.begin(2)
        assert_close_rel(engine.forward_sync(ids[:5], 0, all_logits=True), ref_logits[:5])  # 2 -> 5
        for pos in range(5, len(ids)):  # 5 -> 10 -> 20, one position at a time
            assert_close_rel(engine.forward_sync([ids[pos]], pos)[-1], ref_logits[pos])
        assert engine.worker.caches[0].k.shape[2] == 20


async def test_sharded_checkpoint_and_transformers4_config(make_model):
    """A checkpoint split over several safetensors files with an index, and old-style rope keys."""
    folder = make_model("sharded_legacy", shard_size="60KB", legacy_config=True, **VARIANTS["llama3_rope"])
    assert len(list(folder.glob("*.safetensors"))) > 1
    raw = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" not in raw and raw["rope_scaling"]["rope_type"] == "llama3"
    ref = hf_model(folder)
    async with LocalEngine(folder) as engine:
        assert engine.config.rope.rope_type == "llama3"
        assert await ours_greedy(engine, PROMPTS[0], 24) == hf_greedy(ref, PROMPTS[0], 24)


def test_partials_over_uneven_shards_sum_to_the_whole(make_model):
    """attn_partial / mlp_partial over a split (inside a kv group, uneven MLP) sum to the full layer."""
    from meshllm.model.loader import load_head
    from meshllm.model.layers import embed, logits
    from meshllm.model.source import open_model
    from meshllm.runtime.worker import ShardWorker

    folder = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    src = open_model(folder)
    head = load_head(src, torch.float32)
    c = src.config
    splits = [
        [Shard.full(c)],
        [Shard(0, 1, 0, 7, True), Shard(1, 3, 7, 100, False), Shard(3, 4, 100, c.intermediate_size, False)],
        [Shard(0, 0, 0, 160, True), Shard(0, 4, 160, 160, False)],  # one device holds no heads, one no MLP
    ]
    ids = torch.tensor([[1, 5, 90, 200, 33]])
    results = []
    with torch.no_grad():
        for shards in splits:
            workers = [ShardWorker.load(src, s, torch.float32) for s in shards]
            for w in workers:
                w.begin(8)
            x = embed(head, ids, torch.float32)
            for layer in range(c.num_layers):
                x = x + sum(w.attn(layer, x, 0) for w in workers)
                x = x + sum(w.mlp(layer, x) for w in workers)
            results.append(logits(head, x)[0])
    ref = hf_model(folder)
    with torch.no_grad():
        expected = ref(ids).logits[0]
    for r in results:
        assert_close_rel(r, expected)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("variant", ["gqa_tied", "odd_sizes"])
async def test_half_precision_decodes_like_transformers_in_the_same_dtype(make_model, variant, dtype):
    """bf16 and fp16 against transformers run in the same dtype, through a whole decode (KV cache, every step)."""
    from transformers import AutoModelForCausalLM

    folder = make_model(variant, **VARIANTS[variant])
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    async with LocalEngine(folder, dtype=dtype) as engine:
        assert engine.dtype == getattr(torch, dtype)
        for ids in PROMPTS:
            ids = [i % engine.config.vocab_size for i in ids]
            expected = hf_greedy(ref, ids, N_NEW)
            ours = await ours_greedy(engine, ids, N_NEW)
            assert ours == expected
            with torch.no_grad():
                ref_logits = ref(torch.tensor([ids + ours[:-1]])).logits[0, len(ids) - 1:].float()
            engine.worker.begin(len(ids) + N_NEW)
            steps = [engine.forward_sync(ids, 0)[-1]] + [engine.forward_sync([t], len(ids) + i)[-1]
                                                          for i, t in enumerate(ours[:-1])]
            assert_close_rel(torch.stack(steps), ref_logits, rel=0.03)
