"""The planner against measurement on the namespace testbed (root): every candidate plan's predicted decode
ms/token next to its measured one, and the planner's choice next to the fastest measured.

    python scripts/bench_plan.py [--models smollm2,tinyllama] [--tokens 16] [--max-measured 12]

Four `join` devices (one compute thread each) in network namespaces on a bridge; settings: every link +0, +1 and
+5 ms round trip, and one device behind +5 ms with the other three on +0 (a userspace relay in front of a device
delays every connection made to it). Per model and setting: the planner measures the devices and links and ranks
every candidate (single device, tensor parallel over the k strongest, pipelines, hybrids); then each of the top
`--max-measured` candidates (and the best of every kind) is loaded exactly as planned and timed (a warm-up request,
then the median of two greedy requests of --tokens). Models: the embedded SmolLM2-135M (GGUF Q4_1, kept packed) and
a random TinyLlama-1.1B-shaped bf16 checkpoint (scripts/synthetic.py).

Targets (issue 14): the chosen plan within 10% of the fastest measured candidate in every setting; predictions
within 25% of measurement; at +5 ms, SmolLM2 on the mesh no slower than on its best single device.
Prints a table per setting and writes benchmarks/plan.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, write_report  # noqa: E402 (sets the import path first)
from lan_testbed import RELAY_PORT, Testbed, unusable  # noqa: E402

PROMPT = "Tell me about the sea and the ships that sail on it."
SETTINGS = [("+0 ms", [0.0] * 4), ("+1 ms", [1.0] * 4), ("+5 ms", [5.0] * 4), ("one at +5 ms", [0.0, 0.0, 0.0, 5.0])]


def model_path(name: str) -> Path:
    if name == "smollm2":
        from meshllm.model.default import default_model_path

        return Path(default_model_path())
    if name == "tinyllama":
        from synthetic import make_synthetic

        from meshllm.model.default import cache_dir

        return make_synthetic(cache_dir() / "peers" / "tinyllama-1.1b-synthetic")
    raise SystemExit(f"unknown model {name!r}: smollm2 or tinyllama")


def addresses(tb: Testbed, rtts: list[float]) -> list[str]:
    """Where an originator reaches each device: through its relay when its link is delayed."""
    return [f"{d['ip']}:{RELAY_PORT}" if rtt else d["address"] for d, rtt in zip(tb.devices, rtts)]


def pick(cands: list, most: int) -> list:
    """The top `most` candidates by prediction, and the best of every kind (measured whatever its rank)."""
    ok = [c for c in cands if c.plan is not None]
    out = ok[:most]
    for kind in ("single", "tp", "pipeline", "hybrid"):
        best = next((c for c in ok if c.kind == kind), None)
        if best is not None and best not in out:
            out.append(best)
    return out


async def measure(model: Path, where: list[str], secret: bytes, cand, tokens: int) -> dict:
    from meshllm.generation.sampling import SamplingParams
    from meshllm.runtime.mesh import MeshEngine

    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    async with MeshEngine(model, where, secret, layout=cand, threads=1) as m:
        load_s = time.perf_counter() - t0
        await m.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True), chat=False)  # warm-up
        runs = [await m.generate(PROMPT, params, chat=False) for _ in range(2)]
    return {"token_ms": statistics.median(r.token_latency_s for r in runs) * 1e3,
            "ttft_ms": statistics.median(r.ttft_s for r in runs) * 1e3, "load_s": load_s,
            "ids": runs[0].token_ids}


async def setting(model: Path, name: str, rtts: list[float], args, log_dir: Path) -> dict:
    from meshllm.runtime.mesh import MeshEngine

    secret = os.urandom(12).hex()
    async with Testbed(4, secret, rtt_ms=rtts, log_dir=log_dir, threads=1) as tb:
        where = addresses(tb, rtts)
        async with MeshEngine(model, where, secret.encode(), plan="auto", plan_only=True, threads=1) as planner:
            cands, chosen, net = planner.candidates, planner.chosen, planner.network
            origin_ms = planner.origin_s * 1e3
        rows, ids = [], None
        for c in pick(cands, args.max_measured):
            print(f"   {c.label}: predicted {c.prediction.token_s * 1e3:.1f} ms/token ...", file=sys.stderr, end="")
            got = await measure(model, where, secret.encode(), c, args.tokens)
            print(f" measured {got['token_ms']:.1f}", file=sys.stderr)
            same = ids is None or got["ids"] == ids
            ids = ids or got["ids"]
            rows.append({"kind": c.kind, "plan": c.label, "chosen": c is chosen,
                         "predicted": c.prediction.as_dict(), "measured_token_ms": got["token_ms"],
                         "measured_ttft_ms": got["ttft_ms"], "load_s": got["load_s"], "same_ids": same,
                         "error": c.prediction.token_s * 1e3 / got["token_ms"] - 1})
    fastest = min(rows, key=lambda r: r["measured_token_ms"])
    mine = next(r for r in rows if r["chosen"])
    singles = [r for r in rows if r["kind"] == "single"]
    return {"setting": name, "added_rtt_ms": rtts, "origin_ms": origin_ms,
            "origin_rtt_ms": [t * 1e3 for t in net.origin],
            "pair_rtt_ms": [[t * 1e3 for t in row] for row in net.pairs], "candidates": len(cands), "rows": rows,
            "chosen": mine["plan"], "chosen_vs_fastest": mine["measured_token_ms"] / fastest["measured_token_ms"],
            "fastest": fastest["plan"],
            "chosen_vs_best_single": (mine["measured_token_ms"] / min(r["measured_token_ms"] for r in singles)
                                      if singles else None),
            "median_abs_error": statistics.median(abs(r["error"]) for r in rows),
            "same_ids": all(r["same_ids"] for r in rows)}


def print_setting(model: str, s: dict) -> None:
    print(f"\n{model}, {s['setting']} ({s['candidates']} candidates; chosen {s['chosen']}; fastest measured "
          f"{s['fastest']}; chosen/fastest {s['chosen_vs_fastest']:.2f}; ids identical across plans: "
          f"{s['same_ids']})")
    print(f"  {'predicted':>9} {'measured':>9} {'error':>7}  plan")
    for r in s["rows"]:
        print(f"{'*' if r['chosen'] else ' '} {r['predicted']['token_ms']:>9.1f} {r['measured_token_ms']:>9.1f} "
              f"{r['error'] * 100:>6.0f}%  {r['plan']}")


async def main_async(args) -> dict:
    out: dict = {"models": {}}
    with tempfile.TemporaryDirectory(prefix="meshllm-plan-") as tmp:
        for name in args.models:
            model = await asyncio.to_thread(model_path, name)
            out["models"][name] = {"path": str(model), "settings": []}
            for label, rtts in SETTINGS:
                if args.settings and label not in args.settings:
                    continue
                print(f"== {name}, {label}", file=sys.stderr)
                s = await setting(model, label, rtts, args, Path(tmp) / name)
                out["models"][name]["settings"].append(s)
                print_setting(name, s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,tinyllama")
    ap.add_argument("--settings", default="", help="only these settings (comma-separated labels)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--max-measured", type=int, default=8, help="measure this many of the top candidates")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "plan.json"))
    args = ap.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.settings = [s for s in args.settings.split(",") if s]
    reason = unusable()
    if reason:
        sys.exit(f"bench_plan: {reason}")
    out = asyncio.run(main_async(args))
    write_report(out, "plan", args.out)


if __name__ == "__main__":
    main()
