"""A device lost mid-request: the request re-plans over the devices left and goes on, with the ids of an undisturbed
run, through MeshEngine, the CLI and `Mesh`. Real device processes, real signals (SIGKILL: gone; SIGSTOP: hung,
found by its silence). The reference is one process holding the whole model."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from helpers.checkpoints import VARIANTS
from helpers.devices import LOOPBACK, children, join_all, pid_listening_on
from meshllm import Mesh
from meshllm.generation.loop import Result
from meshllm.generation.sampling import SamplingParams
from meshllm.net.link import Timeouts
from meshllm.runtime.launcher import LocalCluster
from meshllm.runtime.local import LocalEngine
from meshllm.runtime.mesh import MeshEngine, local_secret

PROMPT = "The quick brown fox jumps over the lazy dog because"
PARAMS = SamplingParams(max_tokens=40, ignore_eos=True)
LONG = {**VARIANTS["gqa_tied"], "max_position_embeddings": 4096}
FAST = Timeouts(silence=3.0, beat=1.0)  # a hung device is found in 3 s


@pytest.fixture
def model(make_model):
    return make_model("gqa_resume", **LONG)


async def reference(folder) -> Result:
    async with LocalEngine(folder) as engine:
        return await engine.generate(PROMPT, PARAMS, chat=False)


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGSTOP, marks=pytest.mark.slow)],
                         ids=["killed", "hung"])
@pytest.mark.parametrize("role", ["worker", pytest.param("hub", marks=pytest.mark.slow)])
async def test_a_request_resumes_after_losing_a_device(model, sig, role):
    expected = await reference(model)
    secret = local_secret()
    async with LocalCluster(3, secret) as addresses:
        async with MeshEngine(model, addresses, secret, timeouts=FAST) as mesh:
            hub = mesh.plan.hub
            victim = mesh.members[hub if role == "hub" else (hub + 1) % 3]
            pid = pid_listening_on(victim.address)
            result, pieces, text = Result(), 0, []
            try:
                async for piece in mesh.stream(PROMPT, PARAMS, chat=False, result=result):
                    text.append(piece)
                    pieces += 1
                    if pieces == 6:
                        os.kill(pid, sig)
                        at = len(result.token_ids)
            finally:
                if sig == signal.SIGSTOP:
                    os.kill(pid, signal.SIGCONT)
            assert at < len(result.token_ids)
            assert result.token_ids == expected.token_ids
            assert "".join(text) == expected.text  # the stream neither repeated nor skipped text
            assert victim.address not in [m.address for m in mesh.members] and len(mesh.members) == 2


async def test_the_cli_resumes_a_request_when_a_device_dies(model):
    """`generate --local-devices 3`: one device process killed mid-stream; what the command prints is what an
    undisturbed run prints."""
    expected = await reference(model)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshllm", "generate", "--model", str(model), "--raw", "--prompt", PROMPT,
        "--local-devices", "3", "--plan", "tp", "--max-tokens", str(PARAMS.max_tokens), "--ignore-eos",
        "--threads", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    got = b""
    while len(got) < 10:
        chunk = await asyncio.wait_for(proc.stdout.read(16), 120)
        assert chunk, (await proc.stderr.read()).decode()
        got += chunk
    os.kill(children(proc.pid)[-1], signal.SIGKILL)
    rest, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert (got + rest).decode().rstrip("\n") == expected.text
    assert "resuming the request" in err.decode()


@pytest.mark.slow
async def test_mesh_resumes_a_request_when_the_hub_dies(model, tmp_path):
    """An app's `Mesh` over three discovered devices: the hub killed mid-request; the request completes over the
    two left, and the next request runs without the dead device."""
    expected = await reference(model)
    secret = "resume-" + tmp_path.name
    devices = await join_all([("r-top", secret, 9.0), ("r-mid", secret, 4.0), ("r-low", secret, 1.0)], tmp_path)
    try:
        async with Mesh(model, secret=secret, min_devices=3, timeout=20, interface=LOOPBACK, timeouts=FAST) as m:
            hub = next(d for d in m.devices if d["role"] == "hub")
            assert hub["node_id"] == "r-top"
            result, pieces = Result(), 0
            async for _ in m.stream(PROMPT, max_tokens=PARAMS.max_tokens, ignore_eos=True, chat=False,
                                    result=result):
                pieces += 1
                if pieces == 6:
                    await devices[0].kill()
            assert result.token_ids == expected.token_ids
            again = await m.generate(PROMPT, max_tokens=PARAMS.max_tokens, ignore_eos=True, chat=False)
            assert again.token_ids == expected.token_ids
            assert "r-top" not in [d["node_id"] for d in m.devices]
    finally:
        await asyncio.gather(*(d.stop() for d in devices[1:]))
