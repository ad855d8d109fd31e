"""What the benchmark scripts share: the import path, offline transformers, and a measured mesh request."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def prompt_ids(vocab: int, n: int) -> list[int]:
    """The benchmarks' prompt: n seeded random token ids (no special ids, within any vocabulary we use)."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(3, min(vocab, 30000), (n,), generator=g).tolist()


async def measured_request(mesh, ids: list[int], tokens: int, keys: tuple[str, ...]):
    """Run one greedy request of `tokens` on a MeshEngine; return (Result, per-device deltas of the stat `keys`)."""
    from meshllm.generation.loop import Result, generate
    from meshllm.generation.sampling import SamplingParams

    before = await mesh.device_stats()
    result = Result()
    async for _ in generate(mesh, mesh.tokenizer, ids, SamplingParams(max_tokens=tokens, ignore_eos=True), result):
        pass
    after = await mesh.device_stats()
    return result, [{k: a[k] - b[k] for k in keys} for a, b in zip(after, before)]


def write_report(out: dict, name: str, path: str) -> None:
    """Stamp a benchmark's JSON with its name, command line and machine, and write it."""
    import json
    import platform

    out.update(benchmark=name, command=f"python scripts/bench_{name}.py " + " ".join(sys.argv[1:]),
               machine={"cpus": os.cpu_count(), "python": platform.python_version()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")
