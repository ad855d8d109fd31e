"""GGUF files written as llama.cpp's converter writes them, run by meshllm against transformers on the original
folder: llama3 rope through the `rope_freqs` tensor, linear rope (folder and GGUF), the embedded vocabulary."""

from __future__ import annotations

import pytest
import torch

from helpers.checkpoints import VARIANTS
from helpers.gguf_export import export_gguf
from meshllm.runtime.local import LocalEngine
from meshllm.tokenizer import load_tokenizer
from helpers.reference import PROMPTS, assert_close_rel, hf_greedy, hf_model, ours_greedy

N_NEW = 24
LINEAR = dict(VARIANTS["gqa_tied"], rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})


@pytest.fixture(scope="module")
def exported(make_model, tmp_path_factory):
    """Factory: exported(variant, **llama_config) -> (folder, GGUF file), each exported once per module."""
    made = {}

    def export(name: str, **kwargs):
        if name not in made:
            folder = make_model(name, **kwargs)
            made[name] = folder, export_gguf(folder, tmp_path_factory.mktemp("gguf") / f"{name}.gguf")
        return made[name]

    return export


async def assert_runs_like_transformers(model_path, ref) -> LocalEngine:
    """Greedy ids over 3 prompts, then logits at every step of the last decode, prefill and KV cache (fp32)."""
    async with LocalEngine(model_path) as engine:
        for ids in sorted(PROMPTS, key=len):
            ours = await ours_greedy(engine, ids, N_NEW)
            assert ours == hf_greedy(ref, ids, N_NEW)
        # the longest prompt, last, reaches position 35: past the llama3 variant's original context (32)
        with torch.no_grad():
            ref_logits = ref(torch.tensor([ids + ours[:-1]])).logits[0]
        engine.worker.begin(len(ids) + N_NEW)
        prefill = engine.forward_sync(ids, 0, all_logits=True)
        steps = [engine.forward_sync([t], len(ids) + i)[-1] for i, t in enumerate(ours[:-1])]
        assert_close_rel(torch.cat([prefill, torch.stack(steps)]), ref_logits)
    return engine


async def test_gguf_rope_freqs_run_like_transformers(exported):
    """llama3 rope in GGUF is the `rope_freqs` tensor (no rope type): meshllm must read and apply it."""
    folder, path = exported("llama3_rope", **VARIANTS["llama3_rope"])
    engine = await assert_runs_like_transformers(path, hf_model(folder))
    assert engine.config.rope.freq_factors is not None
    assert not engine.config.tie_word_embeddings  # the untied head came from output.weight


@pytest.mark.parametrize("form", ["folder", "gguf"])
async def test_linear_rope_runs_like_transformers(exported, form):
    """Linear rope (positions divided by `factor`) from config.json and from GGUF's rope.scaling keys."""
    folder, path = exported("linear_rope", **LINEAR)
    engine = await assert_runs_like_transformers(folder if form == "folder" else path, hf_model(folder))
    assert (engine.config.rope.rope_type, engine.config.rope.factor) == ("linear", 4.0)
    assert engine.config.tie_word_embeddings  # no output.weight: the head is the embedding


def test_exported_gguf_tokenizer_encodes_like_the_folder(exported):
    """The GGUF's embedded sentencepiece vocabulary against the folder's tokenizer.model (meshllm, transformers)."""
    from transformers import AutoTokenizer

    folder, path = exported("gqa_tied", **VARIANTS["gqa_tied"])
    ours, folder_tok = load_tokenizer(path), load_tokenizer(folder)
    ref = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert (ours.bos_id, ours.eos_ids, ours.add_bos) == (1, (2,), True)
    # words outside the training corpus are split by the merge order (recovered from the scores) alone
    texts = ["Hello world", "Several layers were gathered together", "networking devices", "  two  spaces",
             "café naïve 42", "你好 🚀 模型", "</s> after eos text"]
    for text in texts:
        assert ours.encode(text) == folder_tok.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == ref.decode(ref.encode(text),
                                                                                     skip_special_tokens=True)


def test_a_rope_scaling_we_cannot_run_is_refused_by_name(exported):
    """YaRN is not implemented: a folder or GGUF that asks for it is refused, never run as plain rope."""
    from meshllm.errors import UnsupportedModelError
    from meshllm.model.source import open_model

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 128}
    folder, gguf_file = exported("yarn_rope", **dict(VARIANTS["gqa_tied"], rope_parameters=yarn))
    for path in (folder, gguf_file):
        with pytest.raises(UnsupportedModelError, match="rope type 'yarn' is not supported"):
            open_model(path)
