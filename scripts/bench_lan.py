"""LAN benchmark on the namespace testbed (root): time to a ready mesh, and decode latency over slow links.

    python scripts/bench_lan.py [--devices 4] [--rtts 1,5] [--tokens 16] [--model PATH]

1. Bring-up: an app waits in `Mesh(min_devices=4)` while 4 `join` processes start in their namespaces; the time
   from the last `join` starting to the mesh being ready (discovered, planned, shards loaded), split into what
   came before the devices were found (process start, probe cache, mDNS) and after (links, load). Twice: slice
   caches cold (first run: shards streamed to the devices), then warm.
2. Decode: per-token latency with every link delayed by a userspace relay (1 ms and 5 ms round trips), next to
   the floor 2L x RTT (one allreduce round trip per attention and per MLP of each of the L layers), and with no
   added delay. Link round trips are measured with pings through the same relays.
Writes benchmarks/lan.json. The default model is the embedded SmolLM2-135M (30 layers).
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
from lan_testbed import Testbed, unusable  # noqa: E402


async def bring_up(model: Path, devices: int, log_dir: Path, secret: str) -> dict:
    """Start the app first, then the devices; time from the last join start to Mesh ready."""
    from meshllm import Mesh

    tb = Testbed(devices, secret, log_dir=log_dir, start=False)
    async with tb:
        mesh = Mesh(model, secret=secret, min_devices=devices, timeout=60, interface=tb.host_ip)
        enter = asyncio.ensure_future(mesh.__aenter__())
        await asyncio.sleep(0.5)  # the app is up and browsing
        await tb.start()
        await enter
        ready_at = time.perf_counter()
        try:
            out = await mesh.generate("Hi", max_tokens=2)
            assert out.token_ids, "no tokens"
        finally:
            await mesh.aclose()
        last = max(tb.started_at)
        return {"ready_after_last_join_s": ready_at - last,
                "join_ready_s": [d["ready_s"] for d in tb.devices],
                "app_load_s": mesh.ready_s}


async def ping_rtt(address: str, secret: bytes) -> float:
    from meshllm.discovery.status import link_rtt

    return await link_rtt(address, secret, 5.0)


async def decode(model: Path, devices: int, rtt_ms: float, tokens: int, log_dir: Path, secret: str,
                 reps: int) -> dict:
    from meshllm import Mesh

    async with Testbed(devices, secret, rtt_ms=rtt_ms, log_dir=log_dir) as tb:
        async with Mesh(model, secret=secret, min_devices=devices, timeout=60, interface=tb.host_ip) as m:
            rtts = [await ping_rtt(d["address"], secret.encode()) for d in m.devices]
            await m.generate("Hello", max_tokens=2)  # warm-up
            lat, ttft = [], []
            for _ in range(reps):
                r = await m.generate("Tell me about the sea.", max_tokens=tokens, ignore_eos=True)
                lat.append(r.token_latency_s)
                ttft.append(r.ttft_s)
            layers = m._engine.config.num_layers
    link = statistics.median(rtts)
    return {"rtt_ms_added": rtt_ms, "link_rtt_ms": [x * 1e3 for x in rtts], "layers": layers,
            "token_s": statistics.median(lat), "token_s_runs": lat, "ttft_s": statistics.median(ttft),
            "floor_s": 2 * layers * link, "floor_added_s": 2 * layers * rtt_ms / 1e3}


async def main_async(args) -> dict:
    from meshllm.model.default import default_model_path

    model = Path(args.model) if args.model else await asyncio.to_thread(default_model_path)
    secret = os.urandom(12).hex()
    out: dict = {"devices": args.devices, "model": str(model)}
    with tempfile.TemporaryDirectory(prefix="meshllm-lan-") as tmp:
        print(f"== bring-up, {args.devices} devices", file=sys.stderr)
        runs = []
        for kind in ("cold", "warm"):
            r = await bring_up(model, args.devices, Path(tmp), secret)
            r["cache"] = kind
            runs.append(r)
            print(f"   {kind}: ready {r['ready_after_last_join_s']:.2f} s after the last join started "
                  f"(join processes ready in {max(r['join_ready_s']):.2f} s)", file=sys.stderr)
        out["bring_up"] = runs
        out["decode"] = []
        for rtt in [0.0, *args.rtts]:
            print(f"== decode, links +{rtt} ms round trip", file=sys.stderr)
            r = await decode(model, args.devices, rtt, args.tokens, Path(tmp), secret, args.reps)
            out["decode"].append(r)
            print(f"   {r['token_s'] * 1e3:.1f} ms/token; floor 2L x RTT {r['floor_s'] * 1e3:.1f} ms "
                  f"(link RTT {statistics.median(r['link_rtt_ms']):.2f} ms)", file=sys.stderr)
    return out


def print_tables(out: dict) -> None:
    print(f"\n{out['devices']} devices in network namespaces on a bridge ({Path(out['model']).name})")
    print(f"{'caches':<8}{'ready after last join s':>25}{'join process ready s':>22}")
    for r in out["bring_up"]:
        print(f"{r['cache']:<8}{r['ready_after_last_join_s']:>25.2f}{max(r['join_ready_s']):>22.2f}")
    print(f"\n{'added RTT ms':>12}{'link RTT ms':>13}{'ms/token':>10}{'floor 2L x RTT ms':>19}{'vs floor':>10}"
          f"{'TTFT ms':>9}")
    for r in out["decode"]:
        rtt = statistics.median(r["link_rtt_ms"])
        print(f"{r['rtt_ms_added']:>12.1f}{rtt:>13.2f}{r['token_s'] * 1e3:>10.1f}{r['floor_s'] * 1e3:>19.1f}"
              f"{r['token_s'] / r['floor_s']:>10.2f}{r['ttft_s'] * 1e3:>9.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--rtts", default="1,5", help="added link round trips to measure, ms (comma-separated)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "lan.json"))
    args = ap.parse_args()
    args.rtts = [float(x) for x in args.rtts.split(",") if x]
    reason = unusable()
    if reason:
        sys.exit(f"bench_lan: {reason}")
    out = asyncio.run(main_async(args))
    print_tables(out)
    write_report(out, "lan", args.out)


if __name__ == "__main__":
    main()
