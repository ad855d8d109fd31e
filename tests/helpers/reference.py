"""The independent reference for model math: transformers' Llama, greedy decoding and logits, and our side of it."""

from __future__ import annotations

import torch

from meshllm.generation.loop import Result, generate
from meshllm.generation.sampling import SamplingParams
from meshllm.runtime.local import LocalEngine

PROMPTS = [
    [1, 17, 230, 45, 99, 311],
    [1, 400, 3, 3, 3, 77, 180, 22, 5, 9, 500, 64],
    [1, 250],
]
N_NEW = 32


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        prompt = torch.tensor([ids])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gc)
    return out[0, len(ids):].tolist()


async def ours_greedy(engine: LocalEngine, ids: list[int], n: int) -> list[int]:
    result = Result()
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    async for _ in generate(engine, engine.tokenizer, ids, params, result):
        pass
    return result.token_ids


def assert_close_rel(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} exceeds {rel} x max |logit| {scale:.3g}"


NEAR_TIE = 0.05  # a top-2 logit margin within the bf16 rounding of the quantized kernels' outputs


def top2_margins(engine: LocalEngine, prompt_ids: list[int], ids: list[int]) -> list[float]:
    """The margin between the two likeliest logits at each generated position of `ids` (teacher-forced on one
    engine). Where it is below NEAR_TIE, bf16 rounding alone can make another split of the model pick the other."""
    full = prompt_ids + ids
    engine.worker.begin(len(full))
    lg = engine.forward_sync(full[:-1], 0, all_logits=True)[len(prompt_ids) - 1:]
    top = lg.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()
