"""`meshllm serve`: the OpenAI HTTP API over a mesh, on the mesh's own event loop (aiohttp's server).

Requests wait in a bounded FIFO and run one at a time. A streamed reply is Server-Sent Events: `data: {chunk}`
frames, `: keep-alive` comments while the prompt is prefilled, then `data: [DONE]`. A client that goes away
cancels its handler (aiohttp's handler cancellation), which closes the generation and aborts the request on every
device.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from aiohttp import web

from ..errors import MeshError, PromptTooLongError, RequestError
from ..generation.loop import Result
from .metrics import TOKEN_BUCKETS, TTFT_BUCKETS, Metrics
from .openai_api import ApiError, Request, chunk_object, completion_object, model_object, new_id, parse_chat, \
    parse_completion, usage

log = logging.getLogger("meshllm.serve")

MAX_BODY = 8 << 20  # bytes of one request body
KEEPALIVE_S = 2.0  # a comment line this often while nothing else is sent (a long prefill)
DEVICE_STATS_TIMEOUT_S = 2.0


class Target:
    """What the server runs requests on: an engine (one device, or a mesh of given devices) or a `Mesh` that follows
    the LAN. Both give the tokenizer's encoding, the stream of a request and the devices in use."""

    def __init__(self, engine=None, mesh=None) -> None:
        self.engine, self.mesh = engine, mesh

    @property
    def _engine(self):
        return self.mesh._engine if self.mesh is not None else self.engine

    @property
    def config(self):
        return self._engine.config

    def encode_prompt(self, prompt, chat: bool | None) -> list[int]:
        return self._engine.encode_prompt(prompt, chat)

    def stream(self, prompt, params, *, chat: bool | None, result: Result) -> AsyncIterator[str]:
        if self.mesh is not None:
            return self.mesh.stream(prompt, params=params, chat=chat, result=result)
        return self.engine.stream(prompt, params, chat=chat, result=result)

    async def devices(self) -> list[dict]:
        if self.mesh is not None:
            return self.mesh.devices or [{"id": "local", "role": "originator"}]
        return await self.engine.devices()

    async def device_stats(self) -> list[dict]:
        stats = getattr(self._engine, "device_stats", None)
        return await stats() if stats is not None else []


class ApiServer:
    """The HTTP app: routes, the API key, the request queue, metrics."""

    def __init__(self, open_target: Callable[[contextlib.AsyncExitStack], Awaitable[Target]], model_name: str, *,
                 api_key: str | None = None, max_queue: int = 16, keepalive_s: float = KEEPALIVE_S,
                 default_max_tokens: int = 1 << 20) -> None:
        self.open_target, self.model_name, self.api_key = open_target, model_name, api_key
        self.max_queue, self.keepalive_s, self.default_max_tokens = max_queue, keepalive_s, default_max_tokens
        self.target: Target | None = None
        self.failed: str | None = None  # why the mesh could not be brought up
        self.created = int(time.time())
        self._run_lock = asyncio.Lock()  # FIFO: asyncio's lock wakes waiters in arrival order
        self.waiting = 0
        self.running = 0
        self.metrics = Metrics()
        m = self.metrics
        m.declare("requests_total", "counter", "HTTP API requests by endpoint and status")
        m.declare("prompt_tokens_total", "counter", "prompt tokens of finished requests")
        m.declare("completion_tokens_total", "counter", "tokens generated")
        m.declare("ttft_seconds", "histogram", "time from a request starting to run to its first token")
        m.declare("token_latency_seconds", "histogram", "time between consecutive generated tokens")
        m.declare("queue_depth", "gauge", "requests waiting for the mesh")
        m.declare("requests_running", "gauge", "requests running on the mesh (0 or 1)")
        m.declare("device_allreduce_wait_seconds", "gauge", "per device: seconds waited for allreduce sums, this mesh")
        m.declare("mesh_ready", "gauge", "1 when the mesh is up")

    # -- app -----------------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors, self._auth])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{name:.+}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/", self.page)
        return app

    async def bring_up(self, stack: contextlib.AsyncExitStack) -> None:
        """Open the target (load the model, find or start the devices); requests get 503 until it is up."""
        try:
            self.target = await self.open_target(stack)
        except MeshError as e:
            self.failed = str(e)
            log.error("the mesh could not be brought up: %s", e)
            raise
        self.metrics.set("mesh_ready", 1)
        log.info("mesh ready: serving %s", self.model_name)

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            self.metrics.inc("requests_total", endpoint=_endpoint(request), status=str(e.status))
            return _error_response(e)
        except web.HTTPException as e:  # aiohttp's own (404 route, 405, 413 body too large)
            if e.status < 400:
                raise
            err = ApiError(e.status, f"{request.method} {request.path}: {e.reason}",
                           type="invalid_request_error", code=e.reason.lower().replace(" ", "_"))
            self.metrics.inc("requests_total", endpoint=_endpoint(request), status=str(e.status))
            return _error_response(err)

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        if self.api_key and (request.path.startswith("/v1/") or request.path == "/metrics"):
            given = request.headers.get("Authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key "
                                    "given to `meshllm serve --api-key` (or MESHLLM_API_KEY)",
                               type="invalid_request_error", code="invalid_api_key")
        return await handler(request)

    # -- endpoints -----------------------------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_chat(await _json(request), self.default_max_tokens)
        return await self._run(request, req, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_completion(await _json(request), self.default_max_tokens)
        return await self._run(request, req, "completions")

    async def models(self, request: web.Request) -> web.Response:
        self.metrics.inc("requests_total", endpoint="models", status="200")
        return web.json_response({"object": "list", "data": [model_object(self.model_name, self.created)]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name != self.model_name:
            raise _no_model(name, self.model_name)
        self.metrics.inc("requests_total", endpoint="models", status="200")
        return web.json_response(model_object(self.model_name, self.created))

    async def health(self, request: web.Request) -> web.Response:
        if self.target is None:
            body = {"status": "failed" if self.failed else "loading", "model": self.model_name}
            if self.failed:
                body["error"] = self.failed
            return web.json_response(body, status=503)
        devices = await self.target.devices()
        hub = next((d.get("id") for d in devices if d.get("role") == "hub"), None)
        return web.json_response({"status": "ok", "model": self.model_name, "devices": devices, "hub": hub,
                                  "queue_depth": self.waiting, "running": self.running})

    async def metrics_text(self, request: web.Request) -> web.Response:
        self.metrics.set("queue_depth", self.waiting)
        self.metrics.set("requests_running", self.running)
        if self.target is not None and not self.running:
            with contextlib.suppress(MeshError, asyncio.TimeoutError, OSError):
                async with asyncio.timeout(DEVICE_STATS_TIMEOUT_S):
                    for s in await self.target.device_stats():
                        self.metrics.set("device_allreduce_wait_seconds", float(s.get("allreduce_wait_s", 0.0)),
                                         device=str(s.get("node", "?")))
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def page(self, request: web.Request) -> web.Response:
        page = Path(__file__).with_name("page.html")
        if not page.exists():
            raise web.HTTPNotFound()
        return web.Response(text=page.read_text(encoding="utf-8"), content_type="text/html", charset="utf-8")

    # -- running a request ---------------------------------------------------------------------------------------

    async def _run(self, request: web.Request, req: Request, endpoint: str) -> web.StreamResponse:
        if req.model != self.model_name:
            raise _no_model(req.model, self.model_name)
        target = self._ready()
        chat = req.kind == "chat"
        ids = await asyncio.to_thread(target.encode_prompt, req.prompt, chat if chat else False)
        context = target.config.max_position_embeddings
        if len(ids) >= context:
            raise ApiError(413, f"the prompt is {len(ids)} tokens but the model's context is {context}: shorten "
                                f"the {'messages' if chat else 'prompt'}", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        if self.waiting >= self.max_queue:
            raise ApiError(429, f"{self.waiting} requests are already waiting for the mesh: retry later",
                           type="rate_limit_error", code="queue_full")
        self.waiting += 1
        try:
            await self._run_lock.acquire()
        finally:
            self.waiting -= 1
        try:
            self._ready()  # it may have failed while we waited
            self.running = 1
            if req.stream:
                return await self._stream(request, req, target, endpoint)
            return await self._complete(req, target, endpoint)
        finally:
            self.running = 0
            self._run_lock.release()

    def _ready(self) -> Target:
        if self.target is None:
            raise ApiError(503, "the mesh is not ready yet" + (f": {self.failed}" if self.failed else
                                                               ": retry in a moment (GET /health says when)"),
                           type="server_error", code="mesh_not_ready")
        return self.target

    async def _complete(self, req: Request, target: Target, endpoint: str) -> web.Response:
        rid, created, result = new_id(req.kind), int(time.time()), Result()
        try:
            async with contextlib.aclosing(target.stream(req.prompt, req.params, chat=req.kind == "chat",
                                                         result=result)) as pieces:
                async for _ in pieces:
                    pass
        except BaseException as e:
            raise _run_error(e) from e
        self._count(endpoint, "200", result)
        body = completion_object(req, rid, created, result.text, result.finish_reason,
                                 usage(result.prompt_tokens, len(result.token_ids),
                                       result.cached_tokens))
        return web.json_response(body)

    async def _stream(self, request: web.Request, req: Request, target: Target, endpoint: str) -> web.StreamResponse:
        rid, created, result = new_id(req.kind), int(time.time()), Result()
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)
        done = object()

        async def produce() -> None:
            try:
                async with contextlib.aclosing(target.stream(req.prompt, req.params, chat=req.kind == "chat",
                                                             result=result)) as pieces:
                    async for piece in pieces:
                        await queue.put(piece)
                await queue.put(done)
            except Exception as e:  # noqa: BLE001 - reported to the client in the stream
                await queue.put(e)

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        marker = "\u0001meshllm-piece\u0001"
        template = "data: " + json.dumps(chunk_object(req, rid, created, text=marker), ensure_ascii=False) + "\n\n"
        head, tail = (part.encode() for part in template.split(json.dumps(marker, ensure_ascii=False), 1))
        producer = asyncio.ensure_future(produce())
        try:
            await resp.prepare(request)
            if req.kind == "chat":
                await _send(resp, chunk_object(req, rid, created, text="", role=True))
            while True:
                try:
                    async with asyncio.timeout(self.keepalive_s):
                        item = await queue.get()
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if item is done:
                    break
                if isinstance(item, BaseException):
                    err = _run_error(item)
                    self.metrics.inc("requests_total", endpoint=endpoint, status=str(err.status))
                    await resp.write(b"data: " + json.dumps(err.body()).encode() + b"\n\n")
                    return resp
                # per piece only the text is encoded, into the chunk's bytes made once (the loop is the engine's)
                await resp.write(head + json.dumps(item, ensure_ascii=False).encode() + tail)
            await _send(resp, chunk_object(req, rid, created, text=None if req.kind == "chat" else "",
                                           finish=result.finish_reason))
            if req.include_usage:
                await _send(resp, chunk_object(req, rid, created, use=usage(
                    result.prompt_tokens, len(result.token_ids), result.cached_tokens), last_usage=True))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            self._count(endpoint, "200", result)
            return resp
        finally:
            if not producer.done():
                # the client went away (the handler is cancelled) or the stream broke: stop the generation now
                producer.cancel()
                log.info("request %s: client gone, generation stopped", rid)
            with contextlib.suppress(asyncio.CancelledError):
                await producer

    def _count(self, endpoint: str, status: str, result: Result) -> None:
        m = self.metrics
        m.inc("requests_total", endpoint=endpoint, status=status)
        m.inc("prompt_tokens_total", result.prompt_tokens)
        m.inc("completion_tokens_total", len(result.token_ids))
        if result.token_ids:
            m.observe("ttft_seconds", result.ttft_s, TTFT_BUCKETS)
        for a, b in zip(result.token_times, result.token_times[1:]):
            m.observe("token_latency_seconds", b - a, TOKEN_BUCKETS)


def _endpoint(request: web.Request) -> str:
    p = request.path
    return {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models",
            "/health": "health", "/metrics": "metrics", "/": "page"}.get(p, "models" if p.startswith("/v1/models/")
                                                                       else "other")


def _no_model(name: str, served: str) -> ApiError:
    return ApiError(404, f"model {name!r} is not served here: this server runs {served!r} (GET /v1/models)",
                    param="model", code="model_not_found")


def _run_error(e: BaseException) -> ApiError:
    """What a failure while running becomes for the client."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, PromptTooLongError):
        return ApiError(413, str(e), code="context_length_exceeded")
    if isinstance(e, RequestError):
        return ApiError(400, str(e))
    if isinstance(e, MeshError):
        return ApiError(503, f"the request failed on the mesh: {e}", type="server_error", code="mesh_error",
                        retry=False)
    if isinstance(e, asyncio.CancelledError):
        raise e
    log.exception("request failed", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error", code="internal_error",
                    retry=False)


def _error_response(e: ApiError) -> web.Response:
    headers = {"x-should-retry": "false"} if e.retry is False else {}
    return web.json_response(e.body(), status=e.status, headers=headers)


async def _json(request: web.Request) -> Any:
    if request.content_type not in ("application/json", "", "text/plain"):
        raise ApiError(400, f"the body must be JSON (Content-Type: application/json), got {request.content_type}")
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None


async def _send(resp: web.StreamResponse, obj: dict) -> None:
    await resp.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")


async def serve(server: ApiServer, host: str, port: int, *, listening: Callable[[str], None] | None = None,
                ready: Callable[[str], None] | None = None, stop: asyncio.Event | None = None) -> None:
    """Listen on host:port, bring the mesh up behind it, serve until `stop` is set."""
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            raise MeshError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or "
                            f"--host") from None
        bound = runner.addresses[0]
        url = f"http://{bound[0]}:{bound[1]}" if ":" not in bound[0] else f"http://[{bound[0]}]:{bound[1]}"
        if listening is not None:
            listening(url)
        stop = stop or asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            up = asyncio.ensure_future(server.bring_up(stack))
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({up, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not up.done():  # stopped while the mesh was coming up
                    return
                up.result()  # its failure is the error to report
                if ready is not None:
                    ready(url)
                await stopping
            finally:
                for task in (up, stopping):
                    task.cancel()
                await asyncio.gather(up, stopping, return_exceptions=True)
    finally:
        await runner.cleanup()
