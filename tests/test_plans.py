"""Plans of every kind on real device processes: single device, tensor parallel, pipeline and hybrid give the greedy
ids of one process holding the model; the planner's choice and forced kinds; re-planning between kinds."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
import torch

from helpers.checkpoints import VARIANTS
from meshllm.generation.sampling import SamplingParams
from meshllm.runtime.launcher import LocalCluster
from meshllm.runtime.local import LocalEngine
from meshllm.runtime.mesh import MeshEngine, local_secret

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = "the quick brown fox jumps over the lazy dog"
N_NEW = 12
DEEP = {**VARIANTS["gqa_tied"], "num_hidden_layers": 6}  # enough layers for four stages


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory):
    secret = local_secret()
    async with LocalCluster(4, secret, threads=1, log_dir=tmp_path_factory.mktemp("logs")) as addresses:
        yield addresses, secret


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def deep(make_model):
    folder = make_model("gqa_tied_deep", **DEEP)
    async with LocalEngine(folder) as engine:
        result = await engine.generate(PROMPT, SamplingParams(max_tokens=N_NEW, ignore_eos=True), chat=False)
    return folder, result.token_ids


PARAMS = SamplingParams(max_tokens=N_NEW, ignore_eos=True)

LAYOUTS = [
    # (stages of device indices, layers per stage or None for the planner's split), kind
    ([[0]], None, "single"),
    ([[0, 1]], None, "tp"),
    ([[0], [1]], None, "pipeline"),
    ([[0], [1]], [5, 1], "pipeline"),  # uneven stages
    ([[0], [1], [2]], [1, 3, 2], "pipeline"),
    ([[0], [1], [2], [3]], None, "pipeline"),
    ([[0, 1], [2]], [2, 4], "hybrid"),
    ([[0], [1, 2, 3]], None, "hybrid"),
    ([[0, 1], [2, 3]], [3, 3], "hybrid"),
]


@pytest.mark.parametrize("stages,layers,kind", LAYOUTS, ids=[f"{k}-{s}-{l}" for s, l, k in LAYOUTS])
async def test_every_layout_gives_the_single_process_ids(cluster, deep, stages, layers, kind):
    addresses, secret = cluster
    folder, expected = deep
    n = max(i for st in stages for i in st) + 1
    async with MeshEngine(folder, addresses[:n], secret, layout=(stages, layers)) as mesh:
        assert mesh.plan.kind == kind
        first = [mesh.plan.shards[r].layer_start for r, _ in mesh.plan.groups for r in [r[0]]]
        assert first == sorted(first) and first[0] == 0
        for _ in range(2):  # a second request on the same plan (KV caches, steps, stages reset)
            result = await mesh.generate(PROMPT, PARAMS, chat=False)
            assert result.token_ids == expected
        devices = await mesh.devices()
        layer_ranges = sorted({tuple(d["layers"]) for d in devices[1:]})
        covered = [i for a, b in layer_ranges for i in range(a, b)]
        assert covered == list(range(DEEP["num_hidden_layers"]))  # every layer once across the stages
        assert sum(d["role"] == "hub" for d in devices[1:]) == len(stages)


@pytest.mark.parametrize("kind", ["auto", "single", "tp", "pipeline", "hybrid"])
async def test_forced_kinds_and_auto(cluster, deep, kind):
    addresses, secret = cluster
    folder, expected = deep
    async with MeshEngine(folder, addresses[:4], secret, plan=kind) as mesh:
        if kind != "auto":
            assert mesh.plan.kind == kind
        assert mesh.chosen.plan is mesh.plan and mesh.candidates[0] is mesh.chosen or kind != "auto"
        # the network measured: a round trip to every device and between them, all on loopback
        assert len(mesh.network.origin) == 4 and all(0 < t < 0.5 for t in mesh.network.origin)
        assert len(mesh.members) + len(mesh.idle) == 4
        result = await mesh.generate(PROMPT, PARAMS, chat=False)
        assert result.token_ids == expected


async def test_replan_between_kinds(cluster, deep):
    addresses, secret = cluster
    folder, expected = deep
    async with MeshEngine(folder, addresses[:3], secret, plan="pipeline") as mesh:
        seen = []
        for kind in ("pipeline", "tp", "hybrid", "single", "pipeline"):
            mesh.plan_kind = kind
            await mesh.replan(addresses[:3])
            seen.append(mesh.plan.kind)
            result = await mesh.generate(PROMPT, PARAMS, chat=False)
            assert result.token_ids == expected, kind
        assert seen == ["pipeline", "tp", "hybrid", "single", "pipeline"]


async def test_a_kind_that_needs_more_devices_is_refused_before_loading(cluster, deep):
    from meshllm.errors import PlanError

    addresses, secret = cluster
    folder, _ = deep
    with pytest.raises(PlanError, match="hybrid plan needs at least 3 devices, and 2 answered"):
        async with MeshEngine(folder, addresses[:2], secret, plan="hybrid"):
            pass


async def test_a_pipeline_stage_under_a_memory_budget_streams_and_keeps_the_ids(deep, tmp_path):
    """Both stages of a pipeline hold a window of their blocks (a budget of a few blocks): each streams its layers
    from its slice cache every token, prefetching while the other stage computes, and the ids do not change."""
    from meshllm.cluster.plan import DeviceSpec, block_bytes, staged_plan

    folder, expected = deep
    secret = local_secret()
    async with LocalCluster(2, secret, threads=1, log_dir=tmp_path, memory_budget=BUDGET) as addresses:
        async with MeshEngine(folder, addresses, secret, layout=([[0], [1]], [4, 2])) as mesh:
            config = mesh.config
            plan = staged_plan(config, [DeviceSpec("a"), DeviceSpec("b")], mesh.sizes, [[0], [1]], [4, 2])
            assert all(max(block_bytes(config, s, mesh.sizes)) < BUDGET < b for s, b in
                       zip(plan.shards, plan.shard_bytes))  # a block fits, the stage's share does not
            for _ in range(2):
                result = await mesh.generate(PROMPT, PARAMS, chat=False)
                assert result.token_ids == expected
            devices = await mesh.devices()
            for d in devices[1:]:
                assert d["disk_read_bytes"] > d["weight_bytes"]  # streamed again each token, not held
                assert d["resident_weight_bytes"] <= BUDGET


BUDGET = 300 * 1024  # bytes: the largest block of the deep test model is 136 KiB, the smaller stage 337 KiB


@pytest.mark.slow
async def test_mesh_replans_from_tensor_parallel_to_one_device_when_one_leaves(deep, tmp_path):
    """`Mesh(plan="tp")` over two discovered devices; one leaves between requests: the next request runs on a new
    plan of another kind (tensor parallelism needs two: the planner's choice, said once) with the same ids."""
    from helpers.devices import LOOPBACK, join_all

    from meshllm import Mesh

    folder, expected = deep
    secret = "replan-" + tmp_path.name
    devices = await join_all([("r-1", secret, 1.0), ("r-2", secret, 2.0)], tmp_path)
    try:
        async with Mesh(folder, secret=secret, min_devices=2, timeout=20, interface=LOOPBACK, plan="tp") as m:
            kinds = [m.plan.kind]
            first = await m.generate(PROMPT, max_tokens=N_NEW, ignore_eos=True, chat=False)
            await devices[0].stop()  # a clean leave: its link closes, its record goes
            second = await m.generate(PROMPT, max_tokens=N_NEW, ignore_eos=True, chat=False)
            kinds.append(m.plan.kind)
            assert first.token_ids == second.token_ids == expected
            assert kinds == ["tp", "single"] and [d["node_id"] for d in m.devices] == ["r-2"]
    finally:
        await asyncio.gather(*(d.stop() for d in devices))


async def test_a_result_from_the_wrong_stage_hub_is_a_protocol_error(deep):
    """A step's result must come from the hub of the stage the step went to: any other member's (an erring or
    hostile device of another stage) breaks the protocol on that link, and the step keeps waiting for its hub."""
    from types import SimpleNamespace

    from meshllm.errors import ProtocolError
    from meshllm.runtime.tensors import to_record

    folder, _ = deep
    mesh = MeshEngine(folder, ["127.0.0.1:9"], b"secret-unused-here")  # not entered: only its message handling
    mesh.req, mesh.step = 1, 2
    hub, other = SimpleNamespace(peer="stage-1-hub"), SimpleNamespace(peer="stage-0-hub")
    key = ("result", (1, 2))
    fut = asyncio.get_running_loop().create_future()
    mesh._pending[key], mesh._result_from[key] = fut, hub
    msg = {"t": "result", "session": mesh.session, "req": 1, "step": 2, "x": to_record(torch.zeros(1, 1, 64))}
    with pytest.raises(ProtocolError, match="from stage-0-hub, which is not the hub of the stage"):
        mesh._on_message(other, msg)
    assert not fut.done()
    mesh._on_message(hub, msg)
    assert fut.done() and fut.result() is msg
