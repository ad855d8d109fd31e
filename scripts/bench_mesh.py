"""Mesh benchmark, in one run: allreduce rounds (ours vs gloo), decode at N = 1, 2, 4 with a per-token breakdown,
and decode with devices pinned to one core each (N=2 vs N=1).

    python scripts/bench_mesh.py [--quick] [--only allreduce|decode|pinned]

allreduce: N processes on loopback, one member each; a round's latency is timed on rank 1 (a non-hub worker for
our star), median and p99 over rounds; the wire floor is a plain-socket ping-pong of the same payload, so
"overhead" = our N=2 round - that round trip; "seal AEAD" = what the AEAD adds to the two hops on a round's critical
path at N=2 (a worker's part up, the sum down) in a warm loop in one process: one hop sealed against the same hop
with the AEAD replaced by a no-op of the same frame size, interleaved, best median of each; "seal live" = the
median paired difference of live N=2 rounds, sealed against the same no-op (interleaved runs): the real cost. decode: `LocalCluster` + `MeshEngine`, 32-token prompt, greedy; the
breakdown comes from each device's counters, with a prefill-only request subtracted. Writes
benchmarks/mesh.json. The machine is shared and has 2 cores: N > 2 processes time-share them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import ROOT, measured_request, prompt_ids  # noqa: E402 (sets the import path first)

SECRET = b"bench-mesh-secret"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# -- members (run in child processes) -------------------------------------------------------------------------

class _ClearSealer:
    """Measurement control only (never in meshllm): frames the size sealed ones have, without the AEAD."""

    def __init__(self, cipher: str, key: bytes) -> None:
        pass

    def seal(self, header: bytes, body: bytes) -> bytes:
        return body + bytes(16)

    def frame(self, header: bytes, body: bytes) -> bytes:
        return header + body + bytes(16)

    def open(self, header: bytes, sealed) -> bytes:
        return bytes(sealed[:-16])


async def _star_member(rank: int, world: int, port: int, nbytes: int, rounds: int, clear: bool = False) -> None:
    import torch

    if clear:  # the measurement control: the same frames, the AEAD replaced by a no-op
        import meshllm.wire.connection as conn

        conn.Sealer = conn.Opener = _ClearSealer

    from meshllm.collectives.group import StarGroup

    torch.set_num_threads(1)
    async with StarGroup(rank, world, SECRET, port=port) as g:
        if rank == 0:
            print(f"PORT {g.port}", flush=True)
        await g.start(60)
        t = torch.randn(1, 1, nbytes // 4)
        lat = []
        for i in range(rounds):
            t0 = time.perf_counter()
            await g((1, i, 0, 0), t)
            lat.append(time.perf_counter() - t0)
        await asyncio.sleep(0.2)  # let the hub's last sums drain before links close
    print(json.dumps({"rank": rank, "lat": lat}), flush=True)


def _gloo_member(rank: int, world: int, port: int, nbytes: int, rounds: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    t = torch.randn(nbytes // 4)
    lat = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        dist.all_reduce(t)
        lat.append(time.perf_counter() - t0)
    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps({"rank": rank, "lat": lat}), flush=True)


def _pingpong_member(rank: int, port: int, nbytes: int, rounds: int) -> None:
    payload = b"x" * nbytes
    if rank == 0:
        srv = socket.create_server(("127.0.0.1", port))
        print("PORT", srv.getsockname()[1], flush=True)
        s, _ = srv.accept()
    else:
        s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def recv_exact(n: int) -> None:
        got = 0
        while got < n:
            chunk = s.recv(n - got)
            if not chunk:
                raise SystemExit("peer closed")
            got += len(chunk)

    lat = []
    for _ in range(rounds):
        if rank == 1:
            t0 = time.perf_counter()
            s.sendall(payload)
            recv_exact(nbytes)
            lat.append(time.perf_counter() - t0)
        else:
            recv_exact(nbytes)
            s.sendall(payload)
    s.close()
    print(json.dumps({"rank": rank, "lat": lat}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(kind: str, world: int, nbytes: int, rounds: int) -> list[float]:
    """Start `world` member processes; return rank 1's round latencies."""
    me = [sys.executable, __file__, "--_member", kind]
    procs = []
    port = _free_port()
    if kind in ("star", "star-clear", "pingpong"):
        hub = subprocess.Popen(me + ["0", str(world), "0", str(nbytes), str(rounds)], stdout=subprocess.PIPE, text=True)
        port = int(hub.stdout.readline().split()[1])
        procs.append(hub)
        ranks = range(1, world)
    else:
        ranks = range(world)
    for r in ranks:
        procs.append(subprocess.Popen(me + [str(r), str(world), str(port), str(nbytes), str(rounds)],
                                      stdout=subprocess.PIPE, text=True))
    results = {}
    for p in procs:
        out, _ = p.communicate(timeout=300)
        for line in out.splitlines():
            if line.startswith("{"):
                d = json.loads(line)
                results[d["rank"]] = d["lat"]
        if p.returncode:
            raise SystemExit(f"{kind} member failed with {p.returncode}")
    return results[1]


def _ready_pair():
    from meshllm.wire.connection import Connection

    a = Connection(SECRET, "a", os.urandom(32), initiator=True)
    b = Connection(SECRET, "b", os.urandom(32), initiator=False)
    a.start()
    b.start()
    for _ in range(3):
        for src, dst in ((a, b), (b, a)):
            data = src.data_to_send()
            if data:
                dst.receive_data(data)
    return a, b


def seal_cost(nbytes: int, n: int = 3000, reps: int = 5) -> dict:
    """One hop of a `part` frame (encode + seal on one side, open + decode on the other), in process, sealed and
    with the AEAD replaced by a no-op of the same frame size, interleaved: the best median of each."""
    import meshllm.wire.connection as conn
    from meshllm.wire.frames import tensor_record

    real = conn.Sealer, conn.Opener
    msg = {"t": "part", "req": 1, "step": 0, "layer": 0, "phase": 0, "rank": 1,
           "x": tensor_record("float32", [1, 1, nbytes // 4], os.urandom(nbytes))}

    def hop() -> float:
        a, b = _ready_pair()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            b.receive_data(a.encode(msg))
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e6

    sealed, clear = [], []
    try:
        for _ in range(reps):
            conn.Sealer, conn.Opener = real
            sealed.append(hop())
            conn.Sealer = conn.Opener = _ClearSealer
            clear.append(hop())
    finally:
        conn.Sealer, conn.Opener = real
    return {"hop_sealed_us": min(sealed), "hop_clear_us": min(clear), "per_hop_us": min(sealed) - min(clear)}


def bench_allreduce(args) -> list[dict]:
    rows = []
    rounds, warm = (150, 20) if args.quick else (600, 50)
    sizes = [2048, 8192, 32768]
    print("\n== allreduce round latency (rank 1), loopback", file=sys.stderr)
    wire = {}
    for nbytes in sizes:
        lat = _run_group("pingpong", 2, nbytes, rounds)[warm:]
        wire[nbytes] = statistics.median(lat)
    sealing = {n: seal_cost(n)["per_hop_us"] for n in sizes}
    live = {}
    for nbytes in sizes:
        # sealed and unsealed N=2 rounds, interleaved: the median of the paired differences is what sealing adds
        # to a live round (cold caches between rounds make each AEAD call dearer than in a warm loop)
        diffs = []
        for _ in range(3 if args.quick else 5):
            sealed = statistics.median(_run_group("star", 2, nbytes, rounds)[warm:])
            clear = statistics.median(_run_group("star-clear", 2, nbytes, rounds)[warm:])
            diffs.append(sealed - clear)
        live[nbytes] = statistics.median(diffs) * 1e6
    for world in (2, 4, 8):
        for nbytes in sizes:
            ours = _run_group("star", world, nbytes, rounds)[warm:]
            gloo = _run_group("gloo", world, nbytes, rounds)[warm:]
            row = {"N": world, "payload_bytes": nbytes,
                   "star_p50_us": statistics.median(ours) * 1e6, "star_p99_us": pct(ours, 0.99) * 1e6,
                   "sealing_us": 2 * sealing[nbytes], "sealing_live_us": live[nbytes],
                   "gloo_p50_us": statistics.median(gloo) * 1e6, "gloo_p99_us": pct(gloo, 0.99) * 1e6,
                   "tcp_pingpong_p50_us": wire[nbytes] * 1e6}
            row["star_vs_gloo"] = row["star_p50_us"] / row["gloo_p50_us"]
            if world == 2:
                row["software_overhead_us"] = row["star_p50_us"] - row["tcp_pingpong_p50_us"]
            rows.append(row)
            print(f"   N={world} {nbytes:>6} B: star {row['star_p50_us']:7.1f} us  gloo {row['gloo_p50_us']:7.1f} us"
                  f"  (tcp ping-pong {row['tcp_pingpong_p50_us']:.1f} us)", file=sys.stderr)
    return rows


# -- decode ------------------------------------------------------------------------------------------------

def _models(args) -> list[tuple[str, Path, str | None]]:
    from meshllm.model.default import cache_dir, default_model_path

    out = [("smollm2-135m", default_model_path(), None)]
    if not args.quick:
        from synthetic import make_synthetic

        out.append(("tinyllama-1.1b", make_synthetic(cache_dir() / "bench" / "tinyllama-1.1b-random-bf16"),
                    "bfloat16"))
    return out


async def _decode_one(model: Path, dtype, n: int, *, pin: bool, reps: int, new_tokens: int) -> dict:
    from meshllm.runtime.launcher import LocalCluster
    from meshllm.runtime.mesh import MeshEngine, local_secret

    secret = local_secret()
    threads = 1 if pin else None
    cpus = list(range(os.cpu_count())) if pin else None
    async with LocalCluster(n, secret, pin=pin, threads=threads, cpus=cpus) as addresses:
        async with MeshEngine(model, addresses, secret, dtype=dtype, threads=threads) as mesh:
            ids = prompt_ids(mesh.config.vocab_size, 32)

            def run(tokens: int):
                return measured_request(mesh, ids, tokens, ("compute_s", "allreduce_wait_s", "framing_s", "reduce_s",
                                                            "rounds", "steps"))

            await run(4)  # warm-up
            lat, ttft, prefill_stats, decode_stats = [], [], None, None
            for _ in range(reps):
                _, prefill_stats = await run(1)
                result, full = await run(new_tokens)
                lat.append(result.token_latency_s)
                ttft.append(result.ttft_s)
                decode_stats = [{k: (f[k] - p[k]) / (new_tokens - 1) for k in f} for f, p in zip(full, prefill_stats)]
            devices = await mesh.devices()
    token_s = statistics.median(lat)
    compute = statistics.mean(d["compute_s"] for d in decode_stats)
    wait = statistics.mean(d["allreduce_wait_s"] for d in decode_stats)
    framing = statistics.mean(d["framing_s"] for d in decode_stats)
    return {"N": n, "pinned": pin, "token_s": token_s, "ttft_s": statistics.median(ttft),
            "compute_s_per_token": compute, "allreduce_wait_s_per_token": wait, "framing_s_per_token": framing,
            "rounds_per_token": statistics.mean(d["rounds"] for d in decode_stats),
            "peak_rss_bytes": [d["peak_rss_bytes"] for d in devices]}


def bench_decode(args, pinned: bool) -> list[dict]:
    rows = []
    reps = 2 if args.quick else 3
    counts = (1, 2) if pinned else (1, 2, 4)
    for name, path, dtype in _models(args):
        print(f"\n== decode {name}{' (pinned, one core per device)' if pinned else ''}", file=sys.stderr)
        if pinned:
            # the originator shares core 0 with device 0 in both runs, so N=1 really is one core
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        for n in counts:
            row = asyncio.run(_decode_one(path, dtype, n, pin=pinned, reps=reps, new_tokens=16 if args.quick else 32))
            row["model"] = name
            rows.append(row)
            print(f"   N={n}: {row['token_s']*1e3:7.1f} ms/token (compute {row['compute_s_per_token']*1e3:.1f}, "
                  f"allreduce wait {row['allreduce_wait_s_per_token']*1e3:.1f}, framing "
                  f"{row['framing_s_per_token']*1e3:.2f} ms)", file=sys.stderr)
    return rows


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--_member":
        kind, *rest = sys.argv[2:]
        vals = [int(v) for v in rest]
        if kind in ("star", "star-clear"):
            asyncio.run(_star_member(*vals, clear=kind == "star-clear"))
        elif kind == "gloo":
            _gloo_member(*vals)
        else:
            _pingpong_member(vals[0], vals[2], vals[3], vals[4])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds, SmolLM2 only")
    ap.add_argument("--only", choices=["allreduce", "decode", "pinned"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "mesh.json"))
    args = ap.parse_args()
    out = {"benchmark": "mesh", "command": "python scripts/bench_mesh.py " + " ".join(sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    if args.only in (None, "allreduce"):
        out["allreduce"] = bench_allreduce(args)
    if args.only in (None, "decode"):
        out["decode"] = bench_decode(args, pinned=False)
    if args.only in (None, "pinned"):
        out["decode_pinned"] = bench_decode(args, pinned=True)
    print_tables(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cmd = out.pop("command")
    out["commands"] = {k: cmd for k in ("allreduce", "decode", "decode_pinned") if k in out}
    if Path(args.out).exists() and args.only:
        old = json.loads(Path(args.out).read_text())
        old.pop("command", None)
        out["commands"] = {**old.get("commands", {}), **out["commands"]}
        old.update(out)
        out = old
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def print_tables(out: dict) -> None:
    if "allreduce" in out:
        print("\nallreduce round latency on loopback (rank 1, microseconds)")
        print(f"{'N':>3}{'payload':>9}{'star p50':>10}{'p99':>9}{'gloo p50':>10}{'p99':>9}{'star/gloo':>11}"
              f"{'tcp rtt':>9}{'overhead':>10}{'seal AEAD':>10}{'seal live':>10}")
        for r in out["allreduce"]:
            ov = f"{r['software_overhead_us']:10.1f}" if "software_overhead_us" in r else f"{'':>10}"
            print(f"{r['N']:>3}{r['payload_bytes']:>9}{r['star_p50_us']:>10.1f}{r['star_p99_us']:>9.1f}"
                  f"{r['gloo_p50_us']:>10.1f}{r['gloo_p99_us']:>9.1f}{r['star_vs_gloo']:>11.2f}"
                  f"{r['tcp_pingpong_p50_us']:>9.1f}{ov}{r.get('sealing_us', float('nan')):>10.1f}"
                  f"{r.get('sealing_live_us', float('nan')):>10.1f}")
    for key, title in (("decode", "decode (ms per token)"), ("decode_pinned", "decode, one core per device (ms)")):
        if key not in out:
            continue
        print(f"\n{title}")
        print(f"{'model':<16}{'N':>3}{'token':>9}{'TTFT':>9}{'compute':>9}{'ar wait':>9}{'framing':>9}{'rounds':>8}")
        for r in out[key]:
            print(f"{r['model']:<16}{r['N']:>3}{r['token_s']*1e3:>9.1f}{r['ttft_s']*1e3:>9.1f}"
                  f"{r['compute_s_per_token']*1e3:>9.1f}{r['allreduce_wait_s_per_token']*1e3:>9.2f}"
                  f"{r['framing_s_per_token']*1e3:>9.3f}{r['rounds_per_token']:>8.0f}")


if __name__ == "__main__":
    main()
