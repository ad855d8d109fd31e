"""The OpenAI HTTP API's request fields and response objects, pure (no I/O): parse a JSON body into what to run,
and build the objects the API defines (chat.completion, chat.completion.chunk, text_completion, model, error).

Every field a request may carry is checked here; a wrong one is an `ApiError` naming the field, which the server
sends as `{"error": {"message", "type", "param", "code"}}` with its status. Unknown fields are ignored, as the API's
servers do.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..generation.sampling import SamplingParams

MAX_STOP = 4  # stop sequences per request, as the API allows
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
MAX_TEXT_CHARS = 1 << 20  # of one message or prompt (the context bounds it long before)
ROLES = ("system", "user", "assistant", "developer", "tool")


class ApiError(Exception):
    """An error the API reports: HTTP status, the OpenAI error type and code, and the field at fault."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry: bool | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry = retry  # False: a retry would run the generation again (x-should-retry: false)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Request:
    """What one API call asks to run."""

    kind: str  # "chat" or "completion"
    model: str
    prompt: str | list[dict]  # messages for chat, text for completions
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"'{name}' must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise bad(name, f"'{name}' must be between {lo:g} and {hi:g}, got {value!r}")
    return float(value)


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"'{name}' must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise bad(name, f"'{name}' must be between {lo} and {hi}, got {value}")
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "'stop' must be a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"'stop' takes at most {MAX_STOP} sequences, got {len(stops)}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad("stop", f"each stop sequence must be 1 to {MAX_STOP_CHARS} characters")
    return tuple(stops)


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (the API's content-part form)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(where, f"'{where}' parts must be text parts like {{\"type\": \"text\", \"text\": ...}}: "
                                 f"this model reads text only")
            parts.append(part["text"])
        text = "".join(parts)
    elif value is None:
        text = ""
    else:
        raise bad(where, f"'{where}' must be a string or a list of text parts")
    if len(text) > MAX_TEXT_CHARS:
        raise ApiError(413, f"'{where}' is {len(text)} characters: longer than any context", param=where,
                       code="context_length_exceeded")
    return text


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...}")
    if len(messages) > MAX_MESSAGES:
        raise bad("messages", f"'messages' holds at most {MAX_MESSAGES} messages, got {len(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"'messages[{i}]' must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role", f"'messages[{i}].role' must be one of {', '.join(ROLES)}; got {role!r}")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(m.get("content"), f"messages[{i}].content")})
    return out


def _common(body: dict, default_max: int) -> tuple[SamplingParams, bool, bool]:
    n = _int(body, "n", 1, 128)
    if n not in (None, 1):
        raise bad("n", f"'n' must be 1: meshllm runs one completion per request, got {n}")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise bad(name, f"'{name}' is not supported: leave it at 0 (meshllm applies 'repetition_penalty' "
                            f"instead)")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise bad("logprobs", "'logprobs' is not supported: leave it unset")
    max_tokens = _int(body, "max_completion_tokens", 1, 1 << 20)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, 1 << 20)
    seed = _int(body, "seed", -(1 << 63), (1 << 63) - 1)
    params = SamplingParams(
        max_tokens=max_tokens or default_max,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,  # 0 keeps the likeliest token only
        top_k=_int(body, "top_k", 0, 1 << 20) or 0,
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 100.0),
        seed=None if seed is None else seed % (1 << 63),
        stop=_stops(body),
    )
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("stream", f"'stream' must be true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "'stream_options' must be an object like {\"include_usage\": true}")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise bad("stream_options.include_usage", "'stream_options.include_usage' must be true or false")
    if options and not stream:
        raise bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
    return params, bool(stream), usage


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "'model' must name a model (GET /v1/models lists them)")
    return model


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    return body


def parse_chat(body: Any, default_max: int) -> Request:
    """A `POST /v1/chat/completions` body -> Request (raises ApiError naming the field)."""
    body = _object(body)
    model = _model(body)
    messages = _messages(body)
    params, stream, usage = _common(body, default_max)
    return Request("chat", model, messages, params, stream, usage)


def parse_completion(body: Any, default_max: int) -> Request:
    """A `POST /v1/completions` body -> Request."""
    body = _object(body)
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("prompt", "'prompt' must be a string (one prompt per request)")
    _content(prompt, "prompt")
    if body.get("suffix") not in (None, ""):
        raise bad("suffix", "'suffix' is not supported: leave it unset")
    if body.get("best_of") not in (None, 1):
        raise bad("best_of", "'best_of' must be 1")
    params, stream, usage = _common(body, 16)  # the completions API's default max_tokens is 16
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise bad("echo", "'echo' must be true or false")
    return Request("completion", model, prompt, params, stream, usage, echo=echo)


# -- response objects -------------------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_object(req: Request, rid: str, created: int, text: str, finish: str, use: dict) -> dict:
    """The non-streamed response: chat.completion or text_completion."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [choice], "usage": use, "system_fingerprint": None}
    text = (req.prompt + text) if req.echo else text
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": [choice],
            "usage": use, "system_fingerprint": None}


def chunk_object(req: Request, rid: str, created: int, *, text: str | None = None, role: bool = False,
                 finish: str | None = None, use: dict | None = None, last_usage: bool = False) -> dict:
    """One streamed chunk. `last_usage`: the extra last chunk of include_usage (empty choices)."""
    kind = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    out: dict = {"id": rid, "object": kind, "created": created, "model": req.model, "system_fingerprint": None}
    if last_usage:
        out["choices"] = []
        out["usage"] = use
        return out
    if req.kind == "chat":
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        out["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    if req.include_usage:
        out["usage"] = None  # every chunk but the last carries a null usage, as the API's do
    return out


def model_object(name: str, created: int | None = None) -> dict:
    return {"id": name, "object": "model", "created": int(created or time.time()), "owned_by": "meshllm"}
