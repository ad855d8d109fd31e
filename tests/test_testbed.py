"""The LAN testbed: 4 network namespaces on a bridge, `join` in each, discovery and generation from the host side,
and nothing left behind. Runs where root and `ip netns` work; skipped with the reason otherwise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers.checkpoints import VARIANTS

from meshllm import Mesh
from meshllm.runtime.local import LocalEngine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from lan_testbed import Testbed, unusable  # noqa: E402

REASON = unusable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"LAN testbed: {REASON}")


@pytest.mark.slow
async def test_four_namespaces_discover_generate_and_leave_nothing_behind(make_model, tmp_path):
    from meshllm import SamplingParams

    model = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    async with LocalEngine(model) as engine:
        reference = await engine.generate("the quick brown fox", SamplingParams(max_tokens=10, ignore_eos=True),
                                          chat=False)
    secret = "testbed-" + tmp_path.name
    tb = Testbed(4, secret, scores=[2.0, 5.0, 3.0, 1.0], log_dir=tmp_path / "tb", rtt_ms=1.0)
    async with tb:
        assert len(tb.devices) == 4
        # tensor parallelism forced: on a tiny model the planner's pick among equal devices is any one of them
        async with Mesh(model, secret=secret, min_devices=4, timeout=20, interface=tb.host_ip, plan="tp") as m:
            assert sorted(d["addresses"][0] for d in m.devices) == sorted(tb.ips)
            assert [d["node_id"] for d in m.devices if d["role"] == "hub"] == ["ns1"]  # the highest score
            out = await m.generate("the quick brown fox", max_tokens=10, ignore_eos=True, chat=False)
            assert out.token_ids == reference.token_ids
    assert tb.leftovers() == []
    for i in range(4):
        log = (tmp_path / "tb" / f"ns{i}.log").read_text()
        assert "stopping" in log and "Traceback" not in log


@pytest.mark.slow
async def test_on_five_ms_links_the_planner_leaves_tensor_parallelism(make_model, tmp_path):
    """Three namespaces behind 5 ms links: the planner's choice is not tensor parallelism (2L rounds of 5 ms a
    token), it decodes faster than tensor parallelism over the same devices measures, and the ids are the same."""
    from meshllm import SamplingParams

    model = make_model("gqa_tied_deep", **{**VARIANTS["gqa_tied"], "num_hidden_layers": 6})
    async with LocalEngine(model) as engine:
        reference = await engine.generate("the quick brown fox", SamplingParams(max_tokens=12, ignore_eos=True),
                                          chat=False)
    secret = "testbed-plan-" + tmp_path.name
    async with Testbed(3, secret, log_dir=tmp_path / "tb", rtt_ms=5.0) as tb:
        runs = {}
        for kind in ("auto", "tp"):
            async with Mesh(model, secret=secret, min_devices=3, timeout=20, interface=tb.host_ip,
                            plan=kind) as m:
                runs[kind] = (m.plan.kind, await m.generate("the quick brown fox", max_tokens=12, ignore_eos=True,
                                                            chat=False), m._engine.chosen)
        (auto_kind, auto, chosen), (_, tp, _) = runs["auto"], runs["tp"]
        assert auto_kind != "tp" and chosen.prediction.rounds_s == 0
        assert auto.token_ids == tp.token_ids == reference.token_ids
        # 2 x 6 layers x 5 ms of rounds a token against at most a hop or two: not close
        assert auto.token_latency_s < tp.token_latency_s / 2, (auto.token_latency_s, tp.token_latency_s)
