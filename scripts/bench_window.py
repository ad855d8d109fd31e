"""Sliding-window benchmark: memory budgets on the ~1B synthetic model, a slow-disk run, and Accelerate offload.

    python scripts/bench_window.py [--quick] [--tokens 8]

1. N=2 local devices, budgets of 100%, 50%, 25%, 12.5% of each device's share: peak RSS per device, per-token
   latency, disk bytes read per token (block files in the page cache after the first read).
2. 25% budget with block reads rate-limited to 200 MB/s (a test hook emulating an SD card / slow SSD), next to the
   ideal max(compute, disk) and the sum compute + disk.
3. The paper's baseline: transformers + Accelerate disk offload (device_map, max_memory at the same budget,
   offload_folder) on one device, next to meshllm at N=1 and N=2 under that budget: TTFT and per-token latency.
4. The same, with each process (Accelerate; each meshllm device) in a cgroup v1 memory group of budget + 512 MiB,
   page cache included: devices that really have that little memory (skipped where cgroups are not usable).
Writes benchmarks/window.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, measured_request, prompt_ids  # noqa: E402 (sets the import path first)

PROMPT_TOKENS = 16


def evict(folder: Path) -> None:
    """Drop our own block files from the page cache, so every budgeted run starts alike: the first reads come from
    disk through the windowed (huge-page) mappings, not through folios an earlier run happened to leave."""
    from meshllm.scheduler.slices import drop_cached_pages

    for path in folder.rglob("*.safetensors"):
        drop_cached_pages(path)


async def run_mesh(model: Path, n: int, budget: int | None, tokens: int, cache: Path,
                   read_rate: int | None = None, prefixes: list[list[str]] | None = None) -> dict:
    from meshllm.runtime.launcher import LocalCluster
    from meshllm.runtime.mesh import MeshEngine, local_secret

    if budget is not None:
        evict(cache)
    secret = local_secret()
    async with LocalCluster(n, secret, memory_budget=budget, cache_dir=cache, read_rate=read_rate,
                            prefixes=prefixes) as addresses:
        async with MeshEngine(model, addresses, secret, dtype="bfloat16") as mesh:
            ids = prompt_ids(mesh.config.vocab_size, PROMPT_TOKENS)

            def once(k: int):
                return measured_request(mesh, ids, k, ("compute_s", "disk_read_total_bytes", "read_s", "stall_s",
                                                       "allreduce_wait_s", "storage_read_total_bytes"))

            await once(2)  # warm-up: first-call allocations
            result, delta = await once(tokens)
            devices = (await mesh.devices())[1:]
    steps = tokens  # prefill + tokens-1 decode steps; per-token figures below are over the decode steps
    return {
        "N": n, "budget_bytes": budget, "tokens": tokens,
        "ttft_s": result.ttft_s, "token_s": result.token_latency_s,
        "share_bytes": [d["weight_bytes"] for d in devices],
        "peak_rss_bytes": [d["peak_rss_bytes"] for d in devices],
        "resident_weight_bytes": [d["resident_weight_bytes"] for d in devices],
        "disk_bytes_per_token": [x["disk_read_total_bytes"] / steps for x in delta],  # block bytes read or mapped
        "storage_bytes_per_token": [x["storage_read_total_bytes"] / steps for x in delta],  # page cache misses
        "compute_s_per_token": [x["compute_s"] / steps for x in delta],
        "read_s_per_token": [x["read_s"] / steps for x in delta],
        "stall_s_per_token": [x["stall_s"] / steps for x in delta],
    }


def accelerate_child(model: str, budget: int, tokens: int) -> None:
    """In a child process: transformers + Accelerate disk offload, one device, same budget."""
    import torch

    from meshllm.runtime.originator import peak_rss_bytes
    from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as off:
        t0 = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, device_map="auto",
                                                 max_memory={"cpu": budget}, offload_folder=off).eval()
        load_s = time.perf_counter() - t0
        placement = sorted(set(str(v) for v in getattr(m, "hf_device_map", {}).values()))

        class Stamp(LogitsProcessor):
            def __init__(self):
                self.t = []

            def __call__(self, input_ids, scores):
                self.t.append(time.perf_counter())
                return scores

        ids = torch.tensor([prompt_ids(m.config.vocab_size, PROMPT_TOKENS)])
        gc = GenerationConfig(do_sample=False, max_new_tokens=tokens, eos_token_id=None, pad_token_id=0)
        stamp = Stamp()
        t0 = time.perf_counter()
        with torch.inference_mode():
            m.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc,
                       logits_processor=LogitsProcessorList([stamp]))
        gaps = [b - a for a, b in zip(stamp.t, stamp.t[1:])]
        print(json.dumps({"ttft_s": stamp.t[0] - t0, "token_s": statistics.median(gaps), "load_s": load_s,
                          "placement": placement,
                          "peak_rss_bytes": peak_rss_bytes()}))


def runtime_rss() -> int:
    """Peak RSS of a fresh process that has imported the device runtime (torch and all) and nothing else: the part of
    a device's RSS that no budget can remove."""
    code = ("import meshllm.runtime.device\n"
            "from meshllm.runtime.originator import peak_rss_bytes\nprint(peak_rss_bytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


def run_accelerate(model: Path, budget: int, tokens: int, prefix: list[str] | None = None) -> dict:
    out = subprocess.run([*(prefix or []), sys.executable, __file__, "--_accelerate", str(model), str(budget),
                          str(tokens)], capture_output=True, text=True, timeout=3600)
    if out.returncode:
        return {"error": out.stderr.strip()[-800:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


async def main_async(args) -> dict:
    from meshllm.model.default import cache_dir
    from synthetic import make_synthetic

    name = {"tinyllama-1.1b": "tinyllama-1.1b-random-bf16", "llama-3b": "llama-3b-random-bf16"}[args.shape]
    model = make_synthetic(cache_dir() / "bench" / name, shape=args.shape)
    cache = cache_dir() / "bench" / "window-cache"
    tokens = args.tokens
    rows = []
    print("== budgets, N=2", file=sys.stderr)
    full = await run_mesh(model, 2, None, tokens, cache)
    share = max(full["share_bytes"])
    full["fraction"] = 1.0
    rows.append(full)
    for f in ((0.25,) if args.quick else (0.5, 0.25, 0.125)):
        r = await run_mesh(model, 2, int(share * f), tokens, cache)
        r["fraction"] = f
        rows.append(r)
    runtime = runtime_rss()
    for r in rows:
        r["rss_vs_unbudgeted"] = max(r["peak_rss_bytes"]) / max(full["peak_rss_bytes"])
        r["token_vs_unbudgeted"] = r["token_s"] / full["token_s"]
        # the lowest peak RSS any scheduler could reach under this budget: the runtime plus the budget's weights
        r["rss_floor_vs_unbudgeted"] = (runtime + min(share, r["budget_bytes"] or share)) / max(full["peak_rss_bytes"])
        print(f"   {r['fraction']:>6.1%}: {r['token_s']*1e3:7.1f} ms/token, peak RSS "
              f"{max(r['peak_rss_bytes'])/2**20:6.0f} MiB ({r['rss_vs_unbudgeted']:.0%}), disk "
              f"{max(r['disk_bytes_per_token'])/2**20:6.0f} MiB/token", file=sys.stderr)

    print("== 25% budget, reads limited to 200 MB/s", file=sys.stderr)
    rate = 200 * 10**6
    slow = await run_mesh(model, 2, int(share * 0.25), 3 if args.quick else 4, cache, read_rate=rate)
    compute = max(full["compute_s_per_token"])
    disk = max(slow["disk_bytes_per_token"]) / rate
    slow.update(fraction=0.25, read_rate=rate, ideal_max_s=max(compute, disk), sum_s=compute + disk)
    print(f"   {slow['token_s']:.2f} s/token; ideal max(compute, disk) {slow['ideal_max_s']:.2f} s, "
          f"sum {slow['sum_s']:.2f} s", file=sys.stderr)

    if args.no_baseline:
        return {"model": args.shape, "budgets": rows, "slow_disk": slow, "share_bytes": share,
                "runtime_rss_bytes": runtime}
    print("== Accelerate disk offload vs meshllm at the same budget", file=sys.stderr)
    budget = int(sum(full["share_bytes"]) * 0.25)  # a quarter of the whole model, per device
    base_tokens = 3 if args.quick else 4
    acc = run_accelerate(model, budget, base_tokens)
    n1 = await run_mesh(model, 1, budget, base_tokens, cache)
    n2 = await run_mesh(model, 2, budget, base_tokens, cache)
    baseline = {"budget_bytes": budget, "tokens": base_tokens, "accelerate": acc,
                "meshllm_N2_unbudgeted_token_s": full["token_s"],  # nothing read per token: no budget is faster
                "meshllm_N1": {k: n1[k] for k in ("ttft_s", "token_s", "peak_rss_bytes")},
                "meshllm_N2": {k: n2[k] for k in ("ttft_s", "token_s", "peak_rss_bytes")}}
    if "token_s" in acc:
        for key, r in (("N1", n1), ("N2", n2)):
            baseline[f"ttft_reduction_{key}"] = 1 - r["ttft_s"] / acc["ttft_s"]
            baseline[f"token_reduction_{key}"] = 1 - r["token_s"] / acc["token_s"]
    print(f"   {json.dumps(baseline)[:400]}", file=sys.stderr)
    capped = await capped_baseline(model, budget, base_tokens, cache, runtime)
    return {"model": args.shape, "budgets": rows, "slow_disk": slow, "accelerate_baseline": baseline,
            "capped_baseline": capped, "share_bytes": share, "runtime_rss_bytes": runtime}


CAP_SLACK = 512 * 2**20  # memory each capped process gets beyond the weight budget: runtime, activations, cache


async def capped_baseline(model: Path, budget: int, tokens: int, cache: Path, runtime: int) -> dict:
    """The same comparison on devices that really have only budget + CAP_SLACK of memory: each process (the
    Accelerate one, each meshllm device) in a cgroup v1 memory group of that size. Page cache is charged to the
    group, so weights that do not fit are read from disk again, as on a small device, instead of from a page cache
    the size of the host's RAM. The meshllm originator (embedding, LM head) is not capped; its peak RSS is listed."""
    from cgroups import Cap, unusable
    from meshllm.runtime.originator import peak_rss_bytes

    reason = unusable("memory")
    if reason:
        print(f"== memory-capped comparison skipped: {reason}", file=sys.stderr)
        return {"skipped": reason}
    limit = budget + CAP_SLACK
    print(f"== Accelerate vs meshllm, each process capped at {limit / 2**20:.0f} MiB (cgroup v1)", file=sys.stderr)
    out: dict = {"budget_bytes": budget, "cap_bytes": limit, "tokens": tokens}
    evict(model)  # Accelerate maps the checkpoint itself: pages cached earlier would be charged to another group
    with Cap("acc", memory_bytes=limit) as cap:
        out["accelerate"] = run_accelerate(model, budget, tokens, cap.prefix())
        out["accelerate"]["cgroup_max_usage_bytes"] = cap.max_usage()
    for n in (1, 2):
        with contextlib.ExitStack() as stack:
            caps = [stack.enter_context(Cap(f"dev{i}", memory_bytes=limit)) for i in range(n)]
            r = await run_mesh(model, n, budget, tokens, cache, prefixes=[c.prefix() for c in caps])
            r["cgroup_max_usage_bytes"] = [c.max_usage() for c in caps]
            r["originator_peak_rss_bytes"] = peak_rss_bytes()
        # what any scheduler must read per token under this cap: the share less what the cap leaves beside the
        # runtime; at the read rate this run reached, that takes read_floor_s (an estimate from measured numbers)
        must_read = max(0, max(r["share_bytes"]) - (limit - runtime))
        rate = max(r["storage_bytes_per_token"]) / max(max(r["read_s_per_token"]), 1e-9)
        r.update(must_read_bytes_per_token=must_read, read_rate_bytes_s=rate,
                 read_floor_s=must_read / rate if rate else None)
        out[f"meshllm_N{n}"] = r
        if "token_s" in out["accelerate"]:
            out[f"ttft_reduction_N{n}"] = 1 - r["ttft_s"] / out["accelerate"]["ttft_s"]
            out[f"token_reduction_N{n}"] = 1 - r["token_s"] / out["accelerate"]["token_s"]
    print(f"   {json.dumps({k: v for k, v in out.items() if 'reduction' in k})}", file=sys.stderr)
    return out


def print_tables(out: dict) -> None:
    print(f"\nN=2, {out['model']} bf16, per device (max over devices)")
    print(f"{'budget':>8}{'ms/token':>10}{'TTFT ms':>9}{'peak RSS MiB':>14}{'vs full':>9}{'floor':>7}"
          f"{'resident MiB':>14}{'disk MiB/tok':>14}{'storage MiB/tok':>17}{'stall ms':>10}")
    for r in out["budgets"]:
        print(f"{r['fraction']:>8.1%}{r['token_s']*1e3:>10.1f}{r['ttft_s']*1e3:>9.0f}"
              f"{max(r['peak_rss_bytes'])/2**20:>14.0f}{r['rss_vs_unbudgeted']:>9.0%}"
              f"{r.get('rss_floor_vs_unbudgeted', float('nan')):>7.0%}"
              f"{max(r['resident_weight_bytes'])/2**20:>14.0f}{max(r['disk_bytes_per_token'])/2**20:>14.0f}"
              f"{max(r.get('storage_bytes_per_token', [0]))/2**20:>17.0f}"
              f"{max(r['stall_s_per_token'])*1e3:>10.1f}")
    if "runtime_rss_bytes" in out:
        print(f"floor: the peak RSS of a process that only imported the device runtime "
              f"({out['runtime_rss_bytes'] / 2**20:.0f} MiB) plus the budget, as a share of the unbudgeted peak")
    s = out["slow_disk"]
    print(f"\n25% budget, reads at 200 MB/s: {s['token_s']:.2f} s/token; ideal max(compute, disk) "
          f"{s['ideal_max_s']:.2f} s; compute + disk {s['sum_s']:.2f} s")
    if "accelerate_baseline" not in out:
        return
    b = out["accelerate_baseline"]
    print_comparison(b, f"\nbudget {b['budget_bytes']/2**20:.0f} MiB per device, {b['tokens']} tokens",
                     lambda r: f"peak RSS {max(r['peak_rss_bytes']) / 2**20:.0f} MiB per device")
    if "meshllm_N2_unbudgeted_token_s" in b:
        print(f"{'meshllm N2, no budget':<28}{'':>9}{b['meshllm_N2_unbudgeted_token_s']:>9.2f}"
              f"   (every weight resident, nothing read: no budget can be faster)")


def print_comparison(b: dict, title: str, detail) -> None:
    """Accelerate next to meshllm N=1 and N=2: TTFT, per-token latency, and how much lower meshllm's are."""
    acc = b["accelerate"]
    print(title)
    print(f"{'engine':<28}{'TTFT s':>9}{'s/token':>9}")
    if "token_s" in acc:
        print(f"{'transformers+Accelerate N=1':<28}{acc['ttft_s']:>9.2f}{acc['token_s']:>9.2f}"
              f"   (peak RSS {acc['peak_rss_bytes'] / 2**20:.0f} MiB; placement {', '.join(acc['placement'])})")
    else:
        print(f"transformers+Accelerate failed: {acc.get('error', '')[:300]}")
    for key in ("N1", "N2"):
        r = b[f"meshllm_{key}"]
        red = (f"  ({b[f'ttft_reduction_{key}']:.0%} / {b[f'token_reduction_{key}']:.0%} lower)"
               if f"ttft_reduction_{key}" in b else "")
        print(f"{'meshllm ' + key:<28}{r['ttft_s']:>9.2f}{r['token_s']:>9.2f}{red}   ({detail(r)})")


def print_capped(c: dict) -> None:
    if "skipped" in c:
        print(f"\nmemory-capped comparison skipped: {c['skipped']}")
        return
    print_comparison(c, f"\neach process capped at {c['cap_bytes'] / 2**20:.0f} MiB (budget "
                        f"{c['budget_bytes'] / 2**20:.0f} MiB + {CAP_SLACK / 2**20:.0f} MiB), page cache included, "
                        f"{c['tokens']} tokens",
                     lambda r: f"blocks {max(r['disk_bytes_per_token']) / 2**20:.0f} MiB/token per device, "
                               f"{max(r['storage_bytes_per_token']) / 2**20:.0f} MiB of it from storage at "
                               f"{r['read_rate_bytes_s'] / 1e9:.1f} GB/s; at least "
                               f"{r['must_read_bytes_per_token'] / 2**20:.0f} MiB must be, taking "
                               f"{r['read_floor_s']:.2f} s")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_accelerate":
        accelerate_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--shape", choices=["tinyllama-1.1b", "llama-3b"], default="tinyllama-1.1b")
    ap.add_argument("--no-baseline", action="store_true", help="skip the Accelerate comparison")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "window.json"))
    args = ap.parse_args()
    out = asyncio.run(main_async(args))
    out.update(benchmark="window", command="python scripts/bench_window.py " + " ".join(sys.argv[1:]),
               machine={"cpus": os.cpu_count(), "python": platform.python_version()})
    print_tables(out)
    if "capped_baseline" in out:
        print_capped(out["capped_baseline"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
