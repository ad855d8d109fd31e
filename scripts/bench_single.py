"""Single-device decode benchmark: meshllm vs transformers vs the memory-bandwidth floor, in one run.

    python scripts/bench_single.py [--reps 5] [--new-tokens 32] [--prompt-tokens 32] [--only smollm2|1b]

Both engines run greedy from the same token ids on the same threads, interleaved rep by rep (the machine is
shared and noisy: medians are quoted). TTFT = prefill + first sample; per-token = median gap between tokens.
The floor is the bytes of weights one token reads / the measured GEMV streaming bandwidth in the same dtype.
Writes benchmarks/single_device.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from benchlib import ROOT, prompt_ids  # noqa: E402 (sets the import path first)

from meshllm.generation.sampling import Sampler, SamplingParams  # noqa: E402
from meshllm.model.default import cache_dir, default_model_path  # noqa: E402
from meshllm.runtime.local import LocalEngine  # noqa: E402


def gemv_bandwidth(dtype: torch.dtype, mbytes: int = 512, reps: int = 7) -> float:
    """Bytes/s a matrix-vector product streams from memory (best of reps; matrix >> caches)."""
    cols = 4096
    rows = mbytes * 2**20 // (cols * torch.finfo(dtype).bits // 8)
    w = torch.randn(rows, cols).to(dtype)
    x = torch.randn(1, cols).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(reps):
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - t)
    return w.numel() * w.element_size() / best


def token_weight_bytes(engine: LocalEngine) -> int:
    """Bytes one decode step reads: every decoder block and the LM head (the embedding reads one row)."""
    h = engine.head
    return engine.worker.weight_bytes() + h.lm_head.nbytes() + h.norm.numel() * h.norm.element_size()


async def run_ours(engine: LocalEngine, ids: list[int], n: int) -> tuple[float, float, list[int]]:
    sampler = Sampler(SamplingParams(max_tokens=n), engine.config.vocab_size)
    t0 = time.perf_counter()
    stamps, out = [], []
    await engine.begin(len(ids) + n)
    tokens, start = list(ids), 0
    for _ in range(n):
        tok = await engine.next_token(tokens, start, sampler)
        stamps.append(time.perf_counter())
        out.append(tok)
        start += len(tokens)
        tokens = [tok]
    await engine.end()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - t0, statistics.median(gaps), out


def run_hf(model, ids: list[int], n: int) -> tuple[float, float, list[int]]:
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self) -> None:
            self.t: list[float] = []

        def __call__(self, input_ids, scores):
            self.t.append(time.perf_counter())
            return scores

    stamp = Stamp()
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        prompt = torch.tensor([ids])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gc,
                             logits_processor=LogitsProcessorList([stamp]))
    gaps = [b - a for a, b in zip(stamp.t, stamp.t[1:])]
    return stamp.t[0] - t0, statistics.median(gaps), out[0, len(ids):].tolist()


async def bench_model(name: str, path: Path, hf_kwargs: dict, dtype: str | None, args) -> dict:
    from transformers import AutoModelForCausalLM

    print(f"\n== {name}: loading ({path})", file=sys.stderr)
    async with LocalEngine(path, dtype=dtype) as engine:
        torch_dtype = engine.dtype
        hf = AutoModelForCausalLM.from_pretrained(**hf_kwargs, dtype=torch_dtype).eval()
        ids = prompt_ids(engine.config.vocab_size, args.prompt_tokens)
        ours, ref = [], []
        # warm-up (first-call allocations, oneDNN kernel selection) is not measured
        await run_ours(engine, ids, 4)
        run_hf(hf, ids, 4)
        for rep in range(args.reps):
            ours.append(await run_ours(engine, ids, args.new_tokens))
            ref.append(run_hf(hf, ids, args.new_tokens))
            print(f"   rep {rep}: ours {ours[-1][1]*1e3:.1f} ms/token, transformers {ref[-1][1]*1e3:.1f}",
                  file=sys.stderr)
        same_ids = all(o[2] == r[2] for o, r in zip(ours, ref))
        wbytes = token_weight_bytes(engine)
        bw = gemv_bandwidth(torch_dtype)
        del hf
    floor = wbytes / bw
    med = lambda xs: statistics.median(xs)  # noqa: E731
    row = {
        "model": name,
        "dtype": str(torch_dtype).replace("torch.", ""),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "meshllm_ttft_s": med([o[0] for o in ours]),
        "meshllm_token_s": med([o[1] for o in ours]),
        "transformers_ttft_s": med([r[0] for r in ref]),
        "transformers_token_s": med([r[1] for r in ref]),
        "weight_bytes_per_token": wbytes,
        "gemv_bandwidth_Bps": bw,
        "floor_token_s": floor,
        "greedy_ids_identical": same_ids,
    }
    row["token_ratio_vs_transformers"] = row["meshllm_token_s"] / row["transformers_token_s"]
    row["ttft_ratio_vs_transformers"] = row["meshllm_ttft_s"] / row["transformers_ttft_s"]
    row["token_ratio_vs_floor"] = row["meshllm_token_s"] / floor
    return row


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':<16}{'dtype':<10}{'TTFT ours':>11}{'TTFT HF':>10}{'tok ours':>10}{'tok HF':>9}"
            f"{'floor':>8}{'ours/HF':>9}{'ours/floor':>11}{'same ids':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<16}{r['dtype']:<10}{r['meshllm_ttft_s']*1e3:>9.1f}ms{r['transformers_ttft_s']*1e3:>8.1f}ms"
              f"{r['meshllm_token_s']*1e3:>8.1f}ms{r['transformers_token_s']*1e3:>7.1f}ms"
              f"{r['floor_token_s']*1e3:>6.1f}ms{r['token_ratio_vs_transformers']:>9.2f}"
              f"{r['token_ratio_vs_floor']:>11.2f}{str(r['greedy_ids_identical']):>10}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--only", choices=["smollm2", "1b"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "single_device.json"))
    args = ap.parse_args()

    rows = []
    if args.only in (None, "smollm2"):
        gguf = default_model_path()
        rows.append(await bench_model("smollm2-135m", gguf,
                                      dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name),
                                      None, args))
    if args.only in (None, "1b"):
        from synthetic import make_synthetic

        folder = make_synthetic(cache_dir() / "bench" / "tinyllama-1.1b-random-bf16")
        rows.append(await bench_model("tinyllama-1.1b", folder, dict(pretrained_model_name_or_path=str(folder)),
                                      "bfloat16", args))
    print()
    print_table(rows)
    out = {
        "benchmark": "single_device",
        "command": "python scripts/bench_single.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
