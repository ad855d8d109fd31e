"""`python -m meshllm generate` as a user runs it: a real process, stdout for results only."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

QUESTION = "What is the capital of France?"


@pytest.fixture(autouse=True)
def _restore_logging():
    """cli.main() run in-process configures the meshllm logger; later tests' caplog needs it as it was."""
    root = logging.getLogger("meshllm")
    saved = root.handlers[:], root.level, root.propagate
    yield
    root.handlers[:], root.level, root.propagate = saved


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


def generate(model, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "meshllm", "generate", "--model", str(model), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_streams_plain_text(smollm2_gguf):
    proc = generate(smollm2_gguf, "--prompt", QUESTION, "--max-tokens", "24")
    assert proc.stdout.strip() == "The capital of France is Paris."
    assert "ms/token" in proc.stderr
    assert "--max-tokens" not in proc.stderr  # it ended at its EOS, well before the limit


def test_cli_says_on_stderr_when_it_stops_at_max_tokens(smollm2_gguf):
    proc = generate(smollm2_gguf, "--prompt", QUESTION, "--max-tokens", "3")
    assert proc.stdout.strip() == "The capital of"
    notices = [line for line in proc.stderr.splitlines() if "--max-tokens" in line]
    assert notices == ["meshllm: stopped at --max-tokens 3: the answer may be cut short (raise --max-tokens for more)"]


@pytest.fixture
def started(monkeypatch) -> list:
    """The device processes LocalCluster tried to start (none is started: the test only checks that none is)."""
    from meshllm.runtime import launcher

    calls = []

    async def no_process(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a device process was started")

    monkeypatch.setattr(launcher.asyncio, "create_subprocess_exec", no_process)
    return calls


def test_too_many_local_devices_fail_before_any_process_starts(smollm2_gguf, started, capsys):
    """SmolLM2 has 9 attention heads: 10 devices cannot work, and no device process may be started to find out."""
    from meshllm import cli

    code = cli.main(["generate", "--model", str(smollm2_gguf), "--prompt", "hi", "--local-devices", "10"])
    err = capsys.readouterr().err
    assert code == 1 and not started
    assert "10 devices but the model has only 9 attention heads" in err and "use at most 9" in err


def test_local_devices_beyond_this_machines_memory_fail_before_any_process_starts(smollm2_gguf, started, monkeypatch,
                                                                                   capsys):
    from meshllm import cli
    from meshllm.discovery import probe

    monkeypatch.setattr(probe, "available_memory", lambda: 900 * 2**20)  # a small machine
    code = cli.main(["generate", "--model", str(smollm2_gguf), "--prompt", "hi", "--local-devices", "3"])
    err = capsys.readouterr().err
    assert code == 1 and not started
    assert "3 local devices need about" in err and "900.0 MiB is available" in err and "--memory-budget" in err


def test_the_early_plan_check_is_quick_as_a_real_process(smollm2_gguf):
    proc = subprocess.run(
        [sys.executable, "-m", "meshllm", "generate", "--model", str(smollm2_gguf), "--prompt", "hi",
         "--local-devices", "50"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("meshllm: error: 50 devices but the model has only 9")
    assert "Traceback" not in proc.stderr and "started" not in proc.stderr


def test_usage_errors_are_one_line_and_help_shows_defaults(capsys):
    from meshllm import cli

    def run(*args) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(list(args))
        out, err = capsys.readouterr()
        return exit_.value.code, out, err

    code, _, err = run("generate", "--max-tokens", "0", "--prompt", "x")
    assert code == 2
    assert err.splitlines() == [
        "meshllm generate: error: argument --max-tokens: must be at least 1, got 0 (see `meshllm generate --help`)"]
    code, _, missing = run("generate")
    assert code == 2 and len(missing.splitlines()) == 1 and "--prompt" in missing
    assert "usage:" not in err + missing

    assert "default: 128" in " ".join(run("generate", "--help")[1].split())
    assert "default: 7340 when free, else any free port" in " ".join(run("join", "--help")[1].split())
    code, out, _ = run("secret", "--help")
    assert code == 0 and "Print a new random mesh secret" in " ".join(out.split())


def test_the_readme_command_on_local_devices_gives_the_ids_of_one_device(smollm2_gguf):
    """The README's headline run: `generate --chat --local-devices 3` on the real GGUF, the same ids as one device."""
    import asyncio

    from meshllm import LocalEngine, SamplingParams

    async def alone():
        async with LocalEngine(smollm2_gguf) as engine:
            return await engine.generate(QUESTION, SamplingParams(max_tokens=24), chat=True)

    expected = asyncio.run(alone())
    proc = generate(smollm2_gguf, "--chat", "--prompt", QUESTION, "--local-devices", "3", "--max-tokens", "24",
                    "--json")
    out = json.loads(proc.stdout)
    assert out["token_ids"] == expected.token_ids and out["text"] == expected.text == "The capital of France is Paris."
    # the planner's choice over the three (on one machine they share its cores and memory: one device alone),
    # its prediction next to this run's measurement, and every plan it weighed
    plan = out["plan"]
    assert plan["kind"] == plan["candidates"][0]["kind"] and plan["measured"]["token_ms"] > 0
    assert {c["kind"] for c in plan["candidates"]} == {"single", "tp", "pipeline", "hybrid"}
    roles = sorted(d["role"] for d in out["devices"])
    assert roles.count("originator") == 1 and roles.count("hub") == len(plan["describe"].split("->"))
    assert 0.999 <= sum(d["share"] for d in out["devices"]) < 1.01  # every device holds its own copy of the norms
    assert {d["weight_format"] for d in out["devices"]} == {"gguf"}  # the file's 4- and 8-bit formats, kept packed


def test_joins_limit_flags_default_to_the_devices_limits():
    from meshllm.cli import build_parser
    from meshllm.runtime.device import Limits

    args = build_parser().parse_args(["join"])
    assert Limits(args.max_pending, args.max_pending_per_address, args.max_sessions,
                  args.max_sessions_per_link) == Limits()
    args = build_parser().parse_args(["join", "--max-sessions", "3", "--max-pending-per-address", "2"])
    assert (args.max_sessions, args.max_pending_per_address) == (3, 2)
