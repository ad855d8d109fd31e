"""The slice cache as a whole: leftovers removed at start, a size cap with least-recently-used eviction of whole
models. Real files in a temporary folder; a real device process for the cap."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest

from helpers.checkpoints import VARIANTS
from meshllm.generation.sampling import SamplingParams
from meshllm.runtime.launcher import READY
from meshllm.runtime.mesh import MeshEngine, local_secret
from meshllm.scheduler.slices import STALE_S, STAMP, block_name, cache_bytes, evict, tidy


def shard(root: Path, model: str, name: str, blocks: dict[int, int], complete: bool | None = True,
          age: float = 2 * STALE_S) -> Path:
    folder = root / "slices" / model / name
    folder.mkdir(parents=True)
    for i, size in blocks.items():
        (folder / block_name(i)).write_bytes(bytes(size))
    m = {"version": 1, "blocks": {str(i): {"size": size, "sha256": "0" * 64} for i, size in blocks.items()}}
    if complete is not None:
        m["complete"] = complete
    (folder / "manifest.json").write_text(json.dumps(m))
    old = time.time() - age
    for p in [folder, *folder.iterdir()]:
        os.utime(p, (old, old))
    return folder


def age(p: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(p, (t, t))


def test_tidy_keeps_finished_shards_and_removes_what_no_shard_owns(tmp_path):
    done = shard(tmp_path, "m1", "float32-q0_4", {0: 10, 1: 20})
    legacy = shard(tmp_path, "m1", "float32-q4_8", {0: 10}, complete=None)  # before `complete` was written
    unfinished = shard(tmp_path, "m2", "float32-q0_4", {0: 10}, complete=False)
    young = shard(tmp_path, "m3", "float32-q0_4", {0: 10}, complete=False, age=1)  # being streamed right now
    part = done / f".{block_name(2)}.abc.part"
    part.write_bytes(b"x" * 100)
    age(part, 2 * STALE_S)
    stray = done / "junk.bin"
    stray.write_bytes(b"y")
    age(stray, 2 * STALE_S)
    fresh_part = young / f".{block_name(1)}.def.part"
    fresh_part.write_bytes(b"z")
    short = done / block_name(1)
    short.write_bytes(bytes(19))  # its manifest says 20 bytes
    removed = set(tidy(tmp_path))
    assert removed == {part, stray, short, unfinished, unfinished.parent}
    assert (done / block_name(0)).exists() and (legacy / block_name(0)).exists()
    assert fresh_part.exists() and young.exists()  # another device may be writing it


def test_evict_removes_least_recently_used_models_but_never_one_in_use(tmp_path):
    sizes = {}
    for i, name in enumerate(["old", "mid", "new", "busy"]):
        shard(tmp_path, name, "float32-q0_4", {0: 1000})
        stamp = tmp_path / "slices" / name / STAMP
        stamp.touch()
        age(stamp, 1000 - 100 * i if name != "busy" else 5000)  # busy: the oldest of all, but in use
        sizes[name] = 1000
    total = cache_bytes(tmp_path)
    keep = {tmp_path / "slices" / "busy"}
    removed = evict(tmp_path, total - 1500, keep)
    assert [p.name for p, _ in removed] == ["old", "mid"]
    assert cache_bytes(tmp_path) <= total - 1500
    assert (tmp_path / "slices" / "busy").exists() and (tmp_path / "slices" / "new").exists()
    assert evict(tmp_path, 10**12, set()) == []


async def test_a_device_keeps_its_cache_under_cache_max(make_model, tmp_path):
    """A device with --cache-max for about one model: loading a second model removes the first (least recently
    used, no session on it), and the log says so."""
    one = make_model("cap_one", seed=21, **VARIANTS["gqa_tied"])
    two = make_model("cap_two", seed=22, **VARIANTS["gqa_tied"])
    secret = local_secret()
    log = tmp_path / "device.log"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshllm", "join", "--host", "127.0.0.1", "--port", "0", "--no-advertise",
        "--name", "capped", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--cache-max", "800KiB",
        "--verbose", env={**os.environ, "MESHLLM_SECRET": secret.decode()}, stdout=asyncio.subprocess.PIPE,
        stderr=open(log, "wb"))
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith(READY), log.read_text()
        address = line.split()[-1]
        params = SamplingParams(max_tokens=2, ignore_eos=True)
        for folder in (one, two):
            async with asyncio.timeout(60), MeshEngine(folder, [address], secret) as m:
                await m.generate("hello", params, chat=False)
        models = [p for p in (tmp_path / "cache" / "slices").iterdir()]
        assert len(models) == 1, models
        assert cache_bytes(tmp_path / "cache") <= 800 * 1024
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
    text = log.read_text()
    assert "over its cap of 800.0 KiB: removed model" in text and "least recently used" in text, text[-2000:]


@pytest.mark.parametrize("junk", ["part", pytest.param("unfinished", marks=pytest.mark.slow)])
async def test_a_device_removes_leftovers_at_start(tmp_path, junk):
    root = tmp_path / "cache"
    if junk == "part":
        folder = shard(root, "m1", "float32-q0_4", {0: 10})
        left = folder / f".{block_name(1)}.x.part"
        left.write_bytes(bytes(1 << 20))
        age(left, 2 * STALE_S)
    else:
        left = shard(root, "m2", "float32-q0_4", {0: 10}, complete=False)
    secret = local_secret()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshllm", "join", "--host", "127.0.0.1", "--port", "0", "--no-advertise",
        "--threads", "1", "--cache-dir", str(root), env={**os.environ, "MESHLLM_SECRET": secret.decode()},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith(READY)
        assert not left.exists()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
