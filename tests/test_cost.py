"""The cost model and the planner as pure functions: predictions recomputed by hand, the enumeration, and the
choices that budgets, slow links and unequal devices force."""

from __future__ import annotations

import pytest

from meshllm.cluster.cost import (
    HOP_S,
    JOB_S,
    ROUND_S,
    DeviceCost,
    Network,
    _partitions,
    candidates,
    choose,
    predict,
)
from meshllm.cluster.plan import DeviceSpec, block_bytes, make_plan, staged_plan
from meshllm.errors import PlanError
from meshllm.model.config import ModelConfig, RopeConfig

SMOL = ModelConfig(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                   vocab_size=49152, rms_norm_eps=1e-5, max_position_embeddings=2048, rope=RopeConfig(theta=1e5))
TINY = ModelConfig(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                   head_dim=64, vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=2048,
                   rope=RopeConfig(theta=1e4))
GB = 1e9


def same(n: int, bandwidth: float = 5 * GB, **kw) -> list[DeviceCost]:
    return [DeviceCost(f"d{i}", bandwidth, **kw) for i in range(n)]


def test_a_single_device_prediction_is_bytes_over_bandwidth_plus_fixed_costs():
    costs = [DeviceCost("a", 4 * GB, phase_s=300e-6)]
    net = Network((0.002,), ((0.0,),))
    plan = staged_plan(SMOL, [DeviceSpec("a")], "bfloat16", [[0]])
    p = predict(SMOL, plan, costs, net, [0], origin_s=0.001)
    a, m = block_bytes(SMOL, plan.shards[0], "bfloat16")
    compute = 30 * ((a + m) / (4 * GB) + 2 * 300e-6)
    assert p.compute_s == pytest.approx(compute)
    assert p.rounds_s == 0 and p.disk_s == 0
    assert p.hops_s == pytest.approx(0.002 + HOP_S)  # half the round trip there, half back
    assert p.token_s == pytest.approx(0.001 + compute + 0.002 + HOP_S)


def test_tensor_parallel_pays_two_rounds_a_layer_to_the_farthest_worker():
    costs = same(3, phase_s=100e-6)
    # row i: links device i opens; workers open theirs to the hub, so the hub's own row does not count
    pairs = ((0, 0.0001, 0.0001), (0.001, 0, 0.002), (0.004, 0.002, 0))
    net = Network((0.0005, 0.0005, 0.0005), pairs)
    plan = staged_plan(SMOL, [DeviceSpec(c.name, 5.0) for c in costs], "bfloat16", [[0, 1, 2]])
    assert plan.kind == "tp" and plan.hub == 0  # equal weights: the first name
    p = predict(SMOL, plan, costs, net, [0, 1, 2])
    assert p.rounds_s == pytest.approx(2 * 30 * (0.004 + ROUND_S + JOB_S))  # d2's link to hub 0 is the slowest
    per_layer = max((sum(block_bytes(SMOL, s, "bfloat16"))) / (5 * GB) + 2 * 100e-6 for s in plan.shards)
    assert p.compute_s == pytest.approx(30 * per_layer)


def test_a_device_over_its_budget_streams_the_rest_from_storage():
    plan = staged_plan(SMOL, [DeviceSpec("a")], "bfloat16", [[0]])
    held = plan.shard_bytes[0]
    costs = [DeviceCost("a", 5 * GB, budget=held // 4, read_rate=100e6)]
    p = predict(SMOL, plan, costs, Network((0.0,), ((0.0,),)), [0])
    assert p.disk_s == pytest.approx((held - held // 4) / 100e6 - p.compute_s)  # what compute does not hide
    assert p.token_s == pytest.approx(HOP_S + (held - held // 4) / 100e6)


def test_the_enumeration_covers_every_kind_once():
    assert sorted(map(len, _partitions([0, 1, 2, 3]))) == sorted([1] + [2] * 7 + [3] * 6 + [4])  # Bell(4) = 15
    cands = candidates(SMOL, "bfloat16", same(4), Network.uniform(4, 0.001))
    kinds = [c.kind for c in cands]
    # 4 singles; tp over the 2, 3, 4 strongest; pipelines over them; hybrids: 3 partitions of 3 devices, 13 of 4
    assert (kinds.count("single"), kinds.count("tp"), kinds.count("pipeline"), kinds.count("hybrid")) == (4, 3, 3, 16)
    assert len({(c.kind, c.stages) for c in cands}) == len(cands)
    times = [c.prediction.token_s for c in cands]
    assert times == sorted(times)  # fastest first


def test_a_budget_below_one_block_rules_out_the_single_device():
    full = max(block_bytes(TINY, make_plan(TINY, [DeviceSpec("x")], "bfloat16").shards[0], "bfloat16"))
    costs = same(2, budget=int(full * 0.75))  # half a layer's block fits, a whole one does not
    best, cands = choose(TINY, "bfloat16", costs, Network.uniform(2, 0.0002))
    singles = [c for c in cands if c.kind == "single"]
    assert singles and all(c.plan is None and "cannot hold" in c.refused for c in singles)
    assert best.kind == "tp"
    with pytest.raises(PlanError, match="no single plan fits these devices: single: d0: .*cannot hold"):
        choose(TINY, "bfloat16", costs, Network.uniform(2, 0.0002), kind="single")


def test_slow_links_between_two_fast_pairs_make_a_hybrid_win():
    # four devices that each hold only 30% of a TinyLlama-sized model: alone or in pairs they would stream the rest
    # from storage every token. d0-d1 and d2-d3 sit on fast links, the pairs 5 ms apart (and the originator 5 ms
    # from the second pair). Tensor parallelism over all four fits but pays 2L rounds of 5 ms; a pipeline of four
    # fits but computes every layer on one device at a time; two tensor-parallel pairs in a pipeline fit, halve
    # the compute, and cross the slow link once per token.
    fast, slow = 0.0002, 0.005
    total = staged_plan(TINY, [DeviceSpec("x")], "bfloat16", [[0]]).shard_bytes[0]
    pairs = tuple(tuple(0.0 if i == j else fast if i // 2 == j // 2 else slow for j in range(4)) for i in range(4))
    net = Network((fast, fast, slow, slow), pairs)
    costs = same(4, bandwidth=4 * GB, budget=int(0.3 * total), read_rate=200e6)
    best, cands = choose(TINY, "bfloat16", costs, net)
    assert best.kind == "hybrid" and best.stages in (((0, 1), (2, 3)), ((2, 3), (0, 1)))
    by_kind = {}
    for c in cands:
        by_kind.setdefault(c.kind, c)
    for kind in ("single", "tp", "pipeline"):
        assert by_kind[kind].prediction.token_s > best.prediction.token_s, kind
    assert by_kind["single"].prediction.disk_s > 0  # over its budget: it streams
    tp4 = next(c for c in cands if c.kind == "tp" and len(c.stages[0]) == 4)
    assert tp4.prediction.rounds_s >= 2 * 22 * slow and tp4.prediction.disk_s == 0
    # the same devices on uniformly fast links: tensor parallelism over all four
    best_fast, _ = choose(TINY, "bfloat16", costs, Network.uniform(4, fast))
    assert best_fast.kind == "tp" and len(best_fast.stages[0]) == 4


def test_unequal_devices_get_unequal_work():
    costs = [DeviceCost("weak", 1 * GB), DeviceCost("strong", 3 * GB)]
    net = Network.uniform(2, 0.0001)
    best, cands = choose(TINY, "bfloat16", costs, net, kind="single")
    assert best.plan.devices[0].name == "strong"
    pipe, _ = choose(TINY, "bfloat16", costs, net, kind="pipeline")
    layers = {pipe.plan.devices[r].name: len(pipe.plan.shards[r].layers(TINY)) for r in range(2)}
    assert layers == {"strong": 17, "weak": 5}  # 22 layers as 3:1 = 16.5:5.5, the tie to the first stage
    tp, _ = choose(TINY, "bfloat16", costs, net, kind="tp")
    heads = {tp.plan.devices[r].name: tp.plan.shards[r].num_q for r in range(2)}
    assert heads == {"strong": 24, "weak": 8}
    assert tp.plan.devices[tp.plan.hub].name == "strong"


@pytest.mark.parametrize("kind,n,message", [
    ("tp", 1, "a tp plan needs at least 2 devices, and 1 answered"),
    ("pipeline", 1, "a pipeline plan needs at least 2 devices"),
    ("hybrid", 2, "a hybrid plan needs at least 3 devices, and 2 answered"),
    ("ring", 2, "unknown plan kind 'ring'"),
])
def test_a_forced_kind_that_cannot_be_met_is_refused(kind, n, message):
    with pytest.raises(PlanError, match=message):
        choose(SMOL, "bfloat16", same(n), Network.uniform(n, 0.001), kind=kind)


def test_more_stages_than_layers_are_not_offered():
    small = ModelConfig(hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, vocab_size=100, rms_norm_eps=1e-5, max_position_embeddings=64,
                        rope=RopeConfig(theta=1e4))
    cands = candidates(small, "float32", same(4), Network.uniform(4, 0.001))
    assert all(len(c.stages) <= 2 for c in cands)
    with pytest.raises(PlanError, match="layers per stage"):
        staged_plan(small, [DeviceSpec("a"), DeviceSpec("b")], "float32", [[0], [1]], [2, 1])


def test_devices_on_one_machine_share_its_memory_and_cores():
    # two `join`s on one 2-core box: splitting a layer between them reads the same bytes through one memory bus
    net = Network.uniform(2, 0.0001)
    apart = [DeviceCost(f"d{i}", 4 * GB, phase_s=100e-6) for i in range(2)]
    together = [DeviceCost(f"d{i}", 4 * GB, phase_s=100e-6, host="box", threads=1, cores=2) for i in range(2)]
    plan = staged_plan(TINY, [DeviceSpec("d0", 4.0), DeviceSpec("d1", 4.0)], "bfloat16", [[0, 1]])
    full = sum(block_bytes(TINY, make_plan(TINY, [DeviceSpec("x")], "bfloat16").shards[0], "bfloat16"))
    p_apart = predict(TINY, plan, apart, net, [0, 1])
    p_together = predict(TINY, plan, together, net, [0, 1])
    half = max(sum(block_bytes(TINY, s, "bfloat16")) for s in plan.shards)
    assert p_apart.compute_s == pytest.approx(22 * (half / (4 * GB) + 2 * 100e-6))
    both = sum(sum(block_bytes(TINY, s, "bfloat16")) for s in plan.shards)  # kv rows replicated: a little over one
    assert both >= full and p_together.compute_s == pytest.approx(22 * (both / (4 * GB) + 2 * 100e-6))
    # four single-thread devices on two cores: the fixed time per phase doubles too
    four = [DeviceCost(f"d{i}", 4 * GB, phase_s=100e-6, host="box", threads=1, cores=2) for i in range(4)]
    plan4 = staged_plan(TINY, [DeviceSpec(f"d{i}", 4.0) for i in range(4)], "bfloat16", [[0, 1, 2, 3]])
    p4 = predict(TINY, plan4, four, Network.uniform(4, 0.0001), [0, 1, 2, 3])
    both4 = sum(sum(block_bytes(TINY, s, "bfloat16")) for s in plan4.shards)
    assert p4.compute_s == pytest.approx(22 * (both4 / (4 * GB) + 2 * 100e-6 * 2))
    # so on one machine the planner keeps the model on one device; on four machines it splits it
    assert choose(TINY, "bfloat16", four, Network.uniform(4, 0.0001))[0].kind == "single"
    apart4 = [DeviceCost(f"d{i}", 4 * GB, phase_s=100e-6) for i in range(4)]
    assert choose(TINY, "bfloat16", apart4, Network.uniform(4, 0.0001))[0].kind == "tp"
