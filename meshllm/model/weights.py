"""One weight type behind every matmul of the per-phase math: dense, int8 weight-only, int4 weight-only.

    y = w(x, bias)          # x (..., K) -> (..., N), whatever w's format

- Dense: F.linear in the weight's dtype.
- Int8: one int8 row per output and one scale per row (w = q * scale); torch's `_weight_int8pack_mm`.
- Int4: groups of G (32, 64, 128) along each row, a scale and a zero per group (w = (q - 8) * scale + zero);
  torch's `_weight_int4pack_mm_for_cpu`, on its own packed layout, which depends on the CPU's instruction set.

The quantized kernels take bf16 activations and give bf16 results; the caller's residual stream keeps its own dtype.
Their constraints (checked by `int4_fits` / `int8_fits`, or the kernels misbehave): int4 needs N % 16 == 0 and
K % G == 0; int8 needs K % 16 == 0 (other K give wrong sums or crash). At first use `kernels()` runs each kernel once
on a small matrix against its dequantized F.linear; a kernel that is missing or wrong is replaced by dequantizing its
weights when they are built (bf16 dense), said once on stderr.

On disk and on the wire (`portable_tensors`) an int4 weight is its 4-bit values two to a byte (low nibble first)
with bf16 scales and zeros (N, K/G): the same on every machine. `device_tensors` holds the kernel's packed layout,
for the slice cache of the device that made it (`LAYOUT` names the layout).
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RequestError

log = logging.getLogger("meshllm.model")

INT4_GROUPS = (32, 64, 128)
ACT = torch.bfloat16  # what the quantized kernels take and give
LAYOUT = f"{torch.__version__.split('+')[0]}-{torch.backends.cpu.get_cpu_capability()}".lower()


def int4_fits(n: int, k: int, group: int) -> bool:
    return n > 0 and n % 16 == 0 and k > 0 and k % group == 0


def int8_fits(n: int, k: int) -> bool:
    return n > 0 and k > 0 and k % 16 == 0


@dataclass(frozen=True)
class Format:
    """How a model's matrices are kept: 'dense' (in the compute dtype), 'int8', 'int4' (group G), or 'gguf' (each
    GGUF tensor in the nearest format we run: int4 for Q4_*, int8 for Q8_0/Q5_K/Q6_K, dense for the rest)."""

    kind: str = "dense"
    group: int = 32

    @classmethod
    def parse(cls, text: str | None) -> "Format | None":
        """`--quantize` text -> Format (None: the model's own default). Raises RequestError listing the choices."""
        if text is None:
            return None
        t = text.strip().lower()
        if t in ("none", "dense"):
            return cls("dense")
        if t in ("int8", "gguf"):
            return cls(t)
        kind, sep, group = t.partition(":")
        if kind == "int4" and (not sep or group.isdigit() and int(group) in INT4_GROUPS):
            return cls("int4", int(group or 32))
        raise RequestError(f"quantize {text!r}: choose none, int8, int4, int4:64, int4:128 or gguf")

    def __str__(self) -> str:
        return f"int4:{self.group}" if self.kind == "int4" else self.kind

    @property
    def quantized(self) -> bool:
        return self.kind != "dense"


class Dense:
    """A dense (N, K) matrix."""

    spec = "dense"

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w
        self.out_features, self.in_features = w.shape

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.w, bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.w.dtype

    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()

    def dense(self) -> torch.Tensor:
        return self.w

    def portable_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {name: self.w}

    device_tensors = portable_tensors


class Int8:
    """int8 (N, K) and a bf16 scale per row: w = q * scale."""

    spec = "int8"
    dtype = ACT

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.q, self.scale = q, scale
        self.out_features, self.in_features = q.shape

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # the kernels read their input as dense rows: a view with other strides (attention's output of one head)
        # makes them read past it and crash
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.q, self.scale)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 2

    def dense(self) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None]).to(ACT)

    def portable_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.q": self.q, f"{name}.scale": self.scale}

    device_tensors = portable_tensors


class Int4:
    """4-bit values in groups of G along each row, a bf16 scale and zero per group, in the kernel's layout."""

    dtype = ACT

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, group: int, n: int, k: int) -> None:
        self.packed, self.scale_zero, self.group = packed, scale_zero, group  # scale_zero: (K/G, N, 2)
        self.out_features, self.in_features = n, k

    @property
    def spec(self) -> str:
        return f"int4:{self.group}"

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).contiguous(), self.packed,
                                                        self.group, self.scale_zero)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def nbytes(self) -> int:
        return self.packed.numel() + self.scale_zero.numel() * 2

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, K/G) scale and zero."""
        sz = self.scale_zero.transpose(0, 1)
        return sz[..., 0], sz[..., 1]

    def dense(self) -> torch.Tensor:
        raise NotImplementedError("an Int4 in the kernel's layout keeps no readable 4-bit values")

    def device_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.packed": self.packed, f"{name}.scale_zero": self.scale_zero}


Weight = Union[Dense, Int8, Int4]


class DenseTable:
    """Embedding rows kept dense."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, self.t).to(dtype)

    def nbytes(self) -> int:
        return self.t.numel() * self.t.element_size()

    def shares(self, w: Weight) -> bool:
        return isinstance(w, Dense) and w.w is self.t


class FileRows:
    """A matrix's rows as the model file holds them, read only when needed (the pages of the file the originator
    already has): the embedding rows a prompt looks up, and the LM head rows of the likeliest tokens, whose logits a
    quantized head only approximates.

    `rescore` makes the logits of the RESCORE likeliest tokens (by the quantized head) exact: greedy decoding and
    the sampled head of the distribution then do not depend on the head's rounding, at the cost of reading RESCORE
    rows per token."""

    RESCORE = 64

    def __init__(self, src, name: str) -> None:
        self.src, self.name = src, name

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1).numpy()
        uniq, inverse = np.unique(flat, return_inverse=True)
        rows = torch.from_numpy(self.src.rows(self.name, uniq))
        return rows[torch.from_numpy(inverse)].reshape(*ids.shape, -1).to(dtype)

    def rescore(self, h: torch.Tensor, logits: torch.Tensor, also: torch.Tensor | None = None) -> torch.Tensor:
        """(..., d) normed hidden states, (..., V) approximate fp32 logits -> logits exact at every position for
        the union of each position's RESCORE likeliest tokens (and the tokens `also`)."""
        k = min(self.RESCORE, logits.shape[-1])
        cand = logits.topk(k, dim=-1).indices.reshape(-1)
        cand = torch.unique(cand if also is None else torch.cat([cand, also.reshape(-1)]))
        w = torch.from_numpy(self.src.rows(self.name, cand.numpy()))  # (U, d)
        logits[..., cand] = h.float() @ w.T
        return logits

    def nbytes(self) -> int:
        return 0  # in the file, not held

    def shares(self, w: "Weight") -> bool:
        return False


Table = Union[DenseTable, FileRows]


@dataclass
class PortableInt4:
    """The machine-independent int4 form: q (N, K) values 0..15 as uint8, scale and zero (N, K/G) float."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    group: int

    def nibbles(self) -> np.ndarray:
        """(N, K/2) uint8: even columns in the low nibble."""
        return (self.q[:, 0::2] | (self.q[:, 1::2] << 4)).astype(np.uint8)

    @classmethod
    def from_nibbles(cls, nib: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> "PortableInt4":
        b = nib.numpy()
        q = np.empty((b.shape[0], b.shape[1] * 2), np.uint8)
        q[:, 0::2], q[:, 1::2] = b & 0x0F, b >> 4
        return cls(q, scale.float().numpy(), zero.float().numpy(), group)

    def cols(self, start: int, stop: int) -> "PortableInt4":
        """Columns [start, stop), on group boundaries."""
        g = self.group
        if start % g or stop % g:
            raise ValueError(f"columns {start}..{stop} are not on {g}-column group boundaries")
        return PortableInt4(self.q[:, start:stop], self.scale[:, start // g:stop // g], self.zero[:, start // g:stop // g],
                            g)

    def dequantize(self) -> np.ndarray:
        n, k = self.q.shape
        g = self.q.reshape(n, k // self.group, self.group).astype(np.float32)
        return ((g - 8) * self.scale[..., None] + self.zero[..., None]).reshape(n, k)


PACK_ROWS = 256  # rows packed at a time: a multiple of the kernel's row blocks (64 on AVX512, 32 on AVX2)


def int4_weight(nib: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> Weight:
    """The kernel's weight for an int4 matrix given as nibbles (N, K/2) with (N, K/G) scales and zeros (its
    dequantized bf16 where the kernel is unusable). Packed PACK_ROWS rows at a time, the same bytes as packing the
    whole: the 4-bit values are never all held unpacked."""
    n, k = nib.shape[0], nib.shape[1] * 2
    if not kernels().int4:
        return Dense(torch.from_numpy(PortableInt4.from_nibbles(nib, scale, zero, group).dequantize()).to(ACT))
    packed = None
    for r in range(0, n, PACK_ROWS):
        b = nib[r:r + PACK_ROWS]
        q = torch.stack([b & 0x0F, b >> 4], -1).reshape(b.shape[0], k).to(torch.int32)  # even columns: low nibble
        part = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        if packed is None:
            packed = part if n <= PACK_ROWS else torch.empty((n, *part.shape[1:]), dtype=part.dtype)
        if packed is not part:
            packed[r:r + PACK_ROWS] = part
    sz = torch.stack([scale.to(ACT), zero.to(ACT)], -1).transpose(0, 1).contiguous()
    return Int4(packed, sz, group, n, k)


def int8_weight(q: np.ndarray, scale: np.ndarray) -> Weight:
    """The kernel's weight for int8 rows and their scales (dequantized bf16 where the kernel is unusable)."""
    qt, st = torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(np.ascontiguousarray(scale)).to(ACT)
    if not kernels().int8:
        return Dense((qt.float() * st.float()[:, None]).to(ACT))
    return Int8(qt, st)


@dataclass(frozen=True)
class Kernels:
    int8: bool
    int4: bool


@functools.cache
def kernels() -> Kernels:
    """Does each quantized kernel exist and compute right here? Checked once per process (a few ms)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 64, generator=g).to(ACT)
    q8 = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    s8 = (torch.rand(32, generator=g) / 64 + 1e-3).to(ACT)
    ok8 = _agrees(lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8), x, q8.float() * s8.float()[:, None])
    q4 = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.int32)
    sz = torch.stack([torch.rand(2, 32, generator=g) / 16 + 1e-3, torch.randn(2, 32, generator=g) / 16], -1).to(ACT)
    w4 = ((q4.float().view(32, 2, 32) - 8) * sz.float().transpose(0, 1)[..., :1]
          + sz.float().transpose(0, 1)[..., 1:]).view(32, 64)
    ok4 = _agrees(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1), 32, sz), x, w4)
    result = Kernels(ok8, ok4)
    missing = [name for name, ok in (("int8", ok8), ("int4", ok4)) if not ok]
    if missing:
        print(f"meshllm: torch's {' and '.join(missing)} weight-only kernel is missing or wrong on this CPU; those "
              f"weights are dequantized to bf16 when loaded (4x more memory for int4, 2x for int8)", file=sys.stderr)
    return result


def _agrees(run, x: torch.Tensor, w: torch.Tensor) -> bool:
    try:
        y = run().float()
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    ref = x.float() @ w.T
    return bool(torch.isfinite(y).all()) and float((y - ref).norm() / ref.norm()) < 2e-2
