"""The slice cache and the sliding window on real device processes: same tokens under a budget, bounded memory,
corrupted files refetched, a full disk named, a budget too small refused up front, a memory cgroup survived."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.checkpoints import VARIANTS
from meshllm.discovery.probe import proc_kib
from meshllm.errors import PlanError, RemoteError
from meshllm.generation.sampling import SamplingParams
from meshllm.runtime.launcher import LocalCluster
from meshllm.runtime.local import LocalEngine
from meshllm.runtime.mesh import MeshEngine, local_secret

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from cgroups import Cap, unusable  # noqa: E402

PROMPT = "the quick brown fox jumps over the lazy dog"
PARAMS = SamplingParams(max_tokens=16, ignore_eos=True)
MODEL = dict(VARIANTS["llama3_rope"], num_hidden_layers=6)


async def reference(folder) -> list[int]:
    async with LocalEngine(folder) as engine:
        return (await engine.generate(PROMPT, PARAMS, chat=False)).token_ids


async def run_mesh(folder, n, tmp_path, budget=None, **kw):
    secret = local_secret()
    async with LocalCluster(n, secret, memory_budget=budget, cache_dir=tmp_path / "cache", log_dir=tmp_path,
                            verbose=True, **kw) as addresses:
        async with MeshEngine(folder, addresses, secret) as mesh:
            result = await mesh.generate(PROMPT, PARAMS, chat=False)
            return result, (await mesh.devices())[1:]


@pytest.mark.parametrize("n", [1, 3])
async def test_same_tokens_with_and_without_a_budget(make_model, tmp_path, n):
    folder = make_model("sched", **MODEL)
    expected = await reference(folder)
    full, devices_full = await run_mesh(folder, n, tmp_path)
    assert full.token_ids == expected
    budget = min(d["weight_bytes"] for d in devices_full) // 5  # under a quarter of each device's slices
    windowed, devices = await run_mesh(folder, n, tmp_path, budget=budget)
    assert windowed.token_ids == expected
    for d in devices_full:
        assert d["resident_weight_bytes"] == d["weight_bytes"]
        assert d["disk_read_bytes"] == 0  # all resident: no file read per token
    for d in devices:
        assert 0 < d["resident_weight_bytes"] <= budget < d["weight_bytes"] / 4
        assert d["disk_read_bytes"] >= d["weight_bytes"] * (PARAMS.max_tokens - 1)  # the share, every token


async def test_slices_are_streamed_once_then_reused_and_corruption_is_refetched(make_model, tmp_path):
    folder = make_model("sched", **MODEL)
    expected = await reference(folder)
    first, _ = await run_mesh(folder, 2, tmp_path)
    assert first.token_ids == expected
    assert "fetching 12 of 12 blocks" in (tmp_path / "local-0.log").read_text()
    blocks = sorted((tmp_path / "cache" / "slices").rglob("*.safetensors"))
    assert len(blocks) == 2 * 12
    second, _ = await run_mesh(folder, 2, tmp_path)
    assert second.token_ids == expected
    assert "fetching" not in (tmp_path / "local-0.log").read_text()  # had them: no transfer
    # corrupt one file's bytes and truncate another: both are detected by checksum and fetched again
    victim = [b for b in blocks if b.parent.name.endswith("b1")]
    data = bytearray(victim[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim[0].write_bytes(bytes(data))
    victim[1].write_bytes(victim[1].read_bytes()[:100])
    third, _ = await run_mesh(folder, 2, tmp_path)
    assert third.token_ids == expected
    log = (tmp_path / "local-0.log").read_text() + (tmp_path / "local-1.log").read_text()
    assert "fetching 2 of 12 blocks" in log
    assert not list((tmp_path / "cache").rglob("*.part"))


async def test_a_budget_too_small_for_one_block_is_refused_up_front(make_model, tmp_path):
    folder = make_model("sched", **MODEL)
    with pytest.raises(PlanError, match=r"cannot hold even one block .* the smallest budget that works is "):
        await run_mesh(folder, 2, tmp_path, budget=1000)
    assert not (tmp_path / "cache" / "slices").exists()  # refused before any weight moved


def _can_mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


async def test_a_full_disk_is_named_and_leaves_no_partial_file(make_model, tmp_path):
    folder = make_model("sched", **MODEL)
    small = tmp_path / "cache"
    if not _can_mount_tmpfs(small):
        pytest.skip("needs root and tmpfs to make a small disk")
    try:
        with pytest.raises(RemoteError, match="no space left on the device writing the slice cache"):
            await run_mesh(folder, 1, tmp_path)
        assert not list(small.rglob("*.part"))
        assert not list(small.rglob("*.safetensors")) or all(
            p.stat().st_size > 0 for p in small.rglob("*.safetensors"))
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


async def test_a_device_in_a_memory_cgroup_below_its_share_completes(make_model, tmp_path):
    reason = unusable("memory")
    if reason:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    # a share of ~200 MB (fp32) on one device; the cgroup allows the process baseline plus ~60% of the share
    folder = make_model("cgroup_big", hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                        num_attention_heads=8, num_key_value_heads=4)
    secret = local_secret()
    cache = tmp_path / "cache"
    # warm the slice cache (and measure an idle device's memory) without a cap
    cluster = LocalCluster(1, secret, cache_dir=cache, threads=1)
    async with cluster as addresses:
        idle = proc_kib(f"/proc/{cluster.procs[0].pid}/status", "VmRSS")
        async with MeshEngine(folder, addresses, secret) as mesh:
            expected = (await mesh.generate(PROMPT, PARAMS, chat=False)).token_ids
            (dev,) = (await mesh.devices())[1:]
    share = dev["weight_bytes"]
    limit = idle + int(share * 0.6)
    budget = share // 4
    results = {}
    for tag, b in (("windowed", budget), ("unbudgeted", None)):
        with Cap(f"test-{tag}", memory_bytes=limit) as cap:
            capped = LocalCluster(1, secret, threads=1, cache_dir=cache, memory_budget=b, prefixes=[cap.prefix()])
            async with capped as addresses:
                proc = capped.procs[0]
                try:
                    async with MeshEngine(folder, addresses, secret) as mesh:
                        results[tag] = (await mesh.generate(PROMPT, PARAMS, chat=False)).token_ids
                except Exception as e:  # the unbudgeted device is expected to be killed by the cgroup
                    results[tag] = e
        if tag == "unbudgeted":
            results["unbudgeted_exit"] = proc.returncode
    assert results["windowed"] == expected
    # the control: the same cap kills the device that holds its whole share
    assert isinstance(results["unbudgeted"], Exception) and results["unbudgeted_exit"] in (-9, 137)


async def test_a_request_cut_short_under_a_budget_leaves_the_window_usable(make_model, tmp_path):
    """An aborted request stops the window mid-token; the next request must start again from layer 0."""
    folder = make_model("sched", **MODEL)
    expected = await reference(folder)
    secret = local_secret()
    async with LocalCluster(2, secret, cache_dir=tmp_path / "cache", memory_budget=300_000) as addresses:
        async with MeshEngine(folder, addresses, secret) as mesh:
            for cut in (3, 1):
                stream = mesh.stream(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True), chat=False)
                n = 0
                async for _ in stream:
                    n += 1
                    if n == cut:
                        break
                await stream.aclose()  # the request is aborted on every device
                result = await mesh.generate(PROMPT, PARAMS, chat=False)
                assert result.token_ids == expected


def test_a_block_read_from_storage_leaves_other_threads_running(tmp_path):
    """Mapping a streamed block faults the whole file in (MADV_POPULATE_READ); the GIL must be free meanwhile, or
    the device's event loop and its compute thread stop for the length of every read from storage."""
    import threading

    from meshllm.scheduler.slices import _map_populated, drop_cached_pages

    path = tmp_path / "block.bin"
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(256):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    drop_cached_pages(path)
    took = []

    def read():
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            _map_populated(f.fileno(), os.fstat(f.fileno()).st_size).close()
        took.append(time.perf_counter() - t0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        reader = threading.Thread(target=read)
        last = time.perf_counter()
        reader.start()
        longest = 0.0
        while reader.is_alive():
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        reader.join()
    finally:
        sys.setswitchinterval(interval)
    if took[0] < 0.03:
        pytest.skip(f"the 256 MiB file came back in {took[0] * 1e3:.0f} ms: not a read from storage here "
                    "(page cache not dropped), so there is nothing to observe")
    assert longest < took[0] / 2, (f"this thread stood still for {longest * 1e3:.0f} ms of a "
                                   f"{took[0] * 1e3:.0f} ms read")
