"""`meshllm serve` against the same requests through `Mesh` directly, and KV prefix reuse over a 5-turn chat.

    python scripts/bench_serve.py [--model PATH] [--requests 20] [--tokens 32] [--threads 1] [--no-screenshot]

- Overhead: --requests sequential greedy chat requests through the HTTP API and the same requests through `Mesh`,
  interleaved one for one, on one engine: the API server runs in this process on the `Mesh` the direct requests
  use, and a plain-socket client (a child process) reads the stream, so only the server's own work differs. The added
  latency per request is the median of the paired differences; per token, the difference of the median gaps
  between streamed pieces and between generated tokens. The same requests through the real `openai` client
  against a `serve` process are reported beside (that client's own parsing included).
- Prefix reuse: a 5-turn chat through the API (a long system prompt, short turns), TTFT per turn with the prefix
  cache on and off (`--no-prefix-cache`), and the cached token counts the API reports.
- A screenshot of the chat page after one reply (headless Chromium, when installed) in benchmarks/chat_page.png.
Prints a table and writes benchmarks/serve.json.
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
import threading
import time
from pathlib import Path

from benchlib import ROOT  # noqa: E402 (sets the import path first)

SHORT_ROUNDS = 3  # one-token requests: the request list this many times
SYSTEM = ("You are a helpful assistant running on a mesh of small computers at home. Answer briefly and "
          "plainly. " * 6).strip()
TURNS = ["Hi! What can you do?", "Name three fruits.", "Which one is the sweetest?", "Why?", "Thanks. Bye!"]


class Server:
    """`python -m meshllm serve` in a child process."""

    def __init__(self, model: str, threads: int, *extra: str) -> None:
        self.log = open(ROOT / "benchmarks" / ".serve.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "meshllm", "serve", "--model", model, "--port", "0",
                                      "--threads", str(threads), *extra], stdout=subprocess.PIPE, stderr=self.log,
                                     stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(300)
        if not line or not line[0].startswith(b"meshllm-serve ready"):
            self.close()
            raise RuntimeError(f"serve did not start: {line}")
        self.url = line[0].decode().split()[-1]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def http_request(client, model: str, messages: list[dict], tokens: int) -> dict:
    """One streamed greedy chat request: wall time, TTFT, gaps between pieces, usage."""
    t0 = time.perf_counter()
    times, text, use = [], "", None
    for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=tokens,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            use = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter() - t0)
            text += chunk.choices[0].delta.content
    total = time.perf_counter() - t0
    return {"s": total, "ttft_s": times[0] if times else total, "gaps": [b - a for a, b in zip(times, times[1:])],
            "text": text, "completion_tokens": use.completion_tokens,
            "cached_tokens": use.prompt_tokens_details.cached_tokens, "prompt_tokens": use.prompt_tokens}


async def direct_request(mesh, messages: list[dict], tokens: int) -> dict:
    from meshllm.generation.loop import Result

    t0 = time.perf_counter()
    result, text = Result(), ""
    async for piece in mesh.stream(messages, max_tokens=tokens, chat=True, result=result):
        text += piece
    total = time.perf_counter() - t0
    return {"s": total, "ttft_s": result.ttft_s, "gaps": [b - a for a, b in zip(result.token_times,
                                                                              result.token_times[1:])],
            "text": text, "completion_tokens": len(result.token_ids)}


def raw_request(url: str, model: str, messages: list[dict], tokens: int) -> dict:
    """One streamed greedy chat request over a plain socket (HTTP/1.0, SSE read as it comes): wall time and the
    gaps between content events, with no client library's own work in them."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": tokens,
                       "stream": True}).encode()
    t0 = time.perf_counter()
    s = socket.create_connection((host, int(port)), timeout=300)
    s.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    times, buf = [], b""
    while True:
        data = s.recv(65536)
        if not data:
            break
        now = time.perf_counter() - t0
        buf += data
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if event.startswith(b"data: {") and b'"content": "' in event and b'"content": ""' not in event:
                times.append(now)
    s.close()
    total = time.perf_counter() - t0
    return {"s": total, "gaps": [b - a for a, b in zip(times, times[1:])], "pieces": len(times)}


def overhead(args, model: str) -> dict:
    """The server in this process on the very engine the direct requests use (so only the server's own work
    differs), a plain-socket client in a child process; then the real openai client against a `serve` process."""
    from meshllm import Mesh
    from meshllm.cli import model_name
    from meshllm.server.http import ApiServer, Target

    requests = [[{"role": "user", "content": f"Tell me fact number {i} about the sea."}] for i in range(args.requests)]
    name = model_name(model)

    short_http: list[float] = []
    short_direct: list[float] = []

    async def run() -> tuple[list, list]:
        from aiohttp import web

        http, direct = [], []
        # no prefix reuse: request i through one path would find its whole prompt cached by the other
        async with Mesh(model, threads=args.threads, prefix_cache=False) as mesh:
            async def open_target(stack):
                return Target(mesh=mesh)

            server = ApiServer(open_target, name)
            runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            await server.bring_up(None)
            host, port = runner.addresses[0][:2]
            url = f"http://{host}:{port}"
            # the client in its own process: a thread here would take the GIL from the engine's thread
            client = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--_client", url, name, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE)

            async def over_http(msgs: list[dict], tokens: int = args.tokens) -> dict:
                client.stdin.write(json.dumps([msgs, tokens]).encode() + b"\n")
                return json.loads(await client.stdout.readline())

            try:
                await over_http(requests[0])  # warm both
                await direct_request(mesh, requests[0], args.tokens)
                for msgs in requests:  # interleaved: the machine's noise falls on both alike
                    http.append(await over_http(msgs))
                    direct.append(await direct_request(mesh, msgs, args.tokens))
                # the fixed cost of a request, where a long generation's noise would hide it: one-token requests
                for msgs in requests * SHORT_ROUNDS:
                    short_http.append((await over_http(msgs, 1))["s"])
                    short_direct.append((await direct_request(mesh, msgs, 1))["s"])
            finally:
                client.stdin.close()
                await client.wait()
                await runner.cleanup()
        return http, direct

    http, direct = asyncio.run(run())
    per_request = [h["s"] - d["s"] for h, d in zip(http, direct)]
    http_gap = statistics.median(g for h in http for g in h["gaps"])
    direct_gap = statistics.median(g for d in direct for g in d["gaps"])
    out = {
        "requests": len(http), "tokens": args.tokens,
        "same_length": sum(h["pieces"] == len(d["gaps"]) + 1 for h, d in zip(http, direct)),
        "http_request_s_median": statistics.median(h["s"] for h in http),
        "direct_request_s_median": statistics.median(d["s"] for d in direct),
        "added_per_request_ms_median": statistics.median(per_request) * 1e3,
        "one_token_requests": len(short_http),
        "one_token_http_s_median": statistics.median(short_http),
        "one_token_direct_s_median": statistics.median(short_direct),
        "added_per_one_token_request_ms_median": statistics.median(
            h - d for h, d in zip(short_http, short_direct)) * 1e3,
        "http_gap_ms_median": http_gap * 1e3, "direct_gap_ms_median": direct_gap * 1e3,
        "added_per_token_ms": (http_gap - direct_gap) * 1e3,
        # per pair of adjacent requests (the same prompt, one after the other): the difference of their median gaps
        "added_per_token_ms_paired_median": statistics.median(
            statistics.median(h["gaps"]) - statistics.median(d["gaps"]) for h, d in zip(http, direct)) * 1e3,
    }
    # the same through the real openai client against a `serve` process (client parsing included)
    import openai

    proc = Server(model, args.threads, "--no-prefix-cache")
    try:
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="none", max_retries=0, timeout=300)
        http_request(client, name, requests[0], args.tokens)
        runs = [http_request(client, name, msgs, args.tokens) for msgs in requests]
    finally:
        proc.close()
    out["openai_client"] = {"request_s_median": statistics.median(r["s"] for r in runs),
                            "gap_ms_median": statistics.median(g for r in runs for g in r["gaps"]) * 1e3}
    return out


def prefix_reuse(args, model: str) -> dict:
    import openai

    out = {}
    for mode, extra in (("on", ()), ("off", ("--no-prefix-cache",))):
        server = Server(model, args.threads, *extra)
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
            name = client.models.list().data[0].id
            http_request(client, name, [{"role": "user", "content": "warm up"}], 4)
            messages = [{"role": "system", "content": SYSTEM}]
            turns = []
            for turn in TURNS:
                messages.append({"role": "user", "content": turn})
                r = http_request(client, name, messages, args.tokens)
                messages.append({"role": "assistant", "content": r["text"]})
                turns.append({"ttft_s": r["ttft_s"], "prompt_tokens": r["prompt_tokens"],
                              "cached_tokens": r["cached_tokens"], "text": r["text"]})
            out[mode] = turns
        finally:
            server.close()
    out["same_replies"] = [a["text"] == b["text"] for a, b in zip(out["on"], out["off"])]
    out["turn5_over_turn1_on"] = out["on"][-1]["ttft_s"] / out["on"][0]["ttft_s"]
    out["turn5_over_turn1_off"] = out["off"][-1]["ttft_s"] / out["off"][0]["ttft_s"]
    return out


def screenshot(args, model: str) -> str | None:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.browser import BrowserError, screenshot as shoot

    server = Server(model, args.threads)
    out = ROOT / "benchmarks" / "chat_page.png"
    try:
        shoot(server.url + "/?max_tokens=48", out, "What is the capital of France?")
        return str(out.relative_to(ROOT))
    except BrowserError as e:
        print(f"no screenshot: {e}", file=sys.stderr)
        return None
    finally:
        server.close()


def client_child(url: str, model: str) -> None:
    """The plain-socket client, in a child process: one request per line of [messages, tokens] on stdin, its
    timings out."""
    for line in sys.stdin:
        messages, tokens = json.loads(line)
        print(json.dumps(raw_request(url, model, messages, tokens)), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_client":
        client_child(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-screenshot", action="store_true")
    ap.add_argument("--overhead-only", action="store_true", help="only the server overhead part")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "serve.json"))
    args = ap.parse_args()
    from meshllm.model.default import default_model_path

    model = args.model or str(default_model_path())
    o = overhead(args, model)
    if args.overhead_only:
        print(json.dumps(o, indent=1))
        return
    p = prefix_reuse(args, model)
    shot = None if args.no_screenshot else screenshot(args, model)
    print(f"\nserver overhead, {o['requests']} sequential chat requests of {o['tokens']} tokens, the server and Mesh "
          f"on one engine in this process ({o['same_length']}/{o['requests']} of the same length):")
    print(f"  request: HTTP {o['http_request_s_median'] * 1e3:.1f} ms, Mesh {o['direct_request_s_median'] * 1e3:.1f} ms"
          f" -> added {o['added_per_request_ms_median']:.2f} ms per request (median of paired differences)")
    print(f"  one-token requests ({o['one_token_requests']}): HTTP {o['one_token_http_s_median'] * 1e3:.1f} ms, Mesh "
          f"{o['one_token_direct_s_median'] * 1e3:.1f} ms -> added {o['added_per_one_token_request_ms_median']:.2f} ms "
          f"per request")
    print(f"  token:   HTTP {o['http_gap_ms_median']:.2f} ms, Mesh {o['direct_gap_ms_median']:.2f} ms -> added "
          f"{o['added_per_token_ms']:.3f} ms per token ({o['added_per_token_ms_paired_median']:.3f} ms: median over "
          f"the request pairs of the difference of their median gaps)")
    oc = o["openai_client"]
    print(f"  the openai client against a serve process: {oc['request_s_median'] * 1e3:.1f} ms per request, "
          f"{oc['gap_ms_median']:.2f} ms between pieces")
    print("\nprefix reuse, 5-turn chat (TTFT ms / prompt tokens / cached):")
    print(f"  {'turn':<5} {'reuse on':>22} {'reuse off':>22}")
    for i, (a, b) in enumerate(zip(p["on"], p["off"]), 1):
        print(f"  {i:<5} {a['ttft_s'] * 1e3:8.1f} {a['prompt_tokens']:5d} {a['cached_tokens']:5d}   "
              f"{b['ttft_s'] * 1e3:8.1f} {b['prompt_tokens']:5d} {b['cached_tokens']:5d}")
    print(f"  turn 5 / turn 1 TTFT: {p['turn5_over_turn1_on']:.2f} with reuse, {p['turn5_over_turn1_off']:.2f} "
          f"without; replies identical: {all(p['same_replies'])}")
    if shot:
        print(f"\nchat page screenshot: {shot}")
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "model": model,
           "threads": args.threads, "overhead": o, "prefix_reuse": p, "screenshot": shot}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
