"""Llama math as plain functions per phase. Each returns this shard's partial sum; the caller reduces.

Shapes: B batch (1), T new tokens, d hidden, nq/nkv local query/kv heads, hd head dim, c local MLP columns.
Operation order follows transformers' LlamaForCausalLM so fp32 results agree to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig, RopeConfig


@dataclass
class AttnBlock:
    """One layer's attention slice: norm, fused q|k|v rows, o_proj columns."""

    norm: torch.Tensor  # (d,)
    wqkv: torch.Tensor  # ((nq + 2 nkv) hd, d)
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # (d, nq hd)
    bo: torch.Tensor | None  # only on the shard that owns the bias
    num_q: int
    num_kv: int
    head_dim: int
    eps: float
    kv_index: torch.Tensor | None  # local kv head of each local q head, when not a uniform grouping

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.norm, self.wqkv, self.bqkv, self.wo, self.bo)
                   if t is not None)


@dataclass
class MlpBlock:
    """One layer's MLP slice: norm, fused gate|up rows, down_proj columns."""

    norm: torch.Tensor  # (d,)
    w13: torch.Tensor  # (2c, d): gate rows then up rows
    b13: torch.Tensor | None
    w2: torch.Tensor  # (d, c)
    b2: torch.Tensor | None
    eps: float

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.norm, self.w13, self.b13, self.w2, self.b2)
                   if t is not None)


@dataclass
class HeadWeights:
    """The originator's weights: token embedding, final norm, LM head (may share the embedding)."""

    embed: torch.Tensor  # (V, d)
    norm: torch.Tensor  # (d,)
    lm_head: torch.Tensor  # (V, d)
    eps: float

    def nbytes(self) -> int:
        tensors = {id(t): t for t in (self.embed, self.norm, self.lm_head)}
        return sum(t.numel() * t.element_size() for t in tensors.values())


class LayerKV:
    """One layer's key/value cache for this shard's kv heads, grown by doubling."""

    def __init__(self, num_kv: int, head_dim: int, capacity: int, dtype: torch.dtype) -> None:
        self.k = torch.empty(1, num_kv, capacity, head_dim, dtype=dtype)
        self.v = torch.empty(1, num_kv, capacity, head_dim, dtype=dtype)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (1, nkv, T, hd) at positions start.. and return views of positions 0..start+T."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            grow = max(end, 2 * self.k.shape[2])
            for name in ("k", "v"):
                old = getattr(self, name)
                new = torch.empty(*old.shape[:2], grow, old.shape[3], dtype=old.dtype)
                new[:, :, :start] = old[:, :, :start]
                setattr(self, name, new)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Rotary:
    """cos/sin tables for rotary embeddings, computed in fp32 and grown on demand."""

    def __init__(self, config: ModelConfig) -> None:
        self.inv_freq = rope_inv_freq(config.rope, config.head_dim, config.max_position_embeddings)
        self._cos = self._sin = torch.empty(0)

    def cos_sin(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, hd) cos and sin for positions start..start+length, cast to the activation dtype."""
        end = start + length
        if end > self._cos.shape[0]:
            n = max(end, 2 * self._cos.shape[0], 256)
            freqs = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos[start:end].to(dtype), self._sin[start:end].to(dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int, max_positions: int) -> torch.Tensor:
    """Inverse frequencies for the rope type, as transformers computes them (fp32)."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.freq_factors is not None:
        return inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float32)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Llama 3.1: long wavelengths scaled by `factor`, short ones kept, a smooth ramp between.
        old_ctx = rope.original_max_position_embeddings or max_positions
        low_wavelen = old_ctx / rope.low_freq_factor
        high_wavelen = old_ctx / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, scaled in the activation dtype."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def embed(head: HeadWeights, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) token ids -> (B, T, d) hidden states."""
    return F.embedding(ids, head.embed)


def attn_partial(blk: AttnBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV,
                 start: int) -> torch.Tensor:
    """(B, T, d) residual stream -> (B, T, d) this shard's share of the attention output."""
    B, T, _ = x.shape
    nq, nkv, hd = blk.num_q, blk.num_kv, blk.head_dim
    if nq == 0:
        return torch.zeros_like(x) if blk.bo is None else blk.bo.expand_as(x).clone()
    h = rms_norm(x, blk.norm, blk.eps)
    q, k, v = F.linear(h, blk.wqkv, blk.bqkv).split((nq * hd, nkv * hd, nkv * hd), dim=-1)
    q = q.view(B, T, nq, hd).transpose(1, 2)  # (B, nq, T, hd)
    k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
    v = v.view(B, T, nkv, hd).transpose(1, 2)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    keys, values = cache.update(k, v, start)  # (B, nkv, start + T, hd)
    gqa = nq != nkv
    if blk.kv_index is not None:
        # q heads not evenly grouped over the local kv heads (a split inside a kv group): gather per q head
        keys, values = keys.index_select(1, blk.kv_index), values.index_select(1, blk.kv_index)
        gqa = False
    if T == 1:
        o = F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
    elif start == 0:
        o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
    else:
        # new tokens after a cached prefix: token i sees positions 0..start+i
        mask = torch.ones(T, start + T, dtype=torch.bool).tril(diagonal=start)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
    o = o.transpose(1, 2).reshape(B, T, nq * hd)
    return F.linear(o, blk.wo, blk.bo)


def mlp_partial(blk: MlpBlock, x: torch.Tensor) -> torch.Tensor:
    """(B, T, d) residual stream -> (B, T, d) this shard's share of the SwiGLU MLP output."""
    if blk.w2.shape[1] == 0:
        return torch.zeros_like(x) if blk.b2 is None else blk.b2.expand_as(x).clone()
    h = rms_norm(x, blk.norm, blk.eps)
    gate, up = F.linear(h, blk.w13, blk.b13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, blk.w2, blk.b2)


def logits(head: HeadWeights, x: torch.Tensor) -> torch.Tensor:
    """(B, T, d) final hidden states -> (B, T, V) fp32 logits."""
    return F.linear(rms_norm(x, head.norm, head.eps), head.lm_head).float()


def kv_index_for(config: ModelConfig, q_start: int, q_stop: int) -> torch.Tensor | None:
    """Local kv head per local q head, or None when sdpa's grouped-query broadcast already maps them."""
    nq = q_stop - q_start
    if nq == 0:
        return None
    g = config.kv_group
    kv0 = q_start // g
    mapping = [(h // g) - kv0 for h in range(q_start, q_stop)]
    nkv = mapping[-1] + 1
    if nq % nkv == 0 and mapping == [i // (nq // nkv) for i in range(nq)]:
        return None
    return torch.tensor(mapping, dtype=torch.long)
