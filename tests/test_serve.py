"""`meshllm serve` as clients see it: the real `openai` client and raw HTTP against `serve --local-devices 2` (real
processes, real sockets) on a test checkpoint; the request parser as a pure function."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from helpers.devices import children
from helpers.serve import Serve

openai = pytest.importorskip("openai")

KEY = "test-key-123"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
N_TOKENS = 12


@pytest.fixture(scope="module")
def model(make_model) -> Path:
    return make_model("gqa_tied")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    s = Serve(model, tmp_path_factory.mktemp("serve"), "--local-devices", "2", "--plan", "tp", "--api-key", KEY,
              "--max-queue", "1", "-v")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def client(server, key: str | None = KEY) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key or "none", max_retries=0, timeout=60)


def chat(server, **kw):
    args = dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=N_TOKENS)
    args.update(kw)
    return client(server).chat.completions.create(**args)


MODEL = "gqa_tied0"  # the folder's name (make_model's temporary folders end in a number)


@pytest.fixture(scope="module", autouse=True)
def model_name(model):
    global MODEL
    MODEL = model.name
    return MODEL


# -- the API through the real client -----------------------------------------------------------------------------


def test_chat_non_stream_is_the_engines_greedy_answer(server, model):
    """The served answer is what the engine itself generates for the same messages (greedy), with the usage the
    tokenizer counts."""
    from meshllm.generation.sampling import SamplingParams
    from meshllm.runtime.local import LocalEngine

    r = chat(server)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"

    async def reference():
        async with LocalEngine(model, threads=1) as e:
            ids = e.encode_prompt(MESSAGES, True)
            res = await e.generate(MESSAGES, SamplingParams(max_tokens=N_TOKENS), chat=True)
            return res, len(ids)

    res, n_prompt = asyncio.run(reference())
    assert r.choices[0].message.content == res.text
    assert r.choices[0].finish_reason == res.finish_reason
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == len(res.token_ids)
    assert r.usage.total_tokens == n_prompt + len(res.token_ids)


def test_chat_stream_concatenates_to_the_non_stream_text(server):
    whole = chat(server)
    chunks = list(chat(server, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0] is [c for c in chunks if c.choices][-1]
    assert finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_strings_cut_the_answer(server):
    whole = chat(server, max_tokens=N_TOKENS).choices[0].message.content
    assert len(whole) > 6
    stop = whole[3:6]
    cut = whole[:whole.index(stop)]
    r = chat(server, stop=[stop, "never-generated-xyz"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(server, stop=stop, stream=True) if c.choices)
    assert streamed == cut


def test_max_tokens_and_max_completion_tokens(server):
    r = chat(server, max_tokens=None, max_completion_tokens=3)
    assert r.usage.completion_tokens <= 3
    if r.usage.completion_tokens == 3:
        assert r.choices[0].finish_reason == "length"


def test_completions_raw_prompt(server, model):
    c = client(server)
    r = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(x.choices[0].text for x in c.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True) if x.choices)
    assert streamed == r.choices[0].text
    echo = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, echo=True)
    assert echo.choices[0].text == "Once upon a time" + r.choices[0].text
    from meshllm.tokenizer import load_tokenizer

    assert r.usage.prompt_tokens == len(load_tokenizer(model).encode("Once upon a time"))


def test_seeded_sampling_repeats(server):
    a = chat(server, temperature=0.9, seed=7, max_tokens=8).choices[0].message.content
    b = chat(server, temperature=0.9, seed=7, max_tokens=8).choices[0].message.content
    assert a == b


def test_models(server):
    c = client(server)
    models = c.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].object == "model"
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")


@pytest.mark.parametrize("kw, param", [
    (dict(n=2), "n"),
    (dict(temperature=5), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(frequency_penalty=0.5), "frequency_penalty"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_bad_fields_are_400_naming_the_field(server, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, **kw)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and param.split("[")[0] in e.value.body["message"]


def test_unknown_fields_are_ignored(server):
    r = chat(server, extra_body={"some_future_field": {"x": 1}, "user": "u1"})
    assert r.choices[0].message.content == chat(server).choices[0].message.content


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        chat(server, model="gpt-4o")
    assert e.value.body["code"] == "model_not_found" and MODEL in e.value.body["message"]


def test_prompt_longer_than_the_context_is_413(server):
    long = " ".join(["word"] * 400)  # the test model's context is 256 positions
    with pytest.raises(openai.APIStatusError) as e:
        chat(server, messages=[{"role": "user", "content": long}])
    assert e.value.status_code == 413 and e.value.body["code"] == "context_length_exceeded"
    assert "256" in e.value.body["message"]


def test_api_key_is_required(server):
    for key in ("wrong-key", None):
        with pytest.raises(openai.AuthenticationError) as e:
            client(server, key).models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    raw = urllib.request.Request(server.url + "/v1/models")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(raw, timeout=10)
    assert e.value.code == 401 and json.load(e.value)["error"]["type"] == "invalid_request_error"


def test_queue_full_is_429(server):
    """--max-queue 1: one request runs, one waits, the third is refused; the waiting one then runs."""
    c = client(server)
    running = c.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=200, stream=True)
    next(iter(running))  # it holds the mesh now
    waited: list = []
    t = threading.Thread(target=lambda: waited.append(chat(server, max_tokens=2)), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while _metric(server, "meshllm_queue_depth") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as e:
        chat(server, max_tokens=2)
    assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
    running.close()
    t.join(60)
    assert waited and waited[0].choices[0].message.content is not None


def test_bad_json_and_wrong_method(server):
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=b"{not json",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and "not valid JSON" in json.load(e.value)["error"]["message"]
    req = urllib.request.Request(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405 and "error" in json.load(e.value)


# -- raw HTTP: the SSE bytes, keep-alives, a client that goes away ---------------------------------------------


def _raw_stream(url: str, body: dict, *, stop_after_events: int | None = None) -> tuple[str, bytes]:
    """POST over a plain socket (HTTP/1.0: no chunked encoding, the server closes at the end); returns (head,
    body bytes). With stop_after_events, the socket is closed after that many `data:` events."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)), timeout=60)
    s.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    data = b""
    while True:
        got = s.recv(65536)
        if not got:
            break
        data += got
        if stop_after_events is not None and data.count(b"\n\ndata: ") >= stop_after_events:
            break
    s.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.decode(), rest


def test_sse_framing_on_the_wire(server):
    head, body = _raw_stream(server.url, dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=6,
                                              stream=True))
    assert head.startswith("HTTP/1.") and " 200 " in head.splitlines()[0]
    assert re.search(r"(?im)^content-type: text/event-stream", head)
    assert body.endswith(b"data: [DONE]\n\n")
    events = body.split(b"\n\n")[:-1]
    assert all(e.startswith(b"data: ") or e.startswith(b":") for e in events)
    objs = [json.loads(e[6:]) for e in events if e.startswith(b"data: ") and e != b"data: [DONE]"]
    assert len({o["id"] for o in objs}) == 1
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert objs[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(o["choices"][0]["finish_reason"] is None for o in objs[:-1])


def test_a_client_that_goes_away_aborts_the_request_on_every_device(server):
    body = dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=N_TOKENS)
    before = chat(server).choices[0].message.content
    n0 = server.log().count("aborted by the originator")
    _raw_stream(server.url, {**body, "max_tokens": 200, "stream": True}, stop_after_events=2)
    t0 = time.monotonic()
    while server.log().count("aborted by the originator") < n0 + 2 and time.monotonic() - t0 < 5:
        time.sleep(0.02)
    took = time.monotonic() - t0
    assert server.log().count("aborted by the originator") >= n0 + 2, server.log()[-3000:]
    assert took < 1.0, f"the devices learnt of the abort after {took:.2f} s"
    assert chat(server).choices[0].message.content == before  # the next request runs as a fresh one


def test_health_and_metrics(server):
    health = json.load(urllib.request.urlopen(server.url + "/health", timeout=10))
    assert health["status"] == "ok" and health["model"] == MODEL
    roles = sorted(d["role"] for d in health["devices"])
    assert roles == ["hub", "originator", "worker"] and health["hub"] in {d["id"] for d in health["devices"]}
    before = _metric(server, 'meshllm_requests_total{endpoint="chat",status="200"}')
    tokens = _metric(server, "meshllm_completion_tokens_total")
    ttft = _metric(server, "meshllm_ttft_seconds_count")
    r = chat(server)
    assert _metric(server, 'meshllm_requests_total{endpoint="chat",status="200"}') == before + 1
    assert _metric(server, "meshllm_completion_tokens_total") == tokens + r.usage.completion_tokens
    assert _metric(server, "meshllm_ttft_seconds_count") == ttft + 1
    text = _metrics(server)
    assert re.search(r'meshllm_device_allreduce_wait_seconds\{device="[^"]+"\} \d', text)
    assert "# TYPE meshllm_token_latency_seconds histogram" in text


def _metrics(server) -> str:
    req = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    return urllib.request.urlopen(req, timeout=10).read().decode()


def _metric(server, name: str) -> float:
    for line in _metrics(server).splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_keepalive_comments_do_not_disturb_clients(model, tmp_path):
    """With keep-alives every millisecond, comment lines interleave the chunks; the client still reads the same
    text."""
    s = Serve(model, tmp_path, "--keepalive-s", "0.001")
    try:
        s.wait_ready()
        _, body = _raw_stream(s.url, dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=N_TOKENS,
                                          stream=True))
        assert b"\n\n: keep-alive\n\n" in body or body.startswith(b": keep-alive")
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        streamed = "".join(x.choices[0].delta.content or "" for x in c.chat.completions.create(
            model=MODEL, messages=MESSAGES, temperature=0, max_tokens=N_TOKENS, stream=True) if x.choices)
        whole = c.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=N_TOKENS)
        assert streamed == whole.choices[0].message.content
    finally:
        s.stop()


def test_not_ready_then_a_lost_device_is_503(model, tmp_path):
    """Before the mesh is up: 503 mesh_not_ready (and /health says loading). A device killed mid-request: the
    request resumes on the device left and streams what an undisturbed run gives. Both killed: 503 with
    x-should-retry: false (a retry would run the generation again)."""
    s = Serve(model, tmp_path, "--local-devices", "2", "--plan", "tp", "-v")
    try:
        url = s.wait_listening()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/health", timeout=10)
        assert e.value.code == 503 and json.load(e.value)["status"] == "loading"
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "mesh_not_ready"
        s.wait_ready()
        whole = c.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=60)
        stream = c.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=60,
                                           stream=True)
        it = iter(stream)
        texts = []
        while not "".join(texts):  # some text streamed: the request is under way
            chunk = next(it)
            texts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        kids = children(s.proc.pid)
        os.kill(kids[0], signal.SIGKILL)
        texts += [chunk.choices[0].delta.content or "" for chunk in it if chunk.choices]
        assert "".join(texts) == whole.choices[0].message.content  # resumed: neither repeated nor skipped
        for child in kids[1:]:
            os.kill(child, signal.SIGKILL)
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        assert e.value.status_code == 503 and e.value.response.headers.get("x-should-retry") == "false"
        assert "device" in str(e.value) or "mesh" in str(e.value)
    finally:
        s.stop()


# -- the request parser, pure -------------------------------------------------------------------------------------


def test_parse_chat_maps_fields_to_sampling():
    from meshllm.server.openai_api import parse_chat

    r = parse_chat({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                                  {"type": "text", "text": "b"}]},
                                               {"role": "user", "content": "hi"}],
                    "max_completion_tokens": 5, "max_tokens": 9, "temperature": 0, "top_p": 0.5, "seed": -1,
                    "stop": "x", "stream": True, "stream_options": {"include_usage": True}}, 100)
    assert r.prompt == [{"role": "system", "content": "ab"}, {"role": "user", "content": "hi"}]
    p = r.params
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, r.stream, r.include_usage) == (5, 0.0, 0.5, ("x",), True,
                                                                                          True)
    assert 0 <= p.seed < 1 << 63
    assert parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}, 100).params.temperature == 1.0
    assert parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}, 100).params.max_tokens == 100


@pytest.mark.parametrize("body, param", [
    ([], None),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
     "stream_options"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 1.5}, "seed"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": float("nan")}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
])
def test_parse_chat_refuses_bad_fields(body, param):
    from meshllm.server.openai_api import ApiError, parse_chat

    with pytest.raises(ApiError) as e:
        parse_chat(body, 100)
    assert e.value.status == 400 and e.value.param == param


def test_metrics_text_format():
    from meshllm.server.metrics import Metrics

    m = Metrics()
    m.declare("x_total", "counter", "things")
    m.declare("lat_seconds", "histogram", "latency")
    m.inc("x_total", endpoint="a\"b")
    for v in (0.01, 0.2, 3.0):
        m.observe("lat_seconds", v, (0.1, 1.0))
    text = m.render()
    assert 'meshllm_x_total{endpoint="a\\"b"} 1.0' in text
    assert 'meshllm_lat_seconds_bucket{le="0.1"} 1' in text and 'meshllm_lat_seconds_bucket{le="1.0"} 2' in text
    assert 'meshllm_lat_seconds_bucket{le="+Inf"} 3' in text and "meshllm_lat_seconds_count 3" in text
    assert "meshllm_lat_seconds_sum 3.21" in text


def test_serving_beyond_loopback_without_a_key_warns(model, tmp_path):
    s = Serve(model, tmp_path, "--host", "0.0.0.0")
    try:
        s.wait_listening()
        assert s.log().count("without an API key") == 1
    finally:
        s.stop()
    quiet = Serve(model, tmp_path)  # loopback: nothing to warn about
    try:
        quiet.wait_listening()
        assert "without an API key" not in quiet.log()
    finally:
        quiet.stop()
