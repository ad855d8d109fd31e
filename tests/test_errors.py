"""Bad input gets a clear error naming the problem (and the fix), never a traceback from deep inside."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from helpers.checkpoints import VARIANTS
from meshllm.errors import (
    ConfigError,
    MissingTensorError,
    ModelFileError,
    PromptTooLongError,
    UnsupportedModelError,
)
from meshllm.generation.sampling import SamplingParams
from meshllm.runtime.local import LocalEngine


@pytest.fixture
def model_copy(make_model, tmp_path):
    src = make_model("gqa_tied", **VARIANTS["gqa_tied"])
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


async def test_missing_path(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        async with LocalEngine(tmp_path / "nowhere"):
            pass


async def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelFileError, match="config.json"):
        async with LocalEngine(model_copy):
            pass


async def test_malformed_config(model_copy):
    (model_copy / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON \(line 1"):
        async with LocalEngine(model_copy):
            pass


async def test_config_missing_key(model_copy):
    raw = json.loads((model_copy / "config.json").read_text())
    del raw["num_hidden_layers"]
    (model_copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="'num_hidden_layers' is missing"):
        async with LocalEngine(model_copy):
            pass


async def test_unsupported_architecture(model_copy):
    raw = json.loads((model_copy / "config.json").read_text())
    raw.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (model_copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*not supported"):
        async with LocalEngine(model_copy):
            pass


async def test_missing_tensor_is_named(model_copy):
    from safetensors.torch import load_file, save_file

    f = model_copy / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        async with LocalEngine(model_copy):
            pass


async def test_missing_shard_file_is_named(make_model, tmp_path):
    src = make_model("sharded", shard_size="60KB", **VARIANTS["gqa_tied"])
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    victim = sorted(dst.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelFileError, match=victim.name):
        async with LocalEngine(dst):
            pass


async def test_not_a_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ModelFileError, match=r"model\.gguf: GGUF version 0 is not supported"):
        async with LocalEngine(f):
            pass


async def test_prompt_longer_than_context(model_copy):
    raw = json.loads((model_copy / "config.json").read_text())
    raw["max_position_embeddings"] = 16
    (model_copy / "config.json").write_text(json.dumps(raw))
    async with LocalEngine(model_copy) as engine:
        with pytest.raises(PromptTooLongError, match="context is 16"):
            await engine.generate("word " * 40, SamplingParams(max_tokens=4), chat=False)
        # the engine still serves after a refused request
        result = await engine.generate("hi", SamplingParams(max_tokens=3, ignore_eos=True), chat=False)
        assert len(result.token_ids) == 3


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshllm", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_unknown_option():
    proc = run_cli("generate", "--prompt", "x", "--frobnicate")
    assert proc.returncode == 2
    assert "unrecognized arguments: --frobnicate" in proc.stderr
    assert proc.stdout == ""


def test_cli_bad_value_is_named():
    proc = run_cli("generate", "--prompt", "x", "--max-tokens", "zero")
    assert proc.returncode == 2
    assert "--max-tokens" in proc.stderr and "whole number" in proc.stderr


def test_cli_model_error_is_one_line_not_a_traceback(model_copy):
    (model_copy / "config.json").write_text("[]")
    proc = run_cli("generate", "--model", str(model_copy), "--prompt", "x")
    assert proc.returncode == 1
    assert "meshllm: error:" in proc.stderr and "expected a JSON object" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
