"""`python -m meshllm generate` as a user runs it: a real process, stdout for results only."""

from __future__ import annotations

import json
import subprocess
import sys

QUESTION = "What is the capital of France?"


def test_cli_chat_json(smollm2_gguf):
    proc = subprocess.run(
        [sys.executable, "-m", "meshllm", "generate", "--model", str(smollm2_gguf), "--chat", "--prompt", QUESTION,
         "--max-tokens", "24", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert "Paris" in out["text"]
    assert out["token_ids"][-1] == 2 and out["prompt_tokens"] > 10
    assert out["ttft_s"] > 0 and out["token_latency_s"] > 0
    (device,) = out["devices"]
    assert device["role"] == "originator" and device["peak_rss_bytes"] > 100e6


def test_cli_streams_plain_text(smollm2_gguf):
    proc = subprocess.run(
        [sys.executable, "-m", "meshllm", "generate", "--model", str(smollm2_gguf), "--prompt", QUESTION,
         "--max-tokens", "24"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "The capital of France is Paris."
    assert "ms/token" in proc.stderr
