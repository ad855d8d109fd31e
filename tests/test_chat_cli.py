"""`python -m meshllm chat` as a user runs it (a real process, its stdin and signals): the conversation is kept
between turns, /reset clears it, Ctrl-C stops a reply and not the chat; replies are the engine's own answers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

from helpers.checkpoints import VARIANTS
from meshllm.generation.sampling import SamplingParams
from meshllm.runtime.local import LocalEngine

N = 8


def chat_proc(model, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "meshllm", "chat", "--model", str(model), "--threads", "1",
                             "--temperature", "0", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def replies(model, turns: list[list[str]]) -> list[str]:
    """The engine's greedy replies to each conversation (lists of user turns; assistant turns filled in)."""
    out = []
    async with LocalEngine(model, threads=1) as e:
        for conversation in turns:
            messages = []
            for text in conversation:
                messages.append({"role": "user", "content": text})
                r = await e.generate(messages, SamplingParams(max_tokens=N), chat=True)
                messages.append({"role": "assistant", "content": r.text})
            out.append(r.text)
    return out


def test_turns_keep_the_conversation_and_reset_clears_it(make_model):
    model = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    proc = chat_proc(model, "--max-tokens", str(N))
    out, err = proc.communicate(b"Hello\nTell me more.\n/reset\nHello\n/nonsense\n/quit\nnever read\n", timeout=120)
    assert proc.returncode == 0, err.decode()
    first, second, again = asyncio.run(replies(model, [["Hello"], ["Hello", "Tell me more."], ["Hello"]]))
    assert out.decode() == f"{first}\n{second}\n{again}\n"
    err = err.decode()
    stats = re.findall(r"\((\d+) tokens, [\d.]+ ms/token, (\d+) of (\d+) prompt tokens cached\)", err)
    assert len(stats) == 3
    assert int(stats[1][1]) > 0  # the second turn computed only what followed the first
    assert int(stats[2][1]) < int(stats[1][1])  # after /reset the conversation started again
    assert "(conversation cleared)" in err and "unknown command /nonsense" in err


def test_ctrl_c_stops_the_reply_not_the_chat(make_model):
    model = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    proc = chat_proc(model, "--max-tokens", "200")
    try:
        proc.stdin.write(b"Tell me a long story.\n")
        proc.stdin.flush()
        os.set_blocking(proc.stdout.fileno(), False)
        deadline = time.monotonic() + 60
        got = b""
        while not got and time.monotonic() < deadline:  # the reply has started
            got = proc.stdout.read() or b""
            time.sleep(0.01)
        assert got, "no reply started"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None, "Ctrl-C ended the chat"
        os.set_blocking(proc.stdout.fileno(), True)
        out, err = proc.communicate(b"Hello\n/quit\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    err = err.decode()
    stopped = re.search(r"\(stopped, (\d+) tokens", err)
    assert stopped and int(stopped.group(1)) < 200, err
    # the next turn runs: one more stats line, and its reply came out
    assert len(re.findall(r"prompt tokens cached\)", err)) == 2
    assert (got + out).count(b"\n") >= 2
