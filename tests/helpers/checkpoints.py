"""Build small random-weight Llama checkpoints with transformers, plus a sentencepiece tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .spm import LLAMA_TOKENIZER_CONFIG, train_sentencepiece

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Named variants the acceptance list asks for: GQA and MHA, tied and untied, llama3 rope, odd sizes.
VARIANTS = {
    "gqa_tied": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=True),
    "mha_untied": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, tie_word_embeddings=False),
    "llama3_rope": dict(hidden_size=96, intermediate_size=224, num_hidden_layers=2, num_attention_heads=6,
                        num_key_value_heads=2, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 32}),
    "odd_sizes": dict(hidden_size=90, intermediate_size=173, num_hidden_layers=3, num_attention_heads=5,
                      num_key_value_heads=5, head_dim=18, vocab_size=523, tie_word_embeddings=False,
                      attention_bias=True, mlp_bias=True),
}


def make_llama(folder: Path, *, seed: int = 0, scale: float = 0.25, shard_size: str | None = None,
               legacy_config: bool = False, spm_dir: Path | None = None, **overrides) -> Path:
    """Save a random Llama (fp32) with tokenizer files into `folder`; returns the folder.

    Weights are drawn wider than transformers' default init (std `scale`) so logits are well separated and a
    greedy comparison tests the math, not rounding between near-ties.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = dict(vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
                  eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kwargs.update(overrides)
    config = LlamaConfig(**kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p) / (p.shape[-1] ** 0.5) * 4)
    save_kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, **save_kwargs)
    if legacy_config:
        _to_transformers4_keys(folder / "config.json")
    if spm_dir is not None and (spm_dir / "tokenizer.model").exists():
        (folder / "tokenizer.model").write_bytes((spm_dir / "tokenizer.model").read_bytes())
    else:
        train_sentencepiece(folder)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**LLAMA_TOKENIZER_CONFIG, "chat_template": CHAT_TEMPLATE}))
    return folder


def _to_transformers4_keys(path: Path) -> None:
    """Rewrite config.json the way transformers 4 wrote it: top-level rope_theta/rope_scaling, torch_dtype."""
    raw = json.loads(path.read_text())
    rope = raw.pop("rope_parameters", {}) or {}
    raw["rope_theta"] = rope.pop("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        raw["rope_scaling"] = {"type" if rope["rope_type"] == "linear" else "rope_type": rope.pop("rope_type"),
                               **rope}
    else:
        raw["rope_scaling"] = None
    if "dtype" in raw:
        raw["torch_dtype"] = raw.pop("dtype")
    path.write_text(json.dumps(raw, indent=2))
