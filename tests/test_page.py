"""The chat page at `/` of `meshllm serve`, in headless Chromium (driven over the DevTools protocol, see
helpers/browser.py) against `serve --local-devices 2` on a test checkpoint: what it shows from /health, that a
streamed reply is the API's greedy answer for the same conversation, the ms/token line, Stop, and the screenshot
helper the benchmarks use. Skipped when no Chromium binary is installed."""

from __future__ import annotations

import re
import struct
import time

import pytest

from helpers.browser import Browser, missing_reason

_reason = missing_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from helpers.browser import page_ready_js, screenshot, send_message, wait_reply  # noqa: E402
from helpers.checkpoints import VARIANTS  # noqa: E402
from helpers.serve import Serve  # noqa: E402

SHORT = 12  # tokens per reply where the page is given ?max_tokens= (the random model rarely ends a reply itself)


@pytest.fixture(scope="module")
def server(make_model, tmp_path_factory):
    s = Serve(make_model("gqa_tied", **VARIANTS["gqa_tied"]), tmp_path_factory.mktemp("serve-page"),
              "--local-devices", "2", "--plan", "tp", "-v")
    try:
        s.wait_ready(60)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


@pytest.fixture
def open_page(browser, server):
    """open_page(query="") -> the chat page, loaded and showing the model (closed after the test)."""
    pages = []

    def open_(query: str = ""):
        page = browser.new_page(server.url + "/" + query, timeout=20)
        pages.append(page)
        page.wait_for(page_ready_js(), timeout=20)
        return page

    yield open_
    for p in pages:
        p.close()


def api_reply(server, messages: list[dict], max_tokens: int | None = None) -> dict:
    """The non-streamed greedy answer of the API for `messages` (the first choice)."""
    body = {"model": server.get_json("/health")["model"], "messages": messages, "temperature": 0}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return server.post_json("/v1/chat/completions", body, timeout=60)["choices"][0]


def messages_shown(page) -> list[dict]:
    """The conversation as the page shows it: (class, text, data-state) of each message, in order."""
    return page.evaluate("[...document.querySelectorAll('#log .msg')].map(m => ({cls: m.className, "
                         "text: m.textContent, state: m.dataset.state || null, "
                         "ms: m.dataset.msPerToken === undefined ? null : m.dataset.msPerToken}))")


def check_no_errors(page) -> None:
    shown = messages_shown(page)
    errors = [m["text"] for m in shown if "error" in m["cls"]]
    assert not errors, f"the page shows errors: {errors}; console: {page.console()}"
    assert not [c for c in page.console() if c.startswith("exception")], page.console()


def test_page_shows_the_model_and_devices_from_health(open_page, server):
    page = open_page()
    health = server.get_json("/health")
    assert page.evaluate("document.title") == "meshllm"
    assert page.evaluate("document.getElementById('model').textContent") == "model: " + health["model"]
    role = {"hub": " (hub)", "originator": " (this)"}
    expected = "devices: " + ", ".join(d["id"] + role.get(d.get("role"), "") for d in health["devices"])
    assert page.evaluate("document.getElementById('devices').textContent") == expected
    assert len(health["devices"]) == 3 and "(hub)" in expected and "(this)" in expected  # originator + 2 devices
    # idle: Send enabled, Stop disabled, nothing in the log
    assert page.evaluate("[document.getElementById('send').disabled, document.getElementById('stop').disabled, "
                         "document.getElementById('log').children.length]") == [False, True, 0]
    check_no_errors(page)


def test_streamed_replies_are_the_apis_greedy_answers_for_the_conversation(open_page, server):
    """Two turns typed into the box (Enter sends): each reply shown is what the API answers (temperature 0) for
    the whole conversation so far, and each is followed by the timing line with data-ms-per-token."""
    page = open_page(f"?max_tokens={SHORT}")
    conversation: list[dict] = []
    for turn, text in enumerate(["Name a colour.", "And another one?"]):
        i = send_message(page, text)
        assert i == turn
        assert page.evaluate("document.getElementById('input').value") == ""  # the box is cleared on send
        shown = wait_reply(page, i, timeout=30)
        conversation.append({"role": "user", "content": text})
        ref = api_reply(server, conversation, max_tokens=SHORT)
        assert shown == ref["message"]["content"], f"turn {turn}: page {shown!r} != API {ref['message']['content']!r}"
        assert shown  # the random model does not end at once: a real comparison
        conversation.append({"role": "assistant", "content": shown})

        msgs = messages_shown(page)
        user, reply, meta = msgs[-3:]
        assert (user["cls"], user["text"]) == ("msg user", text)
        assert (reply["cls"], reply["state"]) == ("msg assistant", "done")
        assert meta["cls"] == "msg meta" and meta["ms"] is not None, msgs
        ms = float(meta["ms"])
        assert ms > 0, meta  # SHORT tokens arrive one by one, some ms apart
        m = re.fullmatch(r"first piece (\d+) ms, (\d+\.\d) ms/token( \(stopped at the length limit\))?", meta["text"])
        assert m, meta["text"]
        assert m.group(2) == f"{ms:.1f}"
        assert bool(m.group(3)) == (ref["finish_reason"] == "length")
    assert len(messages_shown(page)) == 6
    # the buttons are back to idle
    assert page.evaluate("[document.getElementById('send').disabled, document.getElementById('stop').disabled]") \
        == [False, True]
    check_no_errors(page)


def test_stop_ends_the_reply_and_the_chat_goes_on(open_page, server):
    """Stop during a long reply (no ?max_tokens: the server's default, up to the context): the page shows
    "stopped" with the text so far (a prefix of the full answer), the server stops generating, and the next message
    is answered as the API answers the conversation that includes the stopped reply."""
    page = open_page()
    first = "Tell me a long story."
    full = api_reply(server, [{"role": "user", "content": first}])["message"]["content"]
    assert len(full) > 50  # long enough to stop in the middle (the test model runs to its context)
    log_before = len(server.log())
    i = send_message(page, first)
    # click Stop as soon as the first piece is shown, from inside the page (no round trip in between)
    partial_at_click = page.evaluate(f"""new Promise((resolve, reject) => {{
        const t0 = performance.now();
        const tick = () => {{
          const m = document.querySelectorAll('.msg.assistant')[{i}];
          if (m && m.dataset.state === 'done') reject(new Error('the reply finished before Stop: ' + m.textContent));
          else if (m && m.textContent.length > 0) {{ document.getElementById('stop').click(); resolve(m.textContent); }}
          else if (performance.now() - t0 > 20000) reject(new Error('no reply text in 20 s'));
          else setTimeout(tick, 2);
        }};
        tick();
      }})""", timeout=25)
    stopped = wait_reply(page, i, timeout=10)
    assert stopped.startswith(partial_at_click)
    assert stopped and full.startswith(stopped) and len(stopped) < len(full), (stopped, full)
    msgs = messages_shown(page)
    assert (msgs[-1]["cls"], msgs[-1]["text"]) == ("msg meta", "stopped"), msgs
    assert page.evaluate("[document.getElementById('send').disabled, document.getElementById('stop').disabled]") \
        == [False, True]
    # the server noticed the client going away and stopped the generation on the devices
    deadline = time.monotonic() + 10
    while "client gone, generation stopped" not in server.log()[log_before:]:
        assert time.monotonic() < deadline, f"the server did not stop the generation: {server.log()[-2000:]}"
        time.sleep(0.05)

    second = "Shorter, please."
    j = send_message(page, second)
    assert j == i + 1
    shown = wait_reply(page, j, timeout=30)
    ref = api_reply(server, [{"role": "user", "content": first}, {"role": "assistant", "content": stopped},
                             {"role": "user", "content": second}])
    assert shown == ref["message"]["content"]
    msgs = messages_shown(page)
    assert msgs[-1]["cls"] == "msg meta" and msgs[-1]["ms"] is not None, msgs
    check_no_errors(page)


def test_screenshot_helper_saves_the_page_after_a_reply(server, tmp_path):
    out = tmp_path / "page.png"
    reply = screenshot(server.url + f"/?max_tokens={SHORT}", out, "Name a colour.", timeout=30, width=1000,
                       height=700)
    assert reply == api_reply(server, [{"role": "user", "content": "Name a colour."}], SHORT)["message"]["content"]
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (1000, 700)
    assert len(png) > 10000  # not a blank page (about 4 kB)
