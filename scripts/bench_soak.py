"""Soak: requests through `Mesh` on three discovered devices, one device killed (SIGKILL) and restarted every
`--every` requests. Every request must complete with the ids of one process holding the whole model (resumed
when its device died under it); the originator's RSS and open descriptors, and each device's, must stay flat.

    python scripts/bench_soak.py [--requests 1000] [--every 100]

Prints a table per round of `--every` requests and writes benchmarks/soak.json. Bounds (stated here, checked at
the end): after the first round, RSS may grow at most 64 MiB and open descriptors at most 16, on the originator,
and on each device over each of its lives (between restarts) seen at two rounds or more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

from benchlib import ROOT  # noqa: E402 (sets the import path first)
from synthetic import make_synthetic  # noqa: E402

RSS_BOUND = 64 << 20
FD_BOUND = 16
PROMPTS = ["The mesh", "A device was lost and", "Tokens flow through", "Once upon a time", "Resume from here"]
LOOPBACK = "127.0.0.1"


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def join(name: str, secret: str, cache: Path, score: float) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshllm", "join", "--interface", LOOPBACK, "--name", name, "--threads", "1",
        "--port", "0", "--cache-dir", str(cache), "--score", str(score), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "MESHLLM_SECRET": secret})
    line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
    if "ready" not in line:
        raise SystemExit(f"device {name} did not start: {line!r}")
    return proc


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "soak.json"))
    args = ap.parse_args()

    from meshllm import LocalEngine, Mesh
    from meshllm.generation.sampling import SamplingParams
    from meshllm.net.link import Timeouts
    from meshllm.runtime.mesh import local_secret

    cache = Path(os.environ.get("MESHLLM_HOME", Path.home() / ".cache" / "meshllm")) / "soak"
    import torch

    # fp32: the reference (one process) and the mesh (any split) compute the same ids, not bf16 near-ties
    model = make_synthetic(cache / "model-fp32", "soak-small", dtype=torch.float32)
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    async with LocalEngine(model) as engine:
        expected = {p: (await engine.generate(p, params, chat=False)).token_ids for p in PROMPTS}
    secret = local_secret().decode()
    names = ["soak-a", "soak-b", "soak-c"]
    procs = {n: await join(n, secret, cache / f"dev-{n}", 3.0 - i) for i, n in enumerate(names)}
    rows, failures = [], []
    me = os.getpid()
    try:
        async with Mesh(model, secret=secret, min_devices=3, timeout=30, interface=LOOPBACK,
                        timeouts=Timeouts(silence=3.0, beat=1.0)) as m:
            t_round, lat = time.perf_counter(), []
            for i in range(args.requests):
                kill = None
                if i and i % args.every == 0:
                    victim = names[(i // args.every) % 3]
                    # killed 20 ms into this request: it resumes over the two left
                    kill = asyncio.get_running_loop().call_later(0.02, procs[victim].send_signal, signal.SIGKILL)
                    kill_at = i
                prompt = PROMPTS[i % len(PROMPTS)]
                t0 = time.perf_counter()
                try:
                    result = await m.generate(prompt, max_tokens=args.tokens, ignore_eos=True, chat=False)
                    if result.token_ids != expected[prompt]:
                        failures.append({"request": i, "why": "different ids"})
                except Exception as e:  # noqa: BLE001 (counted and reported: the soak must not stop)
                    failures.append({"request": i, "why": f"{type(e).__name__}: {e}"})
                lat.append(time.perf_counter() - t0)
                if kill is not None and i == kill_at:
                    kill.cancel()
                    if procs[victim].returncode is None:
                        procs[victim].send_signal(signal.SIGKILL)  # the request beat the timer: kill it now
                    await procs[victim].wait()
                    # restart it (it rejoins by mDNS: the next requests plan with it again)
                    procs[victim] = await join(victim, secret, cache / f"dev-{victim}", 1.0)
                if (i + 1) % args.every == 0:
                    alive = {n: p.pid for n, p in procs.items() if p.returncode is None}
                    row = {"requests": i + 1, "seconds": time.perf_counter() - t_round,
                           "median_ms": statistics.median(lat) * 1e3, "max_ms": max(lat) * 1e3,
                           "devices_in_plan": len(m.devices), "failures": len(failures),
                           "originator_rss": rss(me), "originator_fds": fds(me),
                           "device_rss": {n: rss(pid) for n, pid in alive.items()},
                           "device_fds": {n: fds(pid) for n, pid in alive.items()},
                           "device_pids": alive}
                    rows.append(row)
                    print(f"{row['requests']:>6} requests  {row['median_ms']:7.1f} ms median  {row['max_ms']:8.1f} "
                          f"ms max  plan {row['devices_in_plan']}  failures {row['failures']}  originator "
                          f"{row['originator_rss'] >> 20} MiB / {row['originator_fds']} fds  devices "
                          + " ".join(f"{n}:{row['device_rss'][n] >> 20}MiB/{row['device_fds'][n]}"
                                     for n in row["device_rss"]), flush=True)
                    t_round, lat = time.perf_counter(), []
    finally:
        for p in procs.values():
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            await p.wait()

    first, last = rows[0], rows[-1]
    checks = {"originator_rss_growth": last["originator_rss"] - first["originator_rss"],
              "originator_fd_growth": last["originator_fds"] - first["originator_fds"]}
    for n in names:  # each life of each device (between its restarts) seen at two rounds or more
        lives: dict[int, list[dict]] = {}
        for r in rows:
            if n in r["device_pids"]:
                lives.setdefault(r["device_pids"][n], []).append(r)
        for pid, seen in lives.items():
            if len(seen) > 1:
                checks[f"{n}[{pid}]_rss_growth"] = seen[-1]["device_rss"][n] - seen[0]["device_rss"][n]
                checks[f"{n}[{pid}]_fd_growth"] = seen[-1]["device_fds"][n] - seen[0]["device_fds"][n]
    ok = not failures and all(v <= (RSS_BOUND if k.endswith("rss_growth") else FD_BOUND) for k, v in checks.items())
    out = {"benchmark": "soak", "command": "python scripts/bench_soak.py " + " ".join(sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "requests": args.requests, "kill_every": args.every, "tokens": args.tokens,
           "bounds": {"rss_bytes": RSS_BOUND, "fds": FD_BOUND}, "growth": checks, "failures": failures,
           "passed": ok, "rounds": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'PASSED' if ok else 'FAILED'}: {len(failures)} failed requests; growth after the first round: "
          + ", ".join(f"{k} {v}" for k, v in checks.items()) + f"\nwrote {args.out}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    asyncio.run(main())
