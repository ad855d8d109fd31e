"""GGUF quantized blocks kept packed: decoded into the two formats our kernels run, without dequantizing.

- Q4_0, Q4_1 and Q4_K become int4 in groups of 32 along a row: the 4-bit values are kept as they are, and each
  group's scale and zero follow from the block's, so that w = (q - 8) * scale + zero is the block's own value:
    Q4_0  w = (q - 8) d                 -> scale d, zero 0
    Q4_1  w = q d + m                   -> scale d, zero m + 8 d
    Q4_K  w = q (d sc) - (dmin mn)      -> scale d sc, zero 8 d sc - dmin mn   (per 32-weight sub-block)
- Q8_0, Q5_K and Q6_K become int8 with one scale per row (the kernel's format): each row is dequantized and
  rounded again to 8 bits, which is lossy (measured in tests/test_quant.py).

Layouts are llama.cpp's (ggml-common.h): a row of K weights is K / block_size blocks, stored one after another.
Everything here is numpy on the raw bytes of one tensor (rows, bytes per row); pure, no torch.
"""

from __future__ import annotations

import numpy as np

# GGML type ids (gguf.GGMLQuantizationType)
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 8, 12, 13, 14, 30
INT4_TYPES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q4_K: "Q4_K"}  # kept as int4 group 32, 4-bit values untouched
INT8_TYPES = {Q8_0: "Q8_0", Q5_K: "Q5_K", Q6_K: "Q6_K"}  # requantized to int8 per row
DENSE_TYPES = {F32: "F32", F16: "F16", BF16: "BF16"}
# bytes per block and weights per block
BLOCK = {Q4_0: (18, 32), Q4_1: (20, 32), Q8_0: (34, 32), Q4_K: (144, 256), Q5_K: (176, 256), Q6_K: (210, 256)}


def _blocks(raw: np.ndarray, qtype: int) -> np.ndarray:
    """(rows, bytes per row) uint8 -> (rows, blocks per row, bytes per block)."""
    size = BLOCK[qtype][0]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.ndim != 2 or raw.shape[1] % size:
        raise ValueError(f"{raw.shape} bytes is not whole rows of {size}-byte blocks")
    return raw.reshape(raw.shape[0], raw.shape[1] // size, size)


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    """The f16 at byte `at` of every block, as float32 (blocks, ...)."""
    return np.ascontiguousarray(b[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values: the low nibbles are weights 0..15, the high nibbles 16..31 (Q4_0/Q4_1 order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (llama.cpp's get_scale_min_k4)."""
    s = s.astype(np.uint16)
    sc = np.empty(s.shape[:-1] + (8,), np.uint16)
    mn = np.empty_like(sc)
    sc[..., :4], mn[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def to_int4(raw: np.ndarray, qtype: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_0/Q4_1/Q4_K tensor -> (q uint8 (rows, K) in 0..15, scale (rows, K/32), zero (rows, K/32)) float32,
    with w = (q - 8) * scale + zero for every weight of a group of 32."""
    b = _blocks(raw, qtype)
    rows, nb = b.shape[:2]
    if qtype in (Q4_0, Q4_1):
        d = _f16(b, 0)
        qs = b[..., 4:] if qtype == Q4_1 else b[..., 2:]
        q = _nibbles32(qs)  # (rows, nb, 32)
        zero = _f16(b, 2) + 8 * d if qtype == Q4_1 else np.zeros_like(d)
        return q.reshape(rows, nb * 32), d, zero
    if qtype == Q4_K:
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, mn = _k_scales(b[..., 4:16])  # (rows, nb, 8)
        qs = b[..., 16:144].reshape(rows, nb, 4, 32)  # 4 chunks of 64 weights: low nibbles, then high nibbles
        q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, nb * 256)
        scale = d[..., None] * sc
        zero = 8 * scale - dmin[..., None] * mn
        return q, scale.reshape(rows, nb * 8), zero.reshape(rows, nb * 8)
    raise ValueError(f"GGML type {qtype} is not an int4 type")


def dequantize(raw: np.ndarray, qtype: int) -> np.ndarray:
    """Any type we read -> float32 (rows, K): int4 types through to_int4, the others through gguf's reference."""
    if qtype in INT4_TYPES:
        q, scale, zero = to_int4(raw, qtype)
        g = q.reshape(q.shape[0], -1, 32).astype(np.float32)
        return ((g - 8) * scale[..., None] + zero[..., None]).reshape(q.shape)
    import gguf

    return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype)), dtype=np.float32)


def quantize_rows_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float (rows, K) -> (int8 (rows, K), scale (rows,) float32), symmetric per row: w ~ q * scale."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def to_int8(raw: np.ndarray, qtype: int) -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0/Q5_K/Q6_K tensor -> int8 (rows, K) and one scale per row (requantized: lossy)."""
    return quantize_rows_int8(dequantize(raw, qtype))


def quantize_int4(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float (rows, K) -> int4 in groups of `group` along a row (round to nearest between each group's min and
    max): (q uint8 (rows, K) in 0..15, scale (rows, K/group), zero (rows, K/group)), w ~ (q - 8) * scale + zero."""
    rows, k = w.shape
    g = w.reshape(rows, k // group, group).astype(np.float32)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
    q = np.clip(np.rint((g - lo[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    return q.reshape(rows, k), scale, (lo + 8 * scale).astype(np.float32)
