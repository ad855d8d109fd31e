"""Random-weight Llama checkpoints of real model shapes, written straight to safetensors (for benchmarks)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

SHAPES = {
    # TinyLlama-1.1B's shape
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                           tie_word_embeddings=False),
    # small enough for a thousand requests in minutes (the soak test)
    "soak-small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024,
                       tie_word_embeddings=True),
    # Llama-3.2-3B's shape
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                     tie_word_embeddings=True),
}


def make_synthetic(folder: Path, shape: str = "tinyllama-1.1b", dtype: torch.dtype = torch.bfloat16,
                   seed: int = 0) -> Path:
    """Write config.json, model.safetensors and a small sentencepiece tokenizer.model (once)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.model").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(SHAPES[shape])
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(dtype)

    tensors = {"model.embed_tokens.weight": rand(cfg["vocab_size"], d), "model.norm.weight": torch.ones(d, dtype=dtype)}
    if not cfg["tie_word_embeddings"]:
        tensors["lm_head.weight"] = rand(cfg["vocab_size"], d)
    for i in range(L):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(d, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=dtype),
            p + "self_attn.q_proj.weight": rand(d, d),
            p + "self_attn.k_proj.weight": rand(kv, d),
            p + "self_attn.v_proj.weight": rand(kv, d),
            p + "self_attn.o_proj.weight": rand(d, d),
            p + "mlp.gate_proj.weight": rand(f, d),
            p + "mlp.up_proj.weight": rand(f, d),
            p + "mlp.down_proj.weight": rand(d, f),
        })
    save_file(tensors, str(folder / "model.safetensors.tmp"), metadata={"format": "pt"})
    (folder / "model.safetensors.tmp").rename(folder / "model.safetensors")
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
               rope_theta=10000.0, bos_token_id=1, eos_token_id=2, torch_dtype=str(dtype).replace("torch.", ""))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers.spm import train_sentencepiece

    train_sentencepiece(folder)
    return folder
