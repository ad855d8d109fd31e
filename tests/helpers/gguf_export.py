"""Export a small Hugging Face Llama folder (fp32 safetensors + sentencepiece tokenizer.model) to a Llama GGUF file.

Written from llama.cpp's convert_hf_to_gguf.py (LlamaModel, `_set_vocab_sentencepiece`) and gguf-py's constants,
and independent of meshllm's own readers, so the tests that load the result check meshllm against llama.cpp's
layout rather than against itself.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

# One type for every 2-D weight, or GGUF name patterns (fnmatch, first match wins; unmatched names stay F32),
# e.g. {"token_embd.weight": QType.Q8_0, "*": QType.Q4_0}. 1-D tensors (norms, biases, rope_freqs) stay F32.
WeightTypes = QType | Mapping[str, QType]

# llama.cpp's sentencepiece token types (SentencePieceTokenTypes in convert_hf_to_gguf.py)
_NORMAL, _UNKNOWN, _CONTROL, _UNUSED, _BYTE = 1, 2, 3, 5, 6


def _weight_type(name: str, types: WeightTypes) -> QType:
    if isinstance(types, QType):
        return types
    return next((t for pattern, t in types.items() if fnmatch.fnmatchcase(name, pattern)), QType.F32)


def to_gguf_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows (each head's rotary halves split) -> GGUF's layout (the halves interleaved), per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(rope: Mapping, head_dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs`: per-frequency divisors of the base frequencies for Llama 3.1 rope."""
    theta, factor = rope.get("rope_theta", 10000.0), rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:  # short wavelengths: kept
            out.append(1.0)
        elif wavelen > old_ctx / low:  # long wavelengths: slowed down by `factor`
            out.append(factor)
        else:  # between: a smooth ramp, as a divisor
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _add_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    # as llama.cpp does, ids the checkpoint has beyond the tokenizer's pieces are unused padding tokens
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [_UNUSED] * vocab_size
    for i in range(min(sp.get_piece_size(), vocab_size)):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (_UNKNOWN if sp.is_unknown(i) else _CONTROL if sp.is_control(i) else
                    _UNUSED if sp.is_unused(i) else _BYTE if sp.is_byte(i) else _NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for add, token_id in ((writer.add_bos_token_id, sp.bos_id()), (writer.add_eos_token_id, sp.eos_id()),
                          (writer.add_unk_token_id, sp.unk_id())):
        if token_id >= 0:
            add(token_id)
    tok_config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text()) if tok_config_path.exists() else {}
    writer.add_add_bos_token(bool(tok_config.get("add_bos_token", True)))
    writer.add_add_eos_token(bool(tok_config.get("add_eos_token", False)))
    if tok_config.get("chat_template"):
        writer.add_chat_template(tok_config["chat_template"])


def export_gguf(folder: Path, out: Path, weight_types: WeightTypes = QType.F32) -> Path:
    """Write the Llama checkpoint in `folder` as GGUF file `out`, 2-D weights as `weight_types`; returns `out`."""
    from safetensors.numpy import load_file

    folder, out = Path(folder), Path(out)
    hp = json.loads((folder / "config.json").read_text())
    # transformers 5 keys (rope_parameters) or transformers 4 keys (rope_theta, rope_scaling)
    rope = hp.get("rope_parameters") or {"rope_theta": hp.get("rope_theta", 10000.0),
                                         **(hp.get("rope_scaling") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    n_head, n_layers, hidden = hp["num_attention_heads"], hp["num_hidden_layers"], hp["hidden_size"]
    n_kv = hp.get("num_key_value_heads") or n_head
    head_dim = hp.get("head_dim") or hidden // n_head

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(hp.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(hp["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_vocab_size(hp["vocab_size"])
    if rope_type in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_type))
        writer.add_rope_scaling_factor(float(rope["factor"]))
    _add_vocab(writer, folder, hp["vocab_size"])

    weights: dict[str, np.ndarray] = {}
    for part in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(part))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for name, w in weights.items():
        if name == "lm_head.weight" and hp.get("tie_word_embeddings", False):
            continue  # a tied head is the embedding: llama.cpp writes no output.weight
        w = w.astype(np.float32)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = to_gguf_rotary(w, n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            w = to_gguf_rotary(w, n_kv)
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        qtype = _weight_type(gname, weight_types) if w.ndim == 2 else QType.F32
        writer.add_tensor(gname, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    if rope_type == "llama3":
        # llama3 rope has no GGUF rope type: llama.cpp's converter writes the scaled frequencies as this tensor
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(rope, head_dim))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
