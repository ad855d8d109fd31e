"""Quantized weights: GGUF blocks decoded against the gguf package's own dequantization, block by block; the int8
and int4 kernels against dequantize-then-F.linear in fp32; the fallback when a kernel is unusable; formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gguf
from meshllm.errors import RequestError
from meshllm.model import gguf_quants as gq
from meshllm.model import weights
from meshllm.model.weights import Dense, Format, Int4, Int8, PortableInt4, int4_weight, int8_weight

QT = gguf.GGMLQuantizationType


def blocks(qtype: int, rows: int, nblocks: int, seed: int = 0) -> np.ndarray:
    """Raw bytes (rows, nblocks * block bytes) of a tensor of that type: quantized by the gguf package where it
    can; for the K-quants (which it cannot quantize) random bytes with sane f16 scales."""
    rng = np.random.default_rng(seed)
    size, per = gq.BLOCK[qtype]
    if qtype in (gq.Q4_0, gq.Q4_1, gq.Q8_0):
        w = (rng.standard_normal((rows, nblocks * per)) * rng.uniform(0.01, 2, (rows, 1))).astype(np.float32)
        return np.asarray(gguf.quants.quantize(w, QT(qtype)))
    raw = rng.integers(0, 256, (rows, nblocks, size), dtype=np.uint8)
    scales = {gq.Q4_K: (0, 2), gq.Q5_K: (0, 2), gq.Q6_K: (208,)}[qtype]  # where the block's f16 scale(s) sit
    for at in scales:
        raw[..., at:at + 2] = rng.uniform(1e-3, 5e-2, (rows, nblocks)).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, nblocks * size)


def reference(raw: np.ndarray, qtype: int) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, QT(qtype)), dtype=np.float32)


@pytest.mark.parametrize("qtype", [gq.Q4_0, gq.Q4_1, gq.Q4_K], ids=["Q4_0", "Q4_1", "Q4_K"])
def test_4bit_blocks_keep_their_values_as_int4_groups(qtype):
    raw = blocks(qtype, 6, 3)
    q, scale, zero = gq.to_int4(raw, qtype)
    assert q.dtype == np.uint8 and q.max() <= 15 and q.shape == (6, 3 * gq.BLOCK[qtype][1])
    g = q.reshape(6, -1, 32).astype(np.float32)
    ours = ((g - 8) * scale[..., None] + zero[..., None]).reshape(q.shape)
    ref = reference(raw, qtype)
    # the same values, block by block (to fp32 rounding: the group's scale and zero are derived from the block's)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_array_equal(gq.dequantize(raw, qtype), ours)


@pytest.mark.parametrize("qtype", [gq.Q8_0, gq.Q5_K, gq.Q6_K], ids=["Q8_0", "Q5_K", "Q6_K"])
def test_8bit_and_k_blocks_are_requantized_per_row_within_half_a_step(qtype):
    raw = blocks(qtype, 8, 2)
    ref = reference(raw, qtype)
    q, scale = gq.to_int8(raw, qtype)
    assert q.dtype == np.int8 and scale.shape == (8,)
    ours = q.astype(np.float32) * scale[:, None]
    assert (np.abs(ours - ref) <= scale[:, None] / 2 * (1 + 1e-5)).all()  # rounding, never worse
    # lossy: how much (printed with -s; the test pins only the bound above)
    print(f"{QT(qtype).name} -> int8 per row: relative error {np.linalg.norm(ours - ref) / np.linalg.norm(ref):.2e}")


def test_int4_quantization_round_trips_within_half_a_step():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    for group in (32, 64, 128):
        q, scale, zero = gq.quantize_int4(w, group)
        back = PortableInt4(q, scale, zero, group).dequantize()
        step = np.repeat(scale, group, axis=1)
        assert (np.abs(back - w) <= step / 2 * (1 + 1e-5)).all()


def _x(m: int, k: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("n,k,group", [(16, 32, 32), (48, 96, 32), (80, 256, 64), (176, 384, 128), (208, 128, 32)])
@pytest.mark.parametrize("m", [1, 5])
def test_int4_kernel_matches_dequantize_then_linear(n, k, group, m):
    """Rows not a multiple of 64, and a slice cut from a larger matrix (rows and whole groups of columns)."""
    rng = np.random.default_rng(n + k)
    big = rng.standard_normal((n + 32, k + 2 * group)).astype(np.float32)
    p = PortableInt4(*gq.quantize_int4(big, group), group)
    p = PortableInt4(p.q[16:16 + n], p.scale[16:16 + n], p.zero[16:16 + n], group).cols(group, group + k)
    scale, zero = torch.from_numpy(p.scale).to(torch.bfloat16), torch.from_numpy(p.zero).to(torch.bfloat16)
    w = int4_weight(torch.from_numpy(p.nibbles()), scale, zero, group)
    assert isinstance(w, Int4) and (w.out_features, w.in_features) == (n, k)
    assert w.nbytes() == n * k // 2 + 4 * n * (k // group)
    # the reference: the same 4-bit values with the kernel's bf16 scales and zeros, in fp32
    deq = PortableInt4(p.q, scale.float().numpy(), zero.float().numpy(), group).dequantize()
    x = _x(m, k)
    assert _rel(w(x), F.linear(x.float(), torch.from_numpy(deq))) < 5e-3  # bf16 output rounding


@pytest.mark.parametrize("n,k", [(1, 16), (5, 64), (173, 96), (64, 1536)])
@pytest.mark.parametrize("m", [1, 3])
def test_int8_kernel_matches_dequantize_then_linear(n, k, m):
    rng = np.random.default_rng(n * k)
    big = rng.standard_normal((n + 8, k)).astype(np.float32)
    q, scale = gq.quantize_rows_int8(big)
    w = int8_weight(q[4:4 + n], scale[4:4 + n])
    assert isinstance(w, Int8) and w.nbytes() == n * k + 2 * n
    ref = F.linear(_x(m, k).float(), w.q.float() * w.scale.float()[:, None])
    assert _rel(w(_x(m, k)), ref) < 5e-3


def test_kernel_shape_limits_are_known():
    assert weights.int4_fits(16, 64, 32) and not weights.int4_fits(24, 64, 32) and not weights.int4_fits(16, 48, 32)
    assert weights.int8_fits(7, 32) and not weights.int8_fits(7, 40)


def test_an_unusable_kernel_falls_back_to_bf16_and_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(weights, "_agrees", lambda *a: False)
    weights.kernels.cache_clear()
    try:
        rng = np.random.default_rng(3)
        p = PortableInt4(*gq.quantize_int4(rng.standard_normal((16, 64)).astype(np.float32), 32), 32)
        w4 = int4_weight(torch.from_numpy(p.nibbles()), torch.from_numpy(p.scale), torch.from_numpy(p.zero), 32)
        w8 = int8_weight(*gq.quantize_rows_int8(rng.standard_normal((16, 64)).astype(np.float32)))
        assert isinstance(w4, Dense) and w4.dtype == torch.bfloat16 and isinstance(w8, Dense)
        x = _x(2, 64)
        assert _rel(w4(x), F.linear(x.float(), torch.from_numpy(p.dequantize()))) < 1e-2
        err = capsys.readouterr().err
        assert err.count("meshllm: torch's int8 and int4 weight-only kernel is missing or wrong") == 1
        assert "dequantized to bf16" in err
    finally:
        monkeypatch.undo()
        weights.kernels.cache_clear()
    assert weights.kernels() == weights.Kernels(True, True)  # here both kernels work


@pytest.mark.parametrize("text, fmt", [(None, None), ("none", Format("dense")), ("int8", Format("int8")),
                                       ("int4", Format("int4", 32)), ("INT4:128", Format("int4", 128)),
                                       ("gguf", Format("gguf"))])
def test_quantize_choices_parse(text, fmt):
    assert Format.parse(text) == fmt


@pytest.mark.parametrize("text", ["int5", "int4:48", "int4:", "fp8", ""])
def test_an_unknown_quantize_names_the_choices(text):
    with pytest.raises(RequestError, match=r"choose none, int8, int4, int4:64, int4:128 or gguf"):
        Format.parse(text)
