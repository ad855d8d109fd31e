"""A device's capability, measured once at join and cached: decode bandwidth (the score), matmul speed, memory,
disk. Blocking (a fraction of a second the first time): run it in an executor."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

log = logging.getLogger("meshllm.probe")

PROBE_VERSION = 4  # 2: per weight kind, the fixed time and byte rate of a decode phase; 3: over 8 large layers;
# 4: the storage read rate


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cgroup_memory_limit() -> int | None:
    """This process's cgroup v1/v2 memory limit, if one is set."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                f = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
            elif controllers == "":
                f = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
            else:
                continue
            if f.exists():
                text = f.read_text().strip()
                if text.isdigit() and int(text) < 1 << 60:
                    return int(text)
    except (OSError, ValueError):
        pass
    return None


def proc_kib(path: str, key: str) -> int | None:
    """A 'Key:   123 kB' line of a /proc file, in bytes."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def available_memory() -> int:
    """Bytes this device can still use: MemAvailable, or its cgroup limit when that is smaller."""
    avail = proc_kib("/proc/meminfo", "MemAvailable")
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    limit = _cgroup_memory_limit()
    return min(avail, limit) if limit else avail


PAGE_CACHE_MARGIN = 64 * 2**20  # kept free for activations, buffers and the kernel's own slack


def page_cache_room(weights: int) -> int | None:
    """Bytes of page cache this device can keep beside `weights` bytes of its own: under a memory cgroup, the limit
    less this process's RSS and the weights; otherwise MemAvailable less the weights. None when unknown."""
    limit = _cgroup_memory_limit()
    if limit:
        return max(0, limit - (proc_kib("/proc/self/status", "VmRSS") or 0) - weights - PAGE_CACHE_MARGIN)
    avail = proc_kib("/proc/meminfo", "MemAvailable")
    return None if avail is None else max(0, avail - weights - PAGE_CACHE_MARGIN)


def host_id() -> str:
    """The same for every device process of one running machine (network namespaces included), different across
    machines: a hash of the kernel's boot id. The planner counts devices of one machine as sharing its cores and
    memory."""
    import hashlib

    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = f"{platform.node()}-{os.getpid()}"  # unknown: this process is a machine of its own
    return hashlib.sha256(b"meshllm host " + boot.encode()).hexdigest()[:16]


def free_disk(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(folder).free


def measure(threads: int, seconds: float = 0.25) -> dict:
    """Decode-like GEMV bandwidth (GB/s of fp32 weights), matmul GFLOP/s, and per weight kind the fixed time and
    byte rate of a decode phase (runtime.worker.phase_costs), with `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = torch.randn(4096, 4096)  # 64 MiB: larger than the caches, like a layer's weights
        x = torch.randn(4096)
        a = torch.randn(512, 512)

        def rate(fn, work: float) -> float:
            fn()
            runs = []
            deadline = time.perf_counter() + seconds / 2
            while time.perf_counter() < deadline or len(runs) < 3:
                t0 = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - t0)
            return work / statistics.median(runs)

        gemv = rate(lambda: torch.mv(w, x), w.numel() * 4) / 1e9
        gflops = rate(lambda: a @ a, 2 * 512**3) / 1e9
        from ..runtime.worker import phase_costs

        phases = phase_costs(20)
    finally:
        torch.set_num_threads(previous)
    return {"gemv_gbps": round(gemv, 3), "matmul_gflops": round(gflops, 1),
            "phases": {k: [round(f, 7), round(r)] for k, (f, r) in phases.items()}}


def storage_read_rate(folder: Path, size: int = 64 << 20) -> float | None:
    """Bytes per second read from the storage under `folder` with the page cache out of the way: a file written,
    synced, its cached pages dropped, then read back in 1 MiB chunks (what a window's streamed blocks do). None when
    it cannot be measured (no room, no write access)."""
    from ..scheduler.slices import drop_cached_pages

    path = Path(folder) / f".read-probe-{os.getpid()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        chunk = os.urandom(1 << 20)  # incompressible, in case the file system compresses
        with open(path, "wb") as f:
            for _ in range(size >> 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        drop_cached_pages(path)
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
        return size / max(time.perf_counter() - t0, 1e-6)
    except OSError as e:
        log.warning("could not measure the storage read rate under %s: %s", folder, e)
        return None
    finally:
        path.unlink(missing_ok=True)


def capability(cache_folder: Path, threads: int, refresh: bool = False) -> dict:
    """The measured numbers for this CPU and thread count, from the cache when measured before."""
    key = {"probe": PROBE_VERSION, "cpu": _cpu_model(), "threads": threads, "torch": torch.__version__}
    path = cache_folder / "capability.json"
    if not refresh:
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return cached["result"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    t0 = time.perf_counter()
    result = measure(threads)
    rate = storage_read_rate(cache_folder)
    if rate:
        result["read_bps"] = round(rate)
    log.info("capability probe: %.1f GB/s GEMV, %.0f GFLOP/s matmul (%.2f s)", result["gemv_gbps"],
             result["matmul_gflops"], time.perf_counter() - t0)
    try:
        cache_folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "result": result}))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not cache the capability probe in %s: %s", path, e)
    return result
