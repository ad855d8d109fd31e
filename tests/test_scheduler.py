"""The slice cache and the sliding window on real device processes: same tokens under a budget, bounded memory,
corrupted files refetched, a full disk named, a budget too small refused up front, a memory cgroup survived."""

from __future__ import annotations

import asyncio
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


@pytest.mark.parametrize("n", [1, pytest.param(3, marks=pytest.mark.slow)])
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


@pytest.mark.slow
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


async def test_a_request_cut_short_mid_token_under_a_budget_leaves_the_window_usable(make_model, tmp_path):
    """An abort that lands inside a step stops the window mid-token (some blocks of the cycle held, others loading);
    the next request must start again from layer 0 and give the same tokens."""
    folder = make_model("sched", **MODEL)
    expected = (await reference(folder))[:4]
    secret = local_secret()
    # reads slowed to 2 MB/s: a step reads the device's ~0.7 MB share, so it takes a few tenths of a second and a
    # cut made shortly after a token lands inside the next step
    async with LocalCluster(2, secret, cache_dir=tmp_path / "cache", memory_budget=300_000,
                            read_rate=2_000_000) as addresses:
        async with MeshEngine(folder, addresses, secret) as mesh:
            for pause in (0.1, 0.25):
                before = [s["steps"] for s in await mesh.device_stats()]
                first = asyncio.Event()

                async def consume():
                    async for _ in mesh.stream(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True), chat=False):
                        first.set()

                task = asyncio.ensure_future(consume())
                await asyncio.wait_for(first.wait(), 60)  # a token is out: the next step is under way
                await asyncio.sleep(pause)
                sent = mesh.step
                task.cancel()  # the request is aborted on every device
                with pytest.raises(asyncio.CancelledError):
                    await task
                done = [s["steps"] - b for s, b in zip(await mesh.device_stats(), before)]
                assert all(d < sent for d in done), f"{sent} steps sent, {done} finished: the cut fell between steps"
                result = await mesh.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True), chat=False)
                assert result.token_ids == expected


def _cached_pages(path: Path) -> tuple[int, int]:
    """(pages of the file in the page cache, pages of the file), asked of the kernel with mincore(2)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vec = (ctypes.c_ubyte * pages)()
        assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        return sum(b & 1 for b in vec), pages
    finally:
        libc.munmap(addr, size)


def _kernel_drops_cached_pages(path: Path) -> str | None:
    """None when the kernel drops a written file's pages on POSIX_FADV_DONTNEED here (asked directly, not through
    our own code); otherwise why not (tmpfs, for one, keeps them: its pages are the file)."""
    with open(path, "wb") as f:
        f.write(os.urandom(4 << 20))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    cached, pages = _cached_pages(path)
    if cached > pages // 2:
        return f"this filesystem keeps a file's pages cached after POSIX_FADV_DONTNEED ({cached} of {pages}): " \
               f"there is no read from storage to observe"
    return None


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
    kernel_drops = _kernel_drops_cached_pages(tmp_path / "probe.bin")
    if kernel_drops is not None:
        pytest.skip(kernel_drops)
    drop_cached_pages(path)
    cached, pages = _cached_pages(path)
    assert cached <= pages // 20, f"drop_cached_pages left {cached} of {pages} pages in the page cache"
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
    assert longest < took[0] / 2, (f"this thread stood still for {longest * 1e3:.0f} ms of a "
                                   f"{took[0] * 1e3:.0f} ms read")


BIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4)


@pytest.mark.parametrize("fraction", [4, pytest.param(8, marks=pytest.mark.slow)])
async def test_a_budget_bounds_the_devices_real_memory(make_model, tmp_path, fraction):
    """The device's peak RSS, read from /proc by this test (not the scheduler's own ledger), stays within its idle
    RSS plus the budget plus a small allowance for activations and buffers: released blocks really are released."""
    folder = make_model("cgroup_big", **BIG)  # ~280 MB of fp32 weights: one device's share
    secret = local_secret()
    cache = tmp_path / "cache"
    async with LocalCluster(1, secret, cache_dir=cache, threads=1) as addresses:  # warm the slice cache
        async with MeshEngine(folder, addresses, secret) as mesh:
            expected = (await mesh.generate(PROMPT, PARAMS, chat=False)).token_ids
            share = (await mesh.devices())[1]["weight_bytes"]
    budget = share // fraction
    cluster = LocalCluster(1, secret, cache_dir=cache, threads=1, memory_budget=budget)
    async with cluster as addresses:
        status = f"/proc/{cluster.procs[0].pid}/status"
        idle = proc_kib(status, "VmRSS")  # a device that has imported everything and holds no weight
        async with MeshEngine(folder, addresses, secret) as mesh:
            assert (await mesh.generate(PROMPT, PARAMS, chat=False)).token_ids == expected
            peak = proc_kib(status, "VmHWM")
    allowance = 48 * 2**20
    assert peak - idle <= budget + allowance, (
        f"peak RSS {peak / 2**20:.0f} MiB = idle {idle / 2**20:.0f} MiB + {(peak - idle) / 2**20:.0f} MiB, over the "
        f"budget of {budget / 2**20:.0f} MiB (share {share / 2**20:.0f} MiB) + {allowance / 2**20:.0f} MiB")
