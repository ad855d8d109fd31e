"""The named single-thread executors: one for compute, one for disk reads. Nothing blocking runs on the loop."""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import torch


def _compute_thread_init() -> None:
    # grad mode is thread-local: set it in the thread that runs the matmuls
    torch.set_grad_enabled(False)


def compute_executor(name: str = "meshllm-compute") -> ThreadPoolExecutor:
    """A single thread for matmuls: torch releases the GIL inside kernels, so the loop keeps serving."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_compute_thread_init)


def io_executor(name: str = "meshllm-io") -> ThreadPoolExecutor:
    """A single thread for weight reads from disk."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_compute_thread_init)


def set_torch_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (process-wide); returns the count in force."""
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()


def cpu_count() -> int:
    """Cores this process may run on (respects affinity/cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def release_heap() -> None:
    """Return the C heap's free pages to the OS (glibc's malloc_trim; nothing elsewhere): loading frees many
    temporaries (dequantized chunks, file reads) that would otherwise stay in the process for its life."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
