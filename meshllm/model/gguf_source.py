"""GGUF files (llama.cpp's format): metadata -> ModelConfig, tensors dequantized to fp32 on read."""

from __future__ import annotations

import logging
import mmap
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, MissingTensorError, UnsupportedModelError
from .config import ModelConfig, RopeConfig
from .gguf_meta import read_header, tensor_array

log = logging.getLogger("meshllm.model")

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.bias": "ffn_down.bias",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(name: str) -> str:
    """transformers tensor name -> GGUF tensor name."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return name


class GGUFSource:
    """A Llama-architecture GGUF file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        header = read_header(path)  # raises ModelFileError naming the problem
        self._tensors = dict(header.tensors)
        self.metadata = dict(header.metadata)
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.config = self._config()

    def _config(self) -> ModelConfig:
        md, src = self.metadata, str(self.path)
        arch = md.get("general.architecture")
        if arch != "llama":
            raise UnsupportedModelError(
                f"{src}: GGUF architecture {arch!r} is not supported; meshllm runs Llama-architecture models"
            )

        def need(key: str) -> Any:
            full = f"llama.{key}"
            if full not in md:
                raise ConfigError(f"{src}: GGUF metadata key {full!r} is missing")
            return md[full]

        hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
        kv_heads = int(md.get("llama.attention.head_count_kv", heads))
        embd = self._tensors.get("token_embd.weight")
        vocab = md.get("llama.vocab_size") or len(md.get("tokenizer.ggml.tokens", ())) or (
            int(embd.dims[1]) if embd is not None and len(embd.dims) > 1 else 0)
        freq_factors = None
        if "rope_freqs.weight" in self._tensors:
            freq_factors = tuple(float(f) for f in self.get("rope_freqs.weight").reshape(-1))
        scaling = str(md.get("llama.rope.scaling.type", "none"))
        rope_type = "default" if scaling in ("none", "") else scaling  # validate() refuses a type we cannot run
        eos = md.get("tokenizer.ggml.eos_token_id")
        eot = md.get("tokenizer.ggml.eot_token_id")
        config = ModelConfig(
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(md.get("llama.rope.dimension_count") or md.get("llama.attention.key_length")
                         or hidden // heads),
            vocab_size=int(vocab),
            rms_norm_eps=float(md.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(md.get("llama.context_length", 2048)),
            rope=RopeConfig(
                theta=float(md.get("llama.rope.freq_base", 10000.0)),
                rope_type=rope_type,
                factor=float(md.get("llama.rope.scaling.factor", 1.0)),
                freq_factors=freq_factors,
            ),
            tie_word_embeddings="output.weight" not in self._tensors,
            attention_bias="blk.0.attn_q.bias" in self._tensors,
            mlp_bias="blk.0.ffn_gate.bias" in self._tensors,
            dtype="float32",
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(i for i in dict.fromkeys([eos, eot]) if isinstance(i, int)),
        )
        config.validate(src)
        return config

    def matrix_types(self) -> set[int]:
        """The GGML types of the file's 2-D tensors (its weight matrices)."""
        return {t.ggml_type for t in self._tensors.values() if len(t.dims) == 2}

    def raw_type(self, name: str) -> int:
        """The GGML type a tensor is stored in."""
        gname = gguf_name(name)
        if gname not in self._tensors:
            raise MissingTensorError(f"tensor {gname!r} ({name}) is missing from {self.path}")
        return self._tensors[gname].ggml_type

    def has(self, name: str) -> bool:
        return gguf_name(name) in self._tensors

    def forget(self) -> None:
        """Drop the file pages read so far from this process's memory (the page cache keeps them): loading copies
        every tensor it keeps, so without this a process would hold the file beside its own weights."""
        self._map.madvise(mmap.MADV_DONTNEED)

    def raw(self, name: str, rows: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
        """Rows of a tensor as stored, and its GGML type: F32/F16 as floats (rows, cols), other types as their raw
        bytes (rows, bytes per row; a row is whole blocks). q and k rows come in transformers' order."""
        gname = gguf_name(name)
        if gname not in self._tensors:
            raise MissingTensorError(f"tensor {gname!r} ({name}) is missing from {self.path}")
        t = self._tensors[gname]
        data = tensor_array(self._map, t)
        if rows is not None:
            data = data[rows[0]:rows[1]]
        if gname.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            # GGUF interleaves each head's rotary halves; rows stay inside their head, so undo per head (a raw row
            # of blocks moves as a whole)
            hd = self.config.head_dim
            data = data.reshape(data.shape[0] // hd, hd // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        return data, t.ggml_type

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """float32 rows `index` of a 2-D tensor, read from the file's pages (only those rows), dequantized by the
        gguf package (the reference)."""
        import gguf

        gname = gguf_name(name)
        if gname not in self._tensors:
            raise MissingTensorError(f"tensor {gname!r} ({name}) is missing from {self.path}")
        t = self._tensors[gname]
        data = tensor_array(self._map, t)[index]
        if data.dtype != np.uint8:
            return data.astype(np.float32)
        return np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType(t.ggml_type)), dtype=np.float32)

    def get(self, name: str, rows: tuple[int, int] | None = None,
            cols: tuple[int, int] | None = None) -> torch.Tensor:
        import gguf

        data, qtype = self.raw(name, rows)  # quantized rows are whole blocks: a row slice dequantizes on its own
        w = data.astype(np.float32) if data.dtype != np.uint8 else np.asarray(
            gguf.quants.dequantize(data, gguf.GGMLQuantizationType(qtype)), dtype=np.float32)
        if cols is not None:
            w = w[:, cols[0]:cols[1]]
        w = np.ascontiguousarray(w)
        if not w.flags.writeable:  # plain F32 tensors come straight from the read-only memory map
            w = w.copy()
        return torch.from_numpy(w)

    def close(self) -> None:
        self._tensors.clear()
        try:
            self._map.close()
        except BufferError:  # a view of it is still alive somewhere: the map closes when that is collected
            pass
