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
from .weights import FileRows, Table, Weight


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class AttnBlock:
    """One layer's attention slice: norm, fused q|k|v rows, o_proj columns."""

    norm: torch.Tensor  # (d,)
    wqkv: Weight  # ((nq + 2 nkv) hd, d)
    bqkv: torch.Tensor | None
    wo: Weight  # (d, nq hd)
    bo: torch.Tensor | None  # only on the shard that owns the bias
    num_q: int
    num_kv: int
    head_dim: int
    eps: float
    kv_index: torch.Tensor | None  # local kv head of each local q head, when not a uniform grouping

    def nbytes(self) -> int:
        return self.wqkv.nbytes() + self.wo.nbytes() + _nbytes(self.norm, self.bqkv, self.bo)


@dataclass
class MlpBlock:
    """One layer's MLP slice: norm, fused gate|up rows, down_proj columns."""

    norm: torch.Tensor  # (d,)
    w13: Weight  # (2c, d): gate rows then up rows
    b13: torch.Tensor | None
    w2: Weight  # (d, c)
    b2: torch.Tensor | None
    eps: float

    def nbytes(self) -> int:
        return self.w13.nbytes() + self.w2.nbytes() + _nbytes(self.norm, self.b13, self.b2)


@dataclass
class HeadWeights:
    """The originator's weights: token embedding, final norm, LM head (may share the embedding's storage)."""

    embed: Table  # (V, d) rows looked up
    norm: torch.Tensor  # (d,)
    lm_head: Weight  # (V, d)
    eps: float
    exact: "FileRows | None" = None  # the LM head's exact rows, for a quantized head's likeliest tokens

    def nbytes(self) -> int:
        return self.embed.nbytes() + _nbytes(self.norm) + (0 if self.embed.shares(self.lm_head)
                                                          else self.lm_head.nbytes())


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
        """(T, 1, hd) cos and signed sin for positions start..start+length, in the activation dtype.

        The sin's first half is negated, so that rotating half of x is a swap of its halves times this sin: the same
        values as transformers' `x * cos + rotate_half(x) * sin`, with one op fewer per rotation."""
        end = start + length
        if end > self._cos.shape[0]:
            n = max(end, 2 * self._cos.shape[0], 256)
            freqs = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            half = emb.shape[-1] // 2
            self._cos, self._sin = emb.cos(), torch.cat((-emb[:, :half].sin(), emb[:, half:].sin()), dim=-1)
        return self._cos[start:end, None].to(dtype), self._sin[start:end, None].to(dtype)


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm in fp32, scaled in the residual dtype (transformers' order), then cast to `dtype` (the matmul's
    activations, when they differ from the residual stream's)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * h.to(x.dtype)
    return h if dtype is None or dtype == h.dtype else h.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (..., T, H, hd) with Rotary.cos_sin's (T, 1, hd) tables."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin


def embed(head: HeadWeights, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) token ids -> (B, T, d) hidden states in the residual dtype."""
    return head.embed.lookup(ids, dtype)


def attn_partial(blk: AttnBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV,
                 start: int) -> torch.Tensor:
    """(B, T, d) residual stream -> (B, T, d) this shard's share of the attention output."""
    B, T, _ = x.shape
    nq, nkv, hd = blk.num_q, blk.num_kv, blk.head_dim
    if nq == 0:
        return torch.zeros_like(x) if blk.bo is None else blk.bo.expand_as(x).clone()
    h = rms_norm(x, blk.norm, blk.eps, blk.wqkv.dtype)
    qkv = blk.wqkv(h, blk.bqkv).view(B, T, nq + 2 * nkv, hd)
    qk = rotate(qkv[:, :, :nq + nkv], cos, sin)  # q and k heads rotated together
    q = qk[:, :, :nq].transpose(1, 2)  # (B, nq, T, hd)
    k = qk[:, :, nq:].transpose(1, 2)  # (B, nkv, T, hd)
    v = qkv[:, :, nq + nkv:].transpose(1, 2)
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
    return blk.wo(o, blk.bo)


def mlp_partial(blk: MlpBlock, x: torch.Tensor) -> torch.Tensor:
    """(B, T, d) residual stream -> (B, T, d) this shard's share of the SwiGLU MLP output."""
    if blk.w2.in_features == 0:
        return torch.zeros_like(x) if blk.b2 is None else blk.b2.expand_as(x).clone()
    h = rms_norm(x, blk.norm, blk.eps, blk.w13.dtype)
    gate, up = blk.w13(h, blk.b13).chunk(2, dim=-1)
    return blk.w2(F.silu(gate) * up, blk.b2)


def logits(head: HeadWeights, x: torch.Tensor, also: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, d) final hidden states -> (B, T, V) fp32 logits (exact for the likeliest tokens of a quantized head,
    and for the token ids `also`)."""
    h = rms_norm(x, head.norm, head.eps)
    out = head.lm_head(h.to(head.lm_head.dtype)).float()
    return out if head.exact is None else head.exact.rescore(h, out, also)


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
