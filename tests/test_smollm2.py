"""The real embedded model: SmolLM2-135M-Instruct GGUF, against transformers loading the same file."""

from __future__ import annotations

import pytest
import pytest_asyncio
import torch

from meshllm.generation.sampling import SamplingParams
from meshllm.runtime.local import LocalEngine

QUESTION = "What is the capital of France?"

# one engine (one event loop) for the whole module: loading the model once keeps the file fast
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(pretrained_model_name_or_path=str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return AutoModelForCausalLM.from_pretrained(**kwargs).eval(), AutoTokenizer.from_pretrained(**kwargs)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(smollm2_gguf):
    """The file dequantized to fp32, as transformers loads it (the packed formats are tests/test_smollm2_packed.py)."""
    async with LocalEngine(smollm2_gguf, quantize="none") as e:
        yield e


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": QUESTION}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Name three primary colours."}],
    "Once upon a time, in a small village by the sea,",
])
async def test_greedy_ids_match_transformers_gguf(engine, hf_smollm2, messages):
    model, tok = hf_smollm2
    if isinstance(messages, str):
        ref_ids = tok(messages)["input_ids"]
        ours_ids = engine.encode_prompt(messages, chat=False)
    else:
        ref_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ref_ids = ref_ids["input_ids"] if not isinstance(ref_ids, list) else ref_ids
        ours_ids = engine.encode_prompt(messages)
    assert ours_ids == ref_ids
    n = 32
    from transformers import GenerationConfig

    model.generation_config.eos_token_id = None  # run past <|im_end|> like ignore_eos, for a long comparison
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=2)
    with torch.no_grad():
        # an explicit mask: otherwise transformers takes every pad id (<|im_end|>, 2) in the prompt for padding
        prompt = torch.tensor([ref_ids])
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                  generation_config=gc)[0, len(ref_ids):].tolist()
    result = await engine.generate(messages, SamplingParams(max_tokens=n, ignore_eos=True),
                                   chat=not isinstance(messages, str))
    assert result.token_ids == expected
    assert result.prompt_tokens == len(ref_ids)


async def test_chat_answers_paris_and_stops_at_eos(engine, hf_smollm2):
    _, tok = hf_smollm2
    result = await engine.generate(QUESTION, SamplingParams(max_tokens=40))
    assert "Paris" in result.text
    assert result.finish_reason == "stop" and result.token_ids[-1] == 2  # <|im_end|>
    assert result.text == tok.decode(result.token_ids, skip_special_tokens=True)


async def test_stream_pieces_join_to_the_text(engine):
    result_pieces = []
    async for piece in engine.stream("Write a haiku about the sea.", SamplingParams(max_tokens=30)):
        result_pieces.append(piece)
    full = await engine.generate("Write a haiku about the sea.", SamplingParams(max_tokens=30))
    assert "".join(result_pieces) == full.text and len(result_pieces) > 3


async def test_stop_string_ends_generation_without_printing_it(engine):
    full = await engine.generate(QUESTION, SamplingParams(max_tokens=40))
    cut = full.text.index("Paris")
    result = await engine.generate(QUESTION, SamplingParams(max_tokens=40, stop=("Paris",)))
    assert result.text == full.text[:cut]
    assert result.finish_reason == "stop"

