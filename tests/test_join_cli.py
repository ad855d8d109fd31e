"""`join`, `status`, `generate` and the examples as a user runs them on a LAN: real processes, mDNS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
from helpers.checkpoints import VARIANTS
from helpers.devices import LOOPBACK, join, join_all

from meshllm.cli import _print_plans
from meshllm.discovery.mdns import Browser
from meshllm.runtime.local import LocalEngine

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def run(*args: str, env: dict | None = None, timeout: float = 240) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def test_sigterm_says_goodbye_closes_and_exits_cleanly(tmp_path):
    secret = "bye-" + tmp_path.name
    async with Browser(LOOPBACK) as b:
        d = await join("leaver", secret, tmp_path, score=2.0)
        for _ in range(100):
            if any(r.node_id == "leaver" for r in b.peers.values()):
                break
            await b.changed(0.1)
        assert any(r.node_id == "leaver" for r in b.peers.values())
        assert await d.stop() == 0
        for _ in range(50):  # the mDNS goodbye removes it at once, not when its record expires
            if not any(r.node_id == "leaver" for r in b.peers.values()):
                break
            await b.changed(0.1)
        assert not any(r.node_id == "leaver" for r in b.peers.values())
    log = d.log.read_text()
    assert "stopping" in log and "Traceback" not in log


@pytest.mark.slow
async def test_status_lists_devices_meshes_hub_and_round_trips(tmp_path):
    ours, theirs = "status-a-" + tmp_path.name, "status-b-" + tmp_path.name
    devices = await join_all([("st-1", ours, 3.0), ("st-2", ours, 7.0), ("st-x", theirs, 9.0)], tmp_path)
    try:
        code, out, err = await run("-m", "meshllm", "status", "--interface", LOOPBACK, "--timeout", "1.5",
                                   "--json", env={"MESHLLM_SECRET": ours})
        assert code == 0, err
        got = {d["node_id"]: d for d in json.loads(out)["devices"]}
        assert got["st-1"]["group"] == got["st-2"]["group"] == "ours" and got["st-x"]["group"] == "another mesh"
        assert got["st-2"]["would_be_hub"] and not got["st-1"]["would_be_hub"]
        assert got["st-1"]["rtt_kind"] == "authenticated ping" and got["st-x"]["rtt_kind"] == "tcp connect"
        assert all(d["rtt_s"] is not None for d in got.values())
        assert got["st-1"]["cores"] >= 1 and got["st-1"]["memory_bytes"] > 0 and got["st-1"]["disk_bytes"] > 0
        code, out, err = await run("-m", "meshllm", "status", "--interface", LOOPBACK, "--timeout", "1.5",
                                   env={"MESHLLM_SECRET": ours})
        assert code == 0 and "st-2" in out and "another mesh" in out, err
    finally:
        await asyncio.gather(*(d.stop() for d in devices))


async def reference(make_model):
    """The test checkpoint and its greedy answer from one process holding it."""
    from meshllm import SamplingParams

    model = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    async with LocalEngine(model) as engine:
        return model, await engine.generate("the quick brown fox", SamplingParams(max_tokens=8, ignore_eos=True),
                                            chat=False)


async def test_generate_without_devices_discovers_the_mesh(make_model, tmp_path):
    model, ref = await reference(make_model)
    secret = "cli-" + tmp_path.name
    devices = await join_all([("g-1", secret, 1.0), ("g-2", secret, 2.0)], tmp_path)
    try:
        code, out, err = await run("-m", "meshllm", "generate", "--model", str(model), "--raw", "--prompt",
                                   "the quick brown fox", "--max-tokens", "8", "--ignore-eos", "--json",
                                   "--interface", LOOPBACK, "--min-devices", "2", "--plan", "tp",
                                   env={"MESHLLM_SECRET": secret})
        assert code == 0, err
        result = json.loads(out)
        assert result["token_ids"] == ref.token_ids
        assert sorted(d["id"] for d in result["devices"][1:]) == ["g-1", "g-2"]
        assert [d["id"] for d in result["devices"] if d["role"] == "hub"] == ["g-2"]
        plan = result["plan"]  # the forced kind, its prediction next to this run's measurement
        assert plan["kind"] == "tp" and plan["measured"]["token_ms"] > 0 and plan["predicted"]["token_ms"] > 0
        assert [c["kind"] for c in plan["candidates"]] == ["tp"]  # forced: tensor parallel over both, nothing else
    finally:
        await asyncio.gather(*(d.stop() for d in devices))


async def test_status_plan_lists_the_candidates_and_generate_runs_the_winner(make_model, tmp_path):
    model, ref = await reference(make_model)
    secret = "plan-" + tmp_path.name
    devices = await join_all([("p-1", secret, 1.0), ("p-2", secret, 3.0), ("p-3", secret, 2.0)], tmp_path)
    env = {"MESHLLM_SECRET": secret}
    try:
        code, out, err = await run("-m", "meshllm", "status", "--interface", LOOPBACK, "--timeout", "1.5", "--plan",
                                   "--model", str(model), "--json", env=env)
        assert code == 0, err
        plan = json.loads(out)["plan"]
        kinds = [c["kind"] for c in plan["candidates"]]
        # 3 singles, tp and pipelines over the 2 and 3 strongest, 3 hybrids of 3
        assert sorted(kinds) == sorted(["single"] * 3 + ["tp"] * 2 + ["pipeline"] * 2 + ["hybrid"] * 3), kinds
        times = [c["predicted"]["token_ms"] for c in plan["candidates"]]
        assert times == sorted(times) and plan["chosen"] == plan["candidates"][0]["describe"]
        assert sorted(plan["network"]["devices"]) == ["p-1", "p-2", "p-3"]
        assert all(0 < t < 500 for t in plan["network"]["origin_rtt_ms"])
        assert len(plan["why"]) == len(set(kinds)) - 1  # the winner against the best of each other kind
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            _print_plans(plan)  # what `status --plan` prints without --json
        assert f"chosen: {plan['chosen']}" in text.getvalue() and text.getvalue().count("\n*") == 1
        code, out, err = await run("-m", "meshllm", "generate", "--model", str(model), "--raw", "--prompt",
                                   "the quick brown fox", "--max-tokens", "8", "--ignore-eos", "--json",
                                   "--interface", LOOPBACK, "--min-devices", "3", env=env)
        assert code == 0, err
        result = json.loads(out)
        assert result["token_ids"] == ref.token_ids
        assert result["plan"]["kind"] == plan["candidates"][0]["kind"]  # same devices, same links: same choice
    finally:
        await asyncio.gather(*(d.stop() for d in devices))


async def test_join_refuses_bad_input_with_a_clear_error(tmp_path):
    code, _, err = await run("-m", "meshllm", "join", "--name", "bad name", env={"MESHLLM_SECRET": "x"})
    assert code == 1 and "--name 'bad name'" in err and "Traceback" not in err
    code, _, err = await run("-m", "meshllm", "join", "--interface", "203.0.113.77", "--port", "0", "--score", "1",
                             env={"MESHLLM_SECRET": "x"})
    assert code == 1 and "cannot listen on 203.0.113.77" in err and "Traceback" not in err
    env = {k: v for k, v in os.environ.items() if k != "MESHLLM_SECRET"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "meshllm", "join", env=env,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and b"no mesh secret" in err


async def _stream_example_reference(model) -> str:
    """What examples/mesh_stream.py must print: the same request (sampled, seeded) on this device alone."""
    from meshllm import SamplingParams

    async with LocalEngine(model, quantize="none") as engine:
        result = await engine.generate("Write a haiku about a small computer.",
                                       SamplingParams(max_tokens=96, temperature=0.7, seed=1))
    return result.text


@pytest.mark.parametrize("example, check", [  # the stream example (checked against one device) in the default run
    pytest.param("mesh_generate.py", lambda out, ref: "Paris" in out, marks=pytest.mark.slow),
    ("mesh_stream.py", lambda out, ref: out.strip() == ref.strip() != ""),
    pytest.param("mesh_chat.py", lambda out, ref: "> What is the capital of France?" in out and "Paris" in out,
                 marks=pytest.mark.slow),
])
async def test_examples_run_on_a_discovered_mesh(example, check, smollm2_gguf, tmp_path):
    reference = await _stream_example_reference(smollm2_gguf) if example == "mesh_stream.py" else None
    secret = "ex-" + tmp_path.name
    devices = await join_all([("ex-1", secret, 1.0), ("ex-2", secret, 1.0)], tmp_path)
    try:
        args = [str(EXAMPLES / example)] + (["What is the capital of France?"] if example != "mesh_stream.py" else [])
        # dense weights: the outputs are compared with one device's, and only fp32 sums are the same (to rounding)
        # however the mesh splits them; the packed formats' bf16 matmuls round differently per split
        code, out, err = await run(*args, env={"MESHLLM_SECRET": secret, "MESHLLM_INTERFACE": LOOPBACK,
                                               "MESHLLM_MODEL": str(smollm2_gguf), "MESHLLM_QUANTIZE": "none"})
        assert code == 0, err
        assert check(out, reference), (out, reference)
        assert "alone" not in err  # it used the devices
    finally:
        await asyncio.gather(*(d.stop() for d in devices))


def _port_is_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


@pytest.mark.slow
async def test_two_joins_without_a_port_both_serve_and_are_discovered(tmp_path):
    from meshllm.cli import DEFAULT_PORT

    secret = "ports-" + tmp_path.name
    default_free = _port_is_free(DEFAULT_PORT)
    first = await join("port-a", secret, tmp_path, score=1.0, port=None)
    second = await join("port-b", secret, tmp_path, score=2.0, port=None)
    try:
        ports = {int(d.address.rsplit(":", 1)[1]) for d in (first, second)}
        assert len(ports) == 2
        if default_free:  # the first took the default; the second said it took another
            assert first.address == f"{LOOPBACK}:{DEFAULT_PORT}"
            assert f"port {DEFAULT_PORT} is taken" in second.log.read_text()
        # both discoverable at the port they really listen on, and both answer an authenticated ping
        code, out, err = await run("-m", "meshllm", "status", "--interface", LOOPBACK, "--timeout", "1.5", "--json",
                                   env={"MESHLLM_SECRET": secret})
        assert code == 0, err
        got = {d["node_id"]: d for d in json.loads(out)["devices"]}
        for d in (first, second):
            assert got[d.name]["address"] == d.address
            assert got[d.name]["rtt_kind"] == "authenticated ping" and got[d.name]["rtt_s"] is not None
        # an explicit --port that is taken stays an error
        taken = first.address.rsplit(":", 1)[1]
        code, _, err = await run("-m", "meshllm", "join", "--interface", LOOPBACK, "--port", taken, "--score", "1",
                                 "--no-advertise", env={"MESHLLM_SECRET": secret}, timeout=60)
        assert code == 1 and f"cannot listen on {LOOPBACK}:{taken}" in err and "Traceback" not in err
    finally:
        await asyncio.gather(first.stop(), second.stop())


def _read_bandwidth_gbps() -> float:
    """An independent yardstick: GB/s at which one thread of numpy streams a 256 MiB array (median of 5 sums)."""
    import statistics
    import time

    import numpy as np

    a = np.ones(64 * 2**20, dtype=np.float32)
    runs = []
    for _ in range(6):
        t0 = time.perf_counter()
        a.sum()
        runs.append(time.perf_counter() - t0)
    return a.nbytes / statistics.median(runs[1:]) / 1e9


async def test_join_measures_its_capability_once_and_advertises_it(tmp_path):
    """Without --score, `join` runs the probe (a GEMV over weights larger than the caches), caches it per CPU and
    thread count, advertises it as its score, and the next start reuses it."""
    secret = "probe-" + tmp_path.name
    async with Browser(LOOPBACK) as browser:
        async def advertised(name: str) -> float:
            for _ in range(100):
                for r in browser.peers.values():
                    if r.node_id == name:
                        return r.score
                await browser.changed(0.1)
            raise AssertionError(f"{name} was not discovered")

        first = await join("probe-1", secret, tmp_path)  # no --score: measured
        try:
            score = await advertised("probe-1")
        finally:
            await first.stop()
        cached = json.loads((tmp_path / "cache-probe-1" / "capability.json").read_text())
        assert cached["key"]["threads"] == 1
        assert score == cached["result"]["gemv_gbps"] > 0
        assert "capability probe:" in first.log.read_text()
        # within a factor of the memory bandwidth numpy reaches on one thread here (a loose physical check: the
        # probe must measure streaming weights, not a cached toy)
        assert 0.2 < score / _read_bandwidth_gbps() < 5, (score, _read_bandwidth_gbps())
        # for the planner: per weight kind a fixed time and a byte rate per phase, and the storage read rate
        phases = cached["result"]["phases"]
        assert set(phases) == {"dense", "int8", "int4"}
        assert all(0 < fixed < 0.05 and 1e8 < rate < 1e12 for fixed, rate in phases.values()), phases
        assert 1e6 < cached["result"]["read_bps"] < 1e12
        assert not list((tmp_path / "cache-probe-1").glob(".read-probe-*"))  # its test file is gone
        again = await join("probe-1", secret, tmp_path)
        try:
            assert await advertised("probe-1") == score
        finally:
            await again.stop()
        assert "capability probe:" not in again.log.read_text()
