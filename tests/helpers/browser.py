"""Headless Chromium driven over the Chrome DevTools Protocol (CDP), with aiohttp's websocket client only.

`Browser` starts `chromium --headless=new --remote-debugging-port=0` with a temporary profile, reads the DevTools
websocket address from its stderr and opens pages (`Browser.new_page()`): each `Page` has its own websocket to its
target and offers navigation (waiting for the load event), `Runtime.evaluate` (by value, promises awaited), polling
for a condition and PNG screenshots. Every wait is bounded; `close()` (or leaving the `with` block) closes the
browser, kills its process group and removes the profile.

The API is synchronous: the CDP connections live on an event loop in a private thread, so it works the same from
plain test functions, from scripts and from inside a running event loop (the calls block).

Tests import it as `helpers.browser` (tests/conftest.py puts tests/ on sys.path); scripts add the tests folder to
sys.path first (as scripts/synthetic.py does for helpers.spm):

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.browser import screenshot
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0


class BrowserError(RuntimeError):
    """The browser did not start, a CDP call failed or timed out, or page JavaScript threw."""


def find_browser() -> str | None:
    """The Chromium (or Chrome) binary: $MESHLLM_CHROMIUM, else the first of CANDIDATES on PATH; None if none."""
    env = os.environ.get("MESHLLM_CHROMIUM")
    if env:
        return env if os.path.exists(env) else shutil.which(env)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def missing_reason() -> str | None:
    """Why browser tests cannot run (for pytest.skip), or None when a browser is there."""
    if find_browser() is None:
        if os.environ.get("MESHLLM_CHROMIUM"):
            return f"MESHLLM_CHROMIUM={os.environ['MESHLLM_CHROMIUM']} is not a file nor a command on PATH"
        return (f"no Chromium binary: none of {', '.join(CANDIDATES)} is on PATH (apt-get install chromium, or set "
                f"MESHLLM_CHROMIUM to the binary)")
    return None


class _Cdp:
    """One CDP websocket: numbered calls matched to their replies, events handed to waiters."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, what: str) -> None:
        self.ws, self.what = ws, what
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future] = {}
        self._waiters: list[tuple[str, asyncio.Future]] = []
        self.console: list[str] = []  # console messages and uncaught exceptions of the page, for failure reports
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        error: BaseException = BrowserError(f"{self.what}: the DevTools connection closed")
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                obj = json.loads(msg.data)
                if "id" in obj:
                    fut = self._calls.pop(obj["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(obj)
                elif "method" in obj:
                    self._record(obj["method"], obj.get("params", {}))
                    for w in [w for w in self._waiters if w[0] == obj["method"]]:
                        self._waiters.remove(w)
                        if not w[1].done():
                            w[1].set_result(obj.get("params", {}))
        except Exception as e:  # noqa: BLE001 - handed to every pending call
            error = BrowserError(f"{self.what}: the DevTools connection failed: {e!r}")
        for fut in [*self._calls.values(), *(w[1] for w in self._waiters)]:
            if not fut.done():
                fut.set_exception(error)
        self._calls.clear()
        self._waiters.clear()

    def _record(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled":
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {args}")
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            self.console.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif method == "Log.entryAdded":
            e = params.get("entry", {})
            self.console.append(f"log.{e.get('level')}: {e.get('text')} {e.get('url', '')}".rstrip())

    def expect(self, event: str) -> asyncio.Future:
        """A future for the next `event` (register it before the call that causes the event)."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((event, fut))
        return fut

    async def call(self, method: str, params: dict | None = None, timeout: float = CALL_TIMEOUT_S) -> dict:
        if self._reader.done():
            raise BrowserError(f"{self.what}: the DevTools connection is closed ({method})")
        i = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[i] = fut
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params or {}}))
        try:
            async with asyncio.timeout(timeout):
                reply = await fut
        except TimeoutError:
            raise BrowserError(f"{self.what}: {method} got no answer in {timeout} s") from None
        finally:
            self._calls.pop(i, None)
        if "error" in reply:
            raise BrowserError(f"{self.what}: {method} failed: {reply['error']}")
        return reply.get("result", {})

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader


class Page:
    """One page target (a tab), with its own CDP connection."""

    def __init__(self, browser: "Browser", target_id: str, cdp: _Cdp) -> None:
        self.browser, self.target_id, self._cdp = browser, target_id, cdp

    def _run(self, coro, timeout: float):
        return self.browser._run(coro, timeout)

    def call(self, method: str, params: dict | None = None, timeout: float = CALL_TIMEOUT_S) -> dict:
        """A raw CDP call on this page; its `result`."""
        return self._run(self._cdp.call(method, params, timeout), timeout + 5)

    def goto(self, url: str, timeout: float = CALL_TIMEOUT_S) -> None:
        """Navigate and wait for the load event."""

        async def go() -> None:
            loaded = self._cdp.expect("Page.loadEventFired")
            try:
                r = await self._cdp.call("Page.navigate", {"url": url}, timeout)
                if r.get("errorText"):
                    raise BrowserError(f"cannot load {url}: {r['errorText']}")
                async with asyncio.timeout(timeout):
                    await loaded
            except TimeoutError:
                raise BrowserError(f"{url} did not finish loading in {timeout} s") from None
            finally:
                loaded.cancel()

        self._run(go(), timeout + 5)

    def evaluate(self, expression: str, timeout: float = CALL_TIMEOUT_S) -> Any:
        """The value of a JavaScript expression (a promise is awaited; the value must be JSON-able)."""

        async def ev() -> Any:
            r = await self._cdp.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                          "awaitPromise": True, "userGesture": True}, timeout)
            if "exceptionDetails" in r:
                d = r["exceptionDetails"]
                text = d.get("exception", {}).get("description") or d.get("text", "exception")
                raise BrowserError(f"JavaScript error in {expression[:200]!r}: {text}")
            return r.get("result", {}).get("value")

        return self._run(ev(), timeout + 5)

    def wait_for(self, expression: str, timeout: float = CALL_TIMEOUT_S, interval: float = 0.05) -> Any:
        """Evaluate `expression` until it is truthy; its value. BrowserError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        value = None
        while True:
            value = self.evaluate(expression, timeout=max(1.0, deadline - time.monotonic()))
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"not true within {timeout} s: {expression[:200]!r} (last value {value!r})")
            time.sleep(interval)

    def console(self) -> list[str]:
        """The page's console messages, uncaught exceptions and log entries (failed loads) so far."""
        return list(self._cdp.console)

    def type_text(self, selector: str, text: str, timeout: float = CALL_TIMEOUT_S) -> None:
        """Focus the element and type `text` into it as keyboard input would (Input.insertText)."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()", timeout)
        self.call("Input.insertText", {"text": text}, timeout)

    def press(self, key: str = "Enter", timeout: float = CALL_TIMEOUT_S) -> None:
        """Press and release a key (Enter, Escape, Tab, ...) on the focused element."""
        codes = {"Enter": (13, "\r"), "Escape": (27, ""), "Tab": (9, ""), "Backspace": (8, "")}
        vk, text = codes.get(key, (0, key if len(key) == 1 else ""))
        down = {"type": "keyDown", "key": key, "code": key, "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk}
        if text:
            down["text"] = text
        self.call("Input.dispatchKeyEvent", down, timeout)
        self.call("Input.dispatchKeyEvent", {"type": "keyUp", "key": key, "code": key, "windowsVirtualKeyCode": vk,
                                             "nativeVirtualKeyCode": vk}, timeout)

    def screenshot(self, out_png: Path | str | None = None, timeout: float = CALL_TIMEOUT_S) -> bytes:
        """A PNG of the viewport; written to `out_png` when given."""
        data = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"}, timeout)["data"])
        if out_png is not None:
            Path(out_png).write_bytes(data)
        return data

    def close(self) -> None:
        async def close() -> None:
            with contextlib.suppress(BrowserError):
                await self.browser._cdp.call("Target.closeTarget", {"targetId": self.target_id}, 5)
            await self._cdp.close()

        with contextlib.suppress(Exception):
            self._run(close(), 10)


class Browser:
    """A headless Chromium process with a temporary profile; use as a context manager or call close()."""

    def __init__(self, binary: str | None = None, *, width: int = 1280, height: int = 800,
                 timeout: float = START_TIMEOUT_S) -> None:
        self.binary = binary or find_browser()
        if self.binary is None:
            raise BrowserError(missing_reason())
        self.width, self.height = width, height
        self.profile = Path(tempfile.mkdtemp(prefix="meshllm-chromium-"))
        self.log_path = self.profile.with_name(self.profile.name + ".log")
        self.proc: subprocess.Popen | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cdp", daemon=True)
        self._thread.start()
        self._session: aiohttp.ClientSession | None = None
        self._cdp: _Cdp | None = None
        try:
            self._start(timeout)
        except BaseException:
            self.close()
            raise

    def _run(self, coro, timeout: float):
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise BrowserError(f"browser call did not finish in {timeout} s") from None

    def log(self) -> str:
        """The browser's stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _start(self, timeout: float) -> None:
        cmd = [self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
               f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}", "--no-first-run",
               "--no-default-browser-check", "--disable-extensions", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-background-timer-throttling",
               "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows", "--mute-audio",
               "about:blank"]
        with open(self.log_path, "wb") as err:
            # its own process group: close() ends the browser and all its helper processes (and only those)
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(r"DevTools listening on (ws://\S+)", self.log())
            if m:
                break
            if self.proc.poll() is not None:
                raise BrowserError(f"{self.binary} exited with {self.proc.returncode}: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise BrowserError(f"{self.binary} printed no DevTools address in {timeout} s: {self.log()[-2000:]}")
            time.sleep(0.05)
        self.ws_url = m.group(1)
        self.http_url = "http://" + self.ws_url.split("/")[2]

        async def connect() -> None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=timeout))
            ws = await self._session.ws_connect(self.ws_url, max_msg_size=0, autoping=True)
            self._cdp = _Cdp(ws, "browser")
            await self._cdp.call("Browser.getVersion", timeout=timeout)

        self._run(connect(), timeout + 5)

    def new_page(self, url: str | None = None, timeout: float = CALL_TIMEOUT_S) -> Page:
        """A new tab (about:blank, then `url` if given, waiting for its load event)."""

        async def open_page() -> Page:
            r = await self._cdp.call("Target.createTarget", {"url": "about:blank"}, timeout)
            target = r["targetId"]
            ws = await self._session.ws_connect(f"{self.http_url.replace('http', 'ws', 1)}/devtools/page/{target}",
                                                max_msg_size=0, autoping=True)
            cdp = _Cdp(ws, f"page {target[:8]}")
            await cdp.call("Page.enable", timeout=timeout)
            await cdp.call("Runtime.enable", timeout=timeout)
            await cdp.call("Log.enable", timeout=timeout)
            await cdp.call("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                                   "deviceScaleFactor": 1, "mobile": False},
                           timeout=timeout)
            return Page(self, target, cdp)

        page = self._run(open_page(), timeout + 5)
        if url is not None:
            try:
                page.goto(url, timeout)
            except BaseException:
                page.close()
                raise
        return page

    def close(self) -> None:
        """Close the browser, kill what is left of its process group, remove the profile. Idempotent."""
        if self._loop.is_running():
            async def shutdown() -> None:
                if self._cdp is not None:
                    with contextlib.suppress(BrowserError):
                        await self._cdp.call("Browser.close", timeout=3)
                    await self._cdp.close()
                if self._session is not None:
                    await self._session.close()

            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            if not self._loop.is_running():
                self._loop.close()
        if self.proc is not None:
            # the group we created holds the browser and its helpers (zygote, renderers, GPU/network services)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
            self.proc = None
        shutil.rmtree(self.profile, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.log_path.unlink()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the chat page ------------------------------------------------------------------------------------------------


def page_ready_js() -> str:
    """True once the chat page has read /health (the model and devices are shown)."""
    return ("document.getElementById('devices').textContent.startsWith('devices: ') && "
            "!document.getElementById('devices').textContent.includes('…') && "
            "!document.getElementById('model').textContent.includes('…')")


def assistant_count(page: Page) -> int:
    return page.evaluate("document.querySelectorAll('.msg.assistant').length")


def send_message(page: Page, text: str) -> int:
    """Type `text` into the chat page's box and press Enter; the index of the assistant message it starts."""
    n = assistant_count(page)
    page.type_text("#input", text)
    page.press("Enter")
    page.wait_for(f"document.querySelectorAll('.msg.assistant').length > {n}", timeout=10)
    return n


def reply_done_js(index: int) -> str:
    """The `index`-th assistant message's text once its data-state is "done", else null."""
    return (f"(() => {{ const m = document.querySelectorAll('.msg.assistant')[{index}];"
            f" return m && m.dataset.state === 'done' ? {{text: m.textContent}} : null; }})()")


def wait_reply(page: Page, index: int, timeout: float = 60.0) -> str:
    """The text of the `index`-th assistant message once it is done."""
    return page.wait_for(reply_done_js(index), timeout=timeout)["text"]


def chat_once(page: Page, text: str, timeout: float = 60.0) -> str:
    """Send `text` on the chat page and wait for the reply to finish; the reply's text."""
    return wait_reply(page, send_message(page, text), timeout)


def screenshot(url: str, out_png: Path, message: str, *, timeout: float = 120.0, width: int = 1280,
               height: int = 800) -> str:
    """Load the chat page at `url` (a `meshllm serve` address; add e.g. `?max_tokens=64` to cap the reply), wait
    for it to show the model, send `message`, wait for the whole reply and save a PNG of the page to `out_png`.
    Returns the reply's text. Raises BrowserError (no browser, a timeout, an error shown on the page)."""
    with Browser(width=width, height=height) as browser:
        page = browser.new_page(url, timeout=timeout)
        page.wait_for(page_ready_js(), timeout=timeout)
        reply = chat_once(page, message, timeout=timeout)
        page.screenshot(out_png)
        error = page.evaluate("(document.querySelector('.msg.error') || {}).textContent || null")
        if error:
            raise BrowserError(f"the chat page shows an error (screenshot saved in {out_png}): {error}")
        return reply
