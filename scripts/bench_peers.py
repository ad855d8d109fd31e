"""meshllm next to llama.cpp on the same GGUF files, the same thread counts, in one run.

    python scripts/bench_peers.py [--threads 1,2] [--tokens 48] [--prompt 128] [--reps 3] [--only smollm2,1b,rpc]

- llama.cpp is built once from the source vendored in the `llama-cpp-python` sdist (pip download, cmake with the RPC
  backend) under <cache>/peers/, and run with `llama-bench` (per-token from its tg test, TTFT from its pp test).
- Models: SmolLM2-135M Q4_1 (meshllm's default file); a TinyLlama-1.1B-shaped random checkpoint
  (scripts/synthetic.py), converted with llama.cpp's convert_hf_to_gguf.py and quantized with llama-quantize to
  Q4_0 and Q8_0; and that Q4_0 file on 2 devices of 1 thread: llama.cpp's RPC backend (two rpc-servers on loopback)
  against a meshllm mesh of 2 local devices.
- meshllm runs each case in a child process (its own threads and peak RSS): greedy decode of `--tokens` after a
  `--prompt`-token prompt, per-token median; TTFT of the prompt.
- Reps interleave llama.cpp and meshllm (the machine is shared and noisy: medians, and ratios of medians).
Prints a table and writes benchmarks/peers.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchlib import ROOT, prompt_ids  # noqa: E402 (sets the import path first)

from meshllm.model.default import cache_dir, default_model_path  # noqa: E402

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
TARGETS = ["llama-bench", "ggml-rpc-server", "llama-quantize"]


def peers_dir() -> Path:
    d = cache_dir() / "peers"
    d.mkdir(parents=True, exist_ok=True)
    return d


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("  $", " ".join(map(str, cmd))[:200], file=sys.stderr, flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def llama_cpp() -> Path:
    """llama.cpp's source folder with its tools built in build/bin (built once, cached)."""
    root = peers_dir()
    src = next(root.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if src is None:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PYTHON,
             "-d", root])
        sdist = next(root.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as t:
            t.extractall(root, filter="data")
        src = next(root.glob("llama_cpp_python-*/vendor/llama.cpp"))
    bench = src / "build" / "bin" / "llama-bench"
    if not bench.exists():
        build(src, [])
        if not _runs(bench, default_model_path()):
            # some VMs advertise AMX but fault on it (SIGILL): build for this CPU without the AMX tiles
            print("llama.cpp's native build dies on this CPU (AMX not usable here): rebuilding without AMX",
                  file=sys.stderr)
            shutil.rmtree(src / "build")
            build(src, ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"])
    return src


def build(src: Path, flags: list[str]) -> None:
    extra = [f"-DCMAKE_C_FLAGS={' '.join(flags)}", f"-DCMAKE_CXX_FLAGS={' '.join(flags)}"] if flags else []
    run(["cmake", "-S", src, "-B", src / "build", "-G", "Ninja", "-DGGML_RPC=ON", "-DLLAMA_CURL=OFF",
         "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", *extra],
        stdout=subprocess.DEVNULL)
    run(["cmake", "--build", src / "build", "-j", str(os.cpu_count() or 2), "--target", *TARGETS],
        stdout=subprocess.DEVNULL)


def _runs(bench: Path, model: Path) -> bool:
    p = subprocess.run([bench, "-m", model, "-t", "1", "-p", "8", "-n", "4", "-r", "1"], capture_output=True)
    return p.returncode == 0


def models(src: Path, only: set[str]) -> dict[str, Path]:
    """The GGUF files compared: name -> path."""
    out = {"smollm2-q4_1": default_model_path()}
    if not only & {"1b", "rpc"}:
        return out
    from synthetic import make_synthetic

    folder = make_synthetic(peers_dir() / "tinyllama-1.1b-synthetic")
    f16 = peers_dir() / "tinyllama-1.1b-f16.gguf"
    if not f16.exists():
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        run([sys.executable, src / "convert_hf_to_gguf.py", folder, "--outfile", f16, "--outtype", "f16"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for q in ("Q4_0", "Q8_0"):
        path = peers_dir() / f"tinyllama-1.1b-{q.lower()}.gguf"
        if not path.exists():
            run([src / "build" / "bin" / "llama-quantize", f16, path, q], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        out[f"1.1b-{q.lower()}"] = path
    return out


def llama_bench(src: Path, model: Path, threads: int, prompt: int, tokens: int,
                rpc: list[str] | None = None) -> dict:
    cmd = [src / "build" / "bin" / "llama-bench", "-m", model, "-t", threads, "-p", prompt, "-n", tokens, "-r", "1",
           "-o", "json"]
    if rpc:
        cmd += ["--rpc", ",".join(rpc), "-ngl", "99"]
    p = subprocess.run([str(c) for c in cmd], capture_output=True)
    if p.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {p.stderr.decode()[-400:]}")
    rows = json.loads(p.stdout)
    pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] > 0)
    return {"token_s": 1 / tg["avg_ts"], "ttft_s": prompt / pp["avg_ts"]}


def llama_rss(src: Path, model: Path, threads: int) -> int:
    """llama.cpp's peak RSS running this model (its own process: llama-bench's tg test alone)."""
    _, rss = _isolated_rss([src / "build" / "bin" / "llama-bench", "-m", model, "-t", threads, "-p", "0", "-n", "16",
                            "-r", "1"])
    return rss


def _isolated_rss(cmd: list) -> tuple[int, int]:
    """(exit code, peak RSS) of a command run as the only child of a fresh Python (a child's peak RSS is known to
    its parent only as the largest of all its children's)."""
    code = ("import resource,subprocess,sys,json; p=subprocess.run(sys.argv[1:],capture_output=True); "
            "print(json.dumps([p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024]))")
    out = subprocess.run([sys.executable, "-c", code, *map(str, cmd)], capture_output=True, text=True, check=True)
    rc, rss = json.loads(out.stdout)
    return rc, rss


def meshllm_child(model: str, threads: int, prompt: int, tokens: int, devices: int) -> None:
    """In a child process: one measured greedy request; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    from meshllm.discovery.probe import proc_kib
    from meshllm.generation.loop import Result, generate
    from meshllm.generation.sampling import SamplingParams
    from meshllm.runtime.launcher import LocalCluster
    from meshllm.runtime.local import LocalEngine
    from meshllm.runtime.mesh import MeshEngine, local_secret

    async def request(engine, ids: list[int], n: int) -> Result:
        result = Result()
        async for _ in generate(engine, engine.tokenizer, ids, SamplingParams(max_tokens=n, ignore_eos=True), result):
            pass
        return result

    async def main() -> dict:
        if devices == 1:
            async with LocalEngine(model, threads=threads) as e:
                ids = prompt_ids(e.config.vocab_size, prompt)
                await request(e, ids[:8], 4)  # warm up
                result = await request(e, ids, tokens)
                return {"token_s": result.token_latency_s, "ttft_s": result.ttft_s,
                        "peak_rss_bytes": proc_kib("/proc/self/status", "VmHWM"), "weight_format": str(e.format),
                        "weight_bytes": e.weight_bytes()}
        secret = local_secret()
        cluster = LocalCluster(devices, secret, threads=threads)
        async with cluster as addresses, MeshEngine(model, addresses, secret, threads=threads) as m:
            ids = prompt_ids(m.config.vocab_size, prompt)
            await request(m, ids[:8], 4)
            result = await request(m, ids, tokens)
            devs = await m.devices()
            return {"token_s": result.token_latency_s, "ttft_s": result.ttft_s,
                    "peak_rss_bytes": max(d["peak_rss_bytes"] for d in devs[1:]),
                    "originator_peak_rss_bytes": devs[0]["peak_rss_bytes"], "weight_format": str(m.format)}

    print(json.dumps(asyncio.run(main())))


def meshllm_run(model: Path, threads: int, prompt: int, tokens: int, devices: int = 1) -> dict:
    p = subprocess.run([sys.executable, __file__, "--_child", str(model), str(threads), str(prompt), str(tokens),
                        str(devices)], capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"meshllm failed: {p.stderr[-800:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


class RpcServers:
    """llama.cpp's rpc-server, one per port, one thread each, on loopback."""

    def __init__(self, src: Path, n: int, base_port: int = 50152) -> None:
        self.cmds = [[src / "build" / "bin" / "ggml-rpc-server", "-H", "127.0.0.1", "-p", str(base_port + i),
                      "-t", "1"] for i in range(n)]
        self.addresses = [f"127.0.0.1:{base_port + i}" for i in range(n)]
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> list[str]:
        for cmd in self.cmds:
            self.procs.append(subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        return self.addresses

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def measure(name: str, model: Path, src: Path, threads: int, args, devices: int = 1) -> dict:
    ours, theirs = [], []
    for rep in range(args.reps):
        if devices == 1:
            theirs.append(llama_bench(src, model, threads, args.prompt, args.tokens))
        else:
            with RpcServers(src, devices) as rpc:
                theirs.append(llama_bench(src, model, threads, args.prompt, args.tokens, rpc))
        ours.append(meshllm_run(model, threads, args.prompt, args.tokens, devices))
        print(f"   {name} t={threads} N={devices} rep {rep}: llama.cpp {theirs[-1]['token_s'] * 1e3:.1f} ms/token, "
              f"meshllm {ours[-1]['token_s'] * 1e3:.1f} ms/token", file=sys.stderr, flush=True)
    row = {
        "model": name, "file": model.name, "file_bytes": model.stat().st_size, "threads": threads,
        "devices": devices,
        "llama_cpp_token_s": med([r["token_s"] for r in theirs]), "llama_cpp_ttft_s": med([r["ttft_s"] for r in theirs]),
        "meshllm_token_s": med([r["token_s"] for r in ours]), "meshllm_ttft_s": med([r["ttft_s"] for r in ours]),
        "meshllm_peak_rss_bytes": max(r["peak_rss_bytes"] for r in ours),
        "meshllm_weight_format": ours[0]["weight_format"],
        "reps": {"llama_cpp": theirs, "meshllm": ours},
    }
    if devices == 1:
        row["llama_cpp_peak_rss_bytes"] = llama_rss(src, model, threads)
    row["token_ratio"] = row["meshllm_token_s"] / row["llama_cpp_token_s"]
    row["ttft_ratio"] = row["meshllm_ttft_s"] / row["llama_cpp_ttft_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="smollm2,1b,rpc")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "peers.json"))
    args = ap.parse_args()
    only = set(args.only.split(","))
    src = llama_cpp()
    files = models(src, only)
    rows = []
    for name, path in files.items():
        if (name.startswith("smollm2") and "smollm2" in only) or (name.startswith("1.1b") and "1b" in only):
            for t in [int(t) for t in args.threads.split(",")]:
                rows.append(measure(name, path, src, t, args))
    if "rpc" in only:
        rows.append(measure("1.1b-q4_0", files["1.1b-q4_0"], src, 1, args, devices=2))
    print(f"\n{'model':<14}{'thr':>4}{'N':>3}{'llama.cpp':>11}{'meshllm':>10}{'ratio':>7}{'TTFT llama':>12}"
          f"{'meshllm':>9}{'ratio':>7}{'RSS llama':>11}{'meshllm':>9}")
    for r in rows:
        rss = f"{r['llama_cpp_peak_rss_bytes'] / 2**20:>9.0f}M" if "llama_cpp_peak_rss_bytes" in r else f"{'-':>10}"
        print(f"{r['model']:<14}{r['threads']:>4}{r['devices']:>3}{r['llama_cpp_token_s'] * 1e3:>9.1f}ms"
              f"{r['meshllm_token_s'] * 1e3:>8.1f}ms{r['token_ratio']:>7.2f}{r['llama_cpp_ttft_s'] * 1e3:>10.0f}ms"
              f"{r['meshllm_ttft_s'] * 1e3:>7.0f}ms{r['ttft_ratio']:>7.2f} {rss}"
              f"{r['meshllm_peak_rss_bytes'] / 2**20:>8.0f}M")
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "python": platform.python_version()},
           "command": " ".join(["python", "scripts/bench_peers.py", *sys.argv[1:]]),
           "llama_cpp": LLAMA_CPP_PYTHON, "prompt_tokens": args.prompt, "new_tokens": args.tokens, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        meshllm_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
