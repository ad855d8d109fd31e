"""Build a shard's blocks from a model source: only the rows and columns the shard computes are read."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .config import ModelConfig
from .layers import AttnBlock, HeadWeights, MlpBlock, kv_index_for
from .shard import Shard
from .source import ModelSource

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | None, config: ModelConfig) -> torch.dtype:
    """The compute dtype: the one asked for, else the checkpoint's own."""
    key = (name or config.dtype or "float32").replace("torch.", "")
    key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32", "half": "float16"}.get(
        key, key)
    if key not in DTYPES:
        raise ConfigError(f"dtype {name or config.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def _get(src: ModelSource, name: str, shape: tuple[int, ...], dtype: torch.dtype, rows=None, cols=None):
    t = src.get(name, rows=rows, cols=cols)
    if tuple(t.shape) != shape:
        raise ConfigError(
            f"tensor {name!r} read as shape {tuple(t.shape)}, but the model config implies {shape}: "
            f"config and weights disagree"
        )
    return t.to(dtype)


def _bias(src: ModelSource, name: str, n: int, dtype: torch.dtype, rows=None) -> torch.Tensor:
    return _get(src, name, (n,), dtype, rows=rows)


def load_attn_block(src: ModelSource, layer: int, shard: Shard, dtype: torch.dtype) -> AttnBlock:
    """This shard's attention slice of one layer (q rows of its heads, k/v rows of the kv heads they need)."""
    c = src.config
    d, hd = c.hidden_size, c.head_dim
    p = f"model.layers.{layer}."
    kv0, kv1 = shard.kv_range(c)
    nq, nkv = shard.num_q, kv1 - kv0
    qr, kvr = (shard.q_start * hd, shard.q_stop * hd), (kv0 * hd, kv1 * hd)
    norm = _get(src, p + "input_layernorm.weight", (d,), dtype)
    if nq == 0:
        wqkv = torch.empty(0, d, dtype=dtype)
        wo = torch.empty(d, 0, dtype=dtype)
        bqkv = None
    else:
        wqkv = torch.cat([
            _get(src, p + "self_attn.q_proj.weight", (nq * hd, d), dtype, rows=qr),
            _get(src, p + "self_attn.k_proj.weight", (nkv * hd, d), dtype, rows=kvr),
            _get(src, p + "self_attn.v_proj.weight", (nkv * hd, d), dtype, rows=kvr),
        ])
        wo = _get(src, p + "self_attn.o_proj.weight", (d, nq * hd), dtype, cols=qr)
        bqkv = None
        if c.attention_bias:
            bqkv = torch.cat([
                _bias(src, p + "self_attn.q_proj.bias", nq * hd, dtype, rows=qr),
                _bias(src, p + "self_attn.k_proj.bias", nkv * hd, dtype, rows=kvr),
                _bias(src, p + "self_attn.v_proj.bias", nkv * hd, dtype, rows=kvr),
            ])
    bo = _bias(src, p + "self_attn.o_proj.bias", d, dtype) if c.attention_bias and shard.owns_bias else None
    return AttnBlock(norm=norm, wqkv=wqkv, bqkv=bqkv, wo=wo, bo=bo, num_q=nq, num_kv=nkv, head_dim=hd,
                     eps=c.rms_norm_eps, kv_index=kv_index_for(c, shard.q_start, shard.q_stop))


def load_mlp_block(src: ModelSource, layer: int, shard: Shard, dtype: torch.dtype) -> MlpBlock:
    """This shard's MLP slice of one layer (its gate/up rows, the matching down columns)."""
    c = src.config
    d, n = c.hidden_size, shard.num_mlp
    p = f"model.layers.{layer}."
    cr = (shard.mlp_start, shard.mlp_stop)
    norm = _get(src, p + "post_attention_layernorm.weight", (d,), dtype)
    if n == 0:
        return MlpBlock(norm=norm, w13=torch.empty(0, d, dtype=dtype), b13=None,
                        w2=torch.empty(d, 0, dtype=dtype),
                        b2=_bias(src, p + "mlp.down_proj.bias", d, dtype) if c.mlp_bias and shard.owns_bias
                        else None, eps=c.rms_norm_eps)
    w13 = torch.cat([
        _get(src, p + "mlp.gate_proj.weight", (n, d), dtype, rows=cr),
        _get(src, p + "mlp.up_proj.weight", (n, d), dtype, rows=cr),
    ])
    b13 = None
    if c.mlp_bias:
        b13 = torch.cat([_bias(src, p + "mlp.gate_proj.bias", n, dtype, rows=cr),
                         _bias(src, p + "mlp.up_proj.bias", n, dtype, rows=cr)])
    w2 = _get(src, p + "mlp.down_proj.weight", (d, n), dtype, cols=cr)
    b2 = _bias(src, p + "mlp.down_proj.bias", d, dtype) if c.mlp_bias and shard.owns_bias else None
    return MlpBlock(norm=norm, w13=w13, b13=b13, w2=w2, b2=b2, eps=c.rms_norm_eps)


def load_head(src: ModelSource, dtype: torch.dtype) -> HeadWeights:
    """The originator's embedding, final norm and LM head (tied to the embedding when the model says so)."""
    c = src.config
    embed = _get(src, "model.embed_tokens.weight", (c.vocab_size, c.hidden_size), dtype)
    norm = _get(src, "model.norm.weight", (c.hidden_size,), dtype)
    if c.tie_word_embeddings:
        lm_head = embed
    else:
        lm_head = _get(src, "lm_head.weight", (c.vocab_size, c.hidden_size), dtype)
    return HeadWeights(embed=embed, norm=norm, lm_head=lm_head, eps=c.rms_norm_eps)
