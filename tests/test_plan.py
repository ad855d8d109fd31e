"""make_plan and elect_hub: exact tiling, proportional shares, kv replication, clear refusals, determinism."""

from __future__ import annotations

import dataclasses
import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.cluster.plan import (
    FILE_SLACK,
    PROCESS_BYTES,
    DeviceSpec,
    Plan,
    block_bytes,
    elect_hub,
    head_bytes,
    human_bytes,
    layer_bytes,
    local_memory_need,
    Sizes,
    make_plan,
    mlp_alignment,
)
from meshllm.errors import PlanError
from meshllm.model.config import ModelConfig, RopeConfig
from meshllm.model.loader import DTYPES, load_attn_block, load_head, load_mlp_block
from meshllm.model.shard import Shard


def config(heads: int, kv: int, inter: int, hidden: int = 256, head_dim: int = 16, layers: int = 2) -> ModelConfig:
    c = ModelConfig(hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
                    num_kv_heads=kv, head_dim=head_dim, vocab_size=1000, rms_norm_eps=1e-5,
                    max_position_embeddings=256, rope=RopeConfig(theta=10000.0))
    c.validate("test")
    return c


LLAMA = config(32, 8, 5632)  # TinyLlama-shaped
NINE = config(9, 3, 96)
FIVE = config(5, 5, 173)  # no alignment divides 173: the last shard takes the remainder
CONFIGS = [LLAMA, NINE, FIVE]
IDS = ["32h8kv", "9h3kv", "5h5kv"]


def devices(*weights: float, budgets: tuple[int | None, ...] | None = None) -> list[DeviceSpec]:
    budgets = budgets or (None,) * len(weights)
    return [DeviceSpec(f"dev{i}", w, b) for i, (w, b) in enumerate(zip(weights, budgets))]


def assert_tiles(plan: Plan, c: ModelConfig) -> None:
    q = m = 0
    for s in plan.shards:
        assert s.q_start == q and s.q_stop > s.q_start  # contiguous, rank order, at least one head
        assert s.mlp_start == m and s.mlp_stop >= s.mlp_start
        s.check(c)
        q, m = s.q_stop, s.mlp_stop
    assert (q, m) == (c.num_heads, c.intermediate_size)


WEIGHTS = [(1,), (1, 1), (3, 1), (1, 3), (1, 1, 1), (2, 1, 1), (1, 2, 3, 4, 5), (1,) * 5]


@pytest.mark.parametrize("c", CONFIGS, ids=IDS)
@pytest.mark.parametrize("weights", WEIGHTS, ids=str)
def test_shards_tile_heads_and_columns_exactly(c, weights):
    plan = make_plan(c, devices(*weights), "float32")
    assert plan.world == len(weights)
    assert_tiles(plan, c)
    assert [s.owns_bias for s in plan.shards].count(True) == 1
    assert plan.shard_bytes == tuple(layer_bytes(c, s, "float32") for s in plan.shards)


def test_single_device_gets_everything():
    plan = make_plan(LLAMA, devices(1), "bfloat16")
    assert plan.shards == (Shard.full(LLAMA),)
    assert plan.share(0, LLAMA) == 1.0
    assert plan.hub == 0


@pytest.mark.parametrize("c", CONFIGS, ids=IDS)
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_equal_weights_equal_shares(c, n):
    plan = make_plan(c, devices(*[1.0] * n), "float32")
    heads = [s.num_q for s in plan.shards]
    cols = [s.num_mlp for s in plan.shards]
    unit = mlp_alignment(c, n)
    assert max(heads) - min(heads) <= 1
    assert max(cols) - min(cols) <= unit
    assert all(col % unit == 0 for col in cols[:-1])  # only the last shard takes a sub-unit remainder


def test_equal_weights_exact_when_divisible():
    plan = make_plan(LLAMA, devices(1, 1, 1, 1), "float32")
    assert [(s.q_start, s.q_stop) for s in plan.shards] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert [(s.mlp_start, s.mlp_stop) for s in plan.shards] == [(0, 1408), (1408, 2816), (2816, 4224),
                                                                (4224, 5632)]


def test_weight_scale_does_not_matter():
    for c in CONFIGS:
        assert make_plan(c, devices(3, 1), "float32").shards == make_plan(c, devices(0.75, 0.25), "float32").shards


@pytest.mark.parametrize("c", CONFIGS, ids=IDS)
@pytest.mark.parametrize("weights", [(3, 1), (1, 3), (2, 1, 1), (1, 2, 3, 4, 5)], ids=str)
def test_uneven_weights_proportional_shares(c, weights):
    if len(weights) > c.num_heads:
        pytest.skip("more devices than heads")
    plan = make_plan(c, devices(*weights), "float32")
    total = sum(weights)
    unit = mlp_alignment(c, len(weights))
    for s, w in zip(plan.shards, weights):
        assert abs(s.num_q - c.num_heads * w / total) <= 1
        assert abs(s.num_mlp - c.intermediate_size * w / total) <= unit


def test_uneven_weights_exact_split():
    plan = make_plan(LLAMA, devices(3, 1), "float32")
    assert [s.num_q for s in plan.shards] == [24, 8]
    assert [s.num_mlp for s in plan.shards] == [4224, 1408]
    assert plan.share(0, LLAMA) > plan.share(1, LLAMA)


def test_heads_proportional_when_the_minimum_does_not_bind():
    plan = make_plan(LLAMA, devices(1, 1, 1, 5), "float32")
    for s, w in zip(plan.shards, (1, 1, 1, 5)):
        assert abs(s.num_q - 32 * w / 8) <= 1


@pytest.mark.parametrize(("c", "n"), [(LLAMA, 16), (LLAMA, 12), (LLAMA, 32), (NINE, 4), (NINE, 5), (NINE, 9),
                                      (FIVE, 3), (FIVE, 5), (config(8, 1, 64), 8), (config(6, 2, 64), 4)])
def test_more_devices_than_kv_heads_replicates_kv(c, n):
    plan = make_plan(c, devices(*[1] * n), "float32")
    assert_tiles(plan, c)
    users: dict[int, int] = {}
    for s in plan.shards:
        needed = {q // c.kv_group for q in range(s.q_start, s.q_stop)}
        kv0, kv1 = s.kv_range(c)
        assert set(range(kv0, kv1)) == needed  # exactly the kv heads its q heads read
        for kv in needed:
            users[kv] = users.get(kv, 0) + 1
    assert sorted(users) == list(range(c.num_kv_heads))  # every kv head is computed somewhere
    if n > c.num_kv_heads:
        assert max(users.values()) > 1  # some kv head is replicated


def test_kv_range_of_a_shard_straddling_groups():
    c = NINE  # kv_group 3
    assert Shard(2, 4, 0, 0).kv_range(c) == (0, 2)
    assert Shard(3, 6, 0, 0).kv_range(c) == (1, 2)
    assert Shard(5, 7, 0, 0).kv_range(c) == (1, 3)
    assert Shard(4, 4, 0, 0).kv_range(c) == (0, 0)


@pytest.mark.parametrize(("c", "n"), [(NINE, 10), (FIVE, 6), (LLAMA, 33)])
def test_more_devices_than_heads(c, n):
    with pytest.raises(PlanError, match=rf"{n} devices but the model has only {c.num_heads} attention heads.*"
                                        rf"use at most {c.num_heads} devices"):
        make_plan(c, devices(*[1] * n), "float32")


def test_no_devices():
    with pytest.raises(PlanError, match="^no devices to plan over$"):
        make_plan(NINE, [], "float32")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_non_positive_weight(bad):
    with pytest.raises(PlanError, match=rf"^every device's capability weight must be a positive finite number, got "
                                        rf"dev0=1, dev1={bad}$"):
        make_plan(NINE, devices(1, bad), "float32")


def largest_remainder(total: int, weights) -> list[int]:
    """Hamilton's method, exactly: each part the floor of its quota, then one more to the largest remainders
    (ties to the lower rank)."""
    quotas = [total * Fraction(w) / sum(map(Fraction, weights)) for w in weights]
    counts = [math.floor(q) for q in quotas]
    for i in sorted(range(len(weights)), key=lambda i: (counts[i] - quotas[i], i))[: total - sum(counts)]:
        counts[i] += 1
    return counts


@pytest.mark.parametrize("c", CONFIGS, ids=IDS)
@pytest.mark.parametrize("weights", [(1, 1.5, 1), (4, 2, 1), (1, 2, 4), (3, 5, 7, 11), (2, 3), (1, 1000),
                                     (1, 4, 7), (1, 1, 7), (1, 1, 3, 7)], ids=str)
def test_shares_are_apportioned_by_largest_remainder(c, weights):
    """Equal remainders tie to the lower rank exactly: (1, 4, 7) over 32 heads leaves 2/3 to each, and (1, 1, 7)
    must give its two equal devices equal columns, however floats would round the quotas."""
    if len(weights) > c.num_heads:
        pytest.skip("more devices than heads")
    plan = make_plan(c, devices(*weights), "float32")
    unit = mlp_alignment(c, len(weights))
    cols = [n * unit for n in largest_remainder(c.intermediate_size // unit, weights)]
    cols[-1] += c.intermediate_size % unit  # the last shard takes the remainder below a unit
    assert [s.num_mlp for s in plan.shards] == cols
    if all(c.num_heads * w / sum(weights) >= 1 for w in weights):  # the one-head minimum does not bind
        assert [s.num_q for s in plan.shards] == largest_remainder(c.num_heads, weights)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 100_000).map(lambda m: m / 1000), min_size=1, max_size=9))
def test_columns_follow_largest_remainder_for_any_advertised_scores(scores):
    """Scores travel with three decimals."""
    c = config(9, 3, 186)
    plan = make_plan(c, devices(*scores), "float32")
    unit = mlp_alignment(c, len(scores))
    cols = [n * unit for n in largest_remainder(c.intermediate_size // unit, scores)]
    cols[-1] += c.intermediate_size % unit
    assert [s.num_mlp for s in plan.shards] == cols


def test_a_device_too_weak_for_a_unit_of_columns_gets_one_head_and_no_columns():
    plan = make_plan(NINE, devices(1, 1000), "float32")
    assert [(s.num_q, s.num_mlp) for s in plan.shards] == [(1, 0), (8, 96)]


@pytest.mark.parametrize(("inter", "world", "unit"), [
    (256, 2, 64), (255, 2, 32), (128, 2, 32), (127, 2, 16), (64, 2, 16), (63, 2, 8), (32, 2, 8), (31, 2, 1),
    (384, 3, 64), (383, 3, 32), (5632, 1, 64), (15, 1, 1), (16, 1, 8),
])
def test_mlp_alignment_is_the_widest_unit_giving_every_device_two(inter, world, unit):
    # the widest of 64, 32, 16, 8 columns with at least two units per device; single columns otherwise
    assert mlp_alignment(config(4, 2, inter), world) == unit


def llama_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a Hugging Face Llama checkpoint (transformers' LlamaForCausalLM): per layer, then the head."""
    d, i, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {"input_layernorm.weight": (d,), "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
            "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q), "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (d,),
            "post_attention_layernorm.weight": (d,), "mlp.gate_proj.weight": (i, d), "mlp.up_proj.weight": (i, d),
            "mlp.down_proj.weight": (d, i), "mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,),
            "mlp.down_proj.bias": (d,), "model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,),
            "lm_head.weight": (c.vocab_size, d)}


class MetaCheckpoint:
    """A checkpoint of that layout without data (meta tensors): the loader slices it as it would a real one."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.shapes = llama_shapes(config)

    def get(self, name: str, rows=None, cols=None) -> torch.Tensor:
        key = name if name.startswith(("model.embed", "model.norm", "lm_head")) else name.split(".", 3)[3]
        t = torch.empty(self.shapes[key], device="meta")
        if rows is not None:
            t = t[rows[0]:rows[1]]
        if cols is not None:
            t = t[:, cols[0]:cols[1]]
        return t


BIASED = dataclasses.replace(NINE, attention_bias=True, mlp_bias=True)


@pytest.mark.parametrize("c", [*CONFIGS, BIASED], ids=[*IDS, "9h3kv-bias"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_block_and_layer_bytes_are_what_the_loader_holds(c, dtype):
    src = MetaCheckpoint(c)
    for weights in [(1,), (3, 1), (1, 1000), (1, 2, 3, 4, 5)]:
        plan = make_plan(c, devices(*weights), dtype)
        assert plan.sizes == Sizes(dtype)
        for s, planned in zip(plan.shards, plan.shard_bytes):
            attn = load_attn_block(src, 0, s, DTYPES[dtype]).nbytes()
            mlp = load_mlp_block(src, 0, s, DTYPES[dtype]).nbytes()
            assert block_bytes(c, s, dtype) == (attn + FILE_SLACK, mlp + FILE_SLACK)
            assert layer_bytes(c, s, dtype) == planned == c.num_layers * (attn + mlp)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_bytes_are_what_the_loader_holds(tied, dtype):
    c = dataclasses.replace(NINE, tie_word_embeddings=tied)
    assert head_bytes(c, dtype) == load_head(MetaCheckpoint(c), DTYPES[dtype]).nbytes()


def test_local_memory_need_is_every_process_its_weights_and_the_head():
    c, dtype = NINE, "bfloat16"
    src = MetaCheckpoint(c)
    head = load_head(src, DTYPES[dtype]).nbytes()
    for n in (1, 3):
        shards = make_plan(c, devices(*[1] * n), dtype).shards
        held = [c.num_layers * (load_attn_block(src, 0, s, DTYPES[dtype]).nbytes()
                                + load_mlp_block(src, 0, s, DTYPES[dtype]).nbytes()) for s in shards]
        # n device processes and this originator, each device's weights, the originator's head
        assert local_memory_need(c, n, dtype) == (n + 1) * PROCESS_BYTES + sum(held) + head
        assert local_memory_need(c, n, dtype, budget=max(held)) == (n + 1) * PROCESS_BYTES + sum(held) + head
        block = max(max(block_bytes(c, s, dtype)) for s in shards)
        assert block < min(held)
        assert local_memory_need(c, n, dtype, budget=block) == (n + 1) * PROCESS_BYTES + n * block + head
        with pytest.raises(PlanError, match="^device local-0's memory budget"):
            local_memory_need(c, n, dtype, budget=block - 1)
    with pytest.raises(PlanError, match="10 devices but the model has only 9 attention heads"):
        local_memory_need(c, 10, dtype)


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (10 * 2**20, "10.0 MiB"),
    (2**30 - 2**20, "1023.0 MiB"), (2**30, "1.0 GiB"), (3 * 2**40, "3072.0 GiB"),
])
def test_human_bytes_uses_binary_prefixes(n, text):
    # IEC 80000-13: KiB = 1024 B, MiB = 1024 KiB, GiB = 1024 MiB; whole bytes, one decimal above; GiB is the largest
    assert human_bytes(n) == text


def test_budget_below_one_block_is_refused_naming_the_smallest_that_works():
    big = config(32, 8, 5632, hidden=2048, head_dim=64, layers=2)
    shards = make_plan(big, devices(1, 1), "float32").shards
    smallest = max(block_bytes(big, shards[1], "float32"))
    assert smallest < layer_bytes(big, shards[1], "float32")  # a block is far less than the share
    specs = [DeviceSpec("laptop", 1.0, None), DeviceSpec("pi-zero", 1.0, smallest - 1)]
    with pytest.raises(PlanError, match=r"device pi-zero's memory budget of .* cannot hold even one block .* "
                                        rf"the smallest budget that works is {smallest / 2**20:.1f} MiB"):
        make_plan(big, specs, "float32")
    # a budget of exactly one block works (the scheduler streams the rest); bf16 halves the bytes
    ok = [DeviceSpec("laptop", 1.0, None), DeviceSpec("pi-zero", 1.0, smallest)]
    assert make_plan(big, ok, "float32").world == 2
    half = max(block_bytes(big, shards[1], "bfloat16"))
    assert half < smallest
    assert make_plan(big, specs[:1] + [DeviceSpec("pi-zero", 1.0, half)], "bfloat16").world == 2


def test_exactly_one_shard_owns_bias():
    for c in CONFIGS:
        for n in range(1, c.num_heads + 1):
            owners = [s.owns_bias for s in make_plan(c, devices(*range(1, n + 1)), "float32").shards]
            assert owners.count(True) == 1


@pytest.mark.parametrize("c", CONFIGS, ids=IDS)
def test_plan_is_deterministic(c):
    specs = devices(2.5, 1, 1.5)
    first = make_plan(c, specs, "bfloat16")
    again = make_plan(c, list(specs), "bfloat16")
    copied = make_plan(ModelConfig.from_dict(c.to_dict()), [DeviceSpec(d.name, d.weight, d.budget_bytes)
                                                            for d in specs], "bfloat16")
    assert first == again == copied
    assert specs == devices(2.5, 1, 1.5)  # the input is not touched


def test_plan_follows_the_device_order():
    # ranks are the order given; the same multiset of weights in another order moves the shares with the devices
    a = make_plan(LLAMA, devices(3, 1), "float32")
    b = make_plan(LLAMA, [DeviceSpec("dev1", 1), DeviceSpec("dev0", 3)], "float32")
    assert [s.num_q for s in a.shards] == [24, 8]
    assert [s.num_q for s in b.shards][::-1] in ([24, 8], [23, 9])
    assert a.devices[a.hub].name == b.devices[b.hub].name == "dev0"


def test_hub_is_elected_or_given():
    specs = [DeviceSpec("b", 1.0), DeviceSpec("a", 4.0), DeviceSpec("c", 2.0)]
    assert make_plan(NINE, specs, "float32").hub == 1
    assert make_plan(NINE, specs, "float32", hub=2).hub == 2


def test_elect_hub_highest_weight():
    assert elect_hub([DeviceSpec("a", 1.0), DeviceSpec("z", 3.0), DeviceSpec("m", 2.0)]) == 1


def test_elect_hub_every_permutation_same_device():
    specs = [DeviceSpec("delta", 2.0), DeviceSpec("bravo", 2.0), DeviceSpec("alpha", 1.5), DeviceSpec("charlie", 2.0)]
    chosen = {p[elect_hub(p)].name for p in itertools.permutations(specs)}
    assert chosen == {"bravo"}  # highest weight; among the tied, the smallest name


def test_elect_hub_all_tied():
    specs = [DeviceSpec(n, 1.0) for n in ("node-3", "node-10", "node-2", "node-1")]
    assert {p[elect_hub(p)].name for p in itertools.permutations(specs)} == {"node-1"}
