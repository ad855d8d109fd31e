"""Build a shard's blocks from a model source: only the rows and columns the shard computes are read.

A block is first its tensors in the portable form (`BlockTensors`: what the slice files hold and the originator
streams): dense matrices in their dtype, int8 rows and scales, int4 values two to a byte with scales and zeros.
`device_tensors` turns them into the form this machine's kernels run (int4 packed in the kernel's layout), and
`attn_block` / `mlp_block` build the blocks the math takes, without copying.

Formats (`Format`): dense (the compute dtype); int8 / int4 quantized from the values read when the slice is cut (a
device never holds a dense copy of its share); gguf, each GGUF matrix kept in the nearest packed format: Q4_0,
Q4_1 and Q4_K as int4 (their 4-bit values untouched), Q8_0, Q5_K and Q6_K requantized to int8 per row, F16, BF16
and F32 dense, any other type dequantized (said once). A matrix whose shape a kernel cannot take stays dense (said
once). Quantized formats run their matmuls with bf16 activations.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ConfigError
from .config import ModelConfig
from .gguf_quants import DENSE_TYPES, INT4_TYPES, INT8_TYPES, dequantize, quantize_int4, quantize_rows_int8, \
    to_int4
from .layers import AttnBlock, HeadWeights, MlpBlock, kv_index_for
from .shard import Shard
from .source import ModelSource
from .weights import ACT, Dense, DenseTable, FileRows, Format, Int4, Int8, PortableInt4, Weight, int4_fits, \
    int4_weight, int8_fits, kernels

if TYPE_CHECKING:
    from ..cluster.plan import Sizes

log = logging.getLogger("meshllm.model")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAID: set[str] = set()  # one log line per kind of fallback, not one per layer


def resolve_dtype(name: str | None, config: ModelConfig) -> torch.dtype:
    """The compute dtype: the one asked for, else the checkpoint's own."""
    key = (name or config.dtype or "float32").replace("torch.", "")
    key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32", "half": "float16"}.get(
        key, key)
    if key not in DTYPES:
        raise ConfigError(f"dtype {name or config.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def resolve_format(fmt: Format | None, src: ModelSource) -> Format:
    """The weight format: the one asked for, else a GGUF's own packed formats, else dense."""
    if fmt is not None:
        return fmt
    types = getattr(src, "matrix_types", None)
    return Format("gguf") if types and any(t not in DENSE_TYPES for t in types()) else Format("dense")


_FAMILY_TENSORS = {"qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                   "o": ("self_attn.o_proj.weight",), "w13": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
                   "w2": ("mlp.down_proj.weight",)}


def format_sizes(fmt: Format, src: ModelSource, dtype: torch.dtype) -> "Sizes":
    """What planning needs of a format: the kind of each matrix family (for a GGUF kept packed, read off its first
    layer and its embedding)."""
    from ..cluster.plan import Sizes

    name = str(dtype).replace("torch.", "")
    if not fmt.quantized:
        return Sizes(name)
    if fmt.kind != "gguf" or not hasattr(src, "raw_type"):
        kind = str(fmt)
        return Sizes(name, tuple((f, kind) for f in ("qkv", "o", "w13", "w2", "head")))

    def kind_of(qtype: int) -> str:
        return "int4:32" if qtype in INT4_TYPES else "int8" if qtype in INT8_TYPES else "dense"

    kinds = []
    for family, names in _FAMILY_TENSORS.items():
        found = {kind_of(src.raw_type(f"model.layers.0.{n}")) for n in names}
        kinds.append((family, "dense" if "dense" in found else "int8" if "int8" in found else found.pop()))
    kinds.append(("head", kind_of(src.raw_type("model.embed_tokens.weight"))))
    return Sizes(name, tuple(kinds))


def _say(key: str, message: str) -> None:
    if key not in _SAID:
        _SAID.add(key)
        log.info("%s", message)


@dataclass
class Int8Rows:
    """int8 rows and a float scale per row (portable)."""

    q: np.ndarray
    scale: np.ndarray


Matrix = torch.Tensor | Int8Rows | PortableInt4  # a matrix as read for a shard, before it is built for a kernel


CHUNK_VALUES = 1 << 21  # values quantized at a time (8 MB in fp32; decoding a GGUF chunk takes a few times that):
# a dense copy of a whole large matrix is never held, and loading's transient memory stays a few tens of MB


def _matrix(src: ModelSource, name: str, shape: tuple[int, int], fmt: Format, rows=None, cols=None) -> Matrix:
    """Rows/cols of one matrix in `fmt`'s portable form (dense ones as float32), read and quantized a chunk of
    rows (CHUNK_VALUES values) at a time."""
    start, stop = rows or (0, shape[0])
    step = max(1, CHUNK_VALUES // max(1, shape[1]))
    if not fmt.quantized or stop - start <= step:
        return _matrix_rows(src, name, shape, fmt, rows, cols)
    parts = [_matrix_rows(src, name, (min(stop, r + step) - r, shape[1]), fmt, (r, min(stop, r + step)), cols)
             for r in range(start, stop, step)]
    return _cat_rows(parts)


def _matrix_rows(src: ModelSource, name: str, shape: tuple[int, int], fmt: Format, rows=None, cols=None) -> Matrix:
    family = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    if fmt.kind == "gguf" and hasattr(src, "raw"):
        data, qtype = src.raw(name, rows)
        _check_shape(name, (data.shape[0], _columns(data, qtype)), shape, cols)
        if qtype in INT4_TYPES and (cols is None or cols[0] % 32 == cols[1] % 32 == 0):
            p = PortableInt4(*to_int4(data, qtype), 32)
            return p.cols(*cols) if cols else p
        w = data.astype(np.float32) if data.dtype != np.uint8 else dequantize(data, qtype)
        if qtype in INT8_TYPES:
            return _int8_cols(w, cols)
        w = w[:, cols[0]:cols[1]] if cols else w
        if qtype in INT4_TYPES:
            _say(f"cols-{family}", f"{family}: this shard's columns {cols[0]}..{cols[1]} cut 32-weight groups: kept "
                                   f"dense")
        elif qtype not in DENSE_TYPES:
            _say(f"type-{qtype}-{family}", f"{family}: GGUF type {qtype} has no packed kernel here: dequantized")
        return torch.from_numpy(np.ascontiguousarray(w))
    if fmt.kind == "int8":  # whole rows: a row's scale is the same however its columns are split
        w = src.get(name, rows=rows)
        _check_shape(name, tuple(w.shape), shape, cols)
        return _int8_cols(w.float().numpy(), cols)
    w = src.get(name, rows=rows, cols=cols)
    if tuple(w.shape) != shape:
        _check_shape(name, tuple(w.shape), shape, None)
    if fmt.kind == "int4":
        if shape[1] % fmt.group:
            _say(f"int4-k-{family}", f"{family}: {shape[1]} input columns are not whole groups of {fmt.group}: "
                                     f"kept dense")
            return w.float()
        return PortableInt4(*quantize_int4(w.float().numpy(), fmt.group), fmt.group)
    return w


def _int8_cols(w: np.ndarray, cols) -> Int8Rows:
    """Whole rows quantized to int8 (one scale a row), then the columns kept: every split of the columns shares
    the rows' scales, so the devices' partial sums add up to the one device's."""
    q, scale = quantize_rows_int8(w)
    return Int8Rows(np.ascontiguousarray(q[:, cols[0]:cols[1]]) if cols else q, scale)


def _columns(data: np.ndarray, qtype: int) -> int:
    """Columns of a GGUF tensor's rows (floats, or raw bytes of whole blocks)."""
    if data.dtype != np.uint8:
        return data.shape[1]
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    per_block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return data.shape[1] // nbytes * per_block


def _check_shape(name: str, got: tuple[int, int], want: tuple[int, int], cols) -> None:
    if cols is not None:
        got = (got[0], cols[1] - cols[0])
    if got != want:
        raise ConfigError(f"tensor {name!r} read as shape {got}, but the model config implies {want}: config and "
                          f"weights disagree")


def _cat_rows(parts: list[Matrix]) -> Matrix:
    """Stack matrices by rows (q|k|v, gate|up). Mixed formats meet at the widest: dense, else int8."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, PortableInt4) for p in parts) and len({p.group for p in parts}) == 1:
        return PortableInt4(np.concatenate([p.q for p in parts]), np.concatenate([p.scale for p in parts]),
                            np.concatenate([p.zero for p in parts]), parts[0].group)
    if any(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat([p if isinstance(p, torch.Tensor) else torch.from_numpy(_dequant(p)) for p in parts])
    rows = [p if isinstance(p, Int8Rows) else Int8Rows(*quantize_rows_int8(_dequant(p))) for p in parts]
    return Int8Rows(np.concatenate([r.q for r in rows]), np.concatenate([r.scale for r in rows]))


def _dequant(m: Matrix) -> np.ndarray:
    if isinstance(m, PortableInt4):
        return m.dequantize()
    if isinstance(m, Int8Rows):
        return m.q.astype(np.float32) * m.scale[:, None]
    return m.float().numpy()


@dataclass
class BlockTensors:
    """A block as named tensors plus the format of each weight matrix (what a slice file holds)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    specs: dict[str, str] = field(default_factory=dict)  # weight name -> dense | int8 | int4:G | int4k:G

    def put(self, name: str, m: Matrix, dense_dtype: torch.dtype, where: str) -> None:
        """Add a matrix, in the portable form its kernel takes (dense, said once, where its shape does not fit)."""
        n, k = m.shape if isinstance(m, torch.Tensor) else m.q.shape
        if isinstance(m, PortableInt4) and not int4_fits(n, k, m.group):
            _say(f"int4-{where}", f"{where} ({n} x {k}): not whole tiles of 16 rows and groups of {m.group} "
                                  f"columns for the int4 kernel: kept dense")
            m = torch.from_numpy(m.dequantize())
        elif isinstance(m, Int8Rows) and not int8_fits(n, k):
            _say(f"int8-{where}", f"{where} ({n} x {k}): input columns are not a multiple of 16 for the int8 "
                                  f"kernel: kept dense")
            m = torch.from_numpy(m.q.astype(np.float32) * m.scale[:, None])
        if isinstance(m, PortableInt4):
            self.tensors.update({f"{name}.nib": torch.from_numpy(m.nibbles()),
                                 f"{name}.scale": torch.from_numpy(m.scale).to(ACT),
                                 f"{name}.zero": torch.from_numpy(m.zero).to(ACT)})
            self.specs[name] = f"int4:{m.group}"
        elif isinstance(m, Int8Rows):
            self.tensors.update({f"{name}.q": torch.from_numpy(m.q), f"{name}.scale": torch.from_numpy(m.scale).to(ACT)})
            self.specs[name] = "int8"
        else:
            self.tensors[name] = m.to(dense_dtype).contiguous()
            self.specs[name] = "dense"

    def metadata(self) -> dict[str, str]:
        return {"weights": json.dumps(self.specs, sort_keys=True)}

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> "BlockTensors":
        specs = json.loads((metadata or {}).get("weights", "{}"))
        return cls(tensors, specs)

    def device_form(self) -> "BlockTensors":
        """The form this machine's kernels run: int4 packed in their layout (or dequantized where a kernel is
        unusable here), int8 dequantized where its kernel is unusable."""
        out = BlockTensors(dict(self.tensors), dict(self.specs))
        for name, spec in self.specs.items():
            t = out.tensors
            if spec.startswith("int4:"):
                group = int(spec[5:])
                w = int4_weight(t.pop(f"{name}.nib"), t.pop(f"{name}.scale"), t.pop(f"{name}.zero"), group)
                if isinstance(w, Int4):
                    t.update(w.device_tensors(name))
                    out.specs[name] = f"int4k:{group}"
                else:
                    t[name], out.specs[name] = w.w, "dense"
            elif spec == "int8" and not kernels().int8:
                q, scale = t.pop(f"{name}.q"), t.pop(f"{name}.scale")
                t[name], out.specs[name] = (q.float() * scale.float()[:, None]).to(ACT), "dense"
        return out

    def weight(self, name: str) -> Weight:
        """A matrix of the device form, as the kernel's weight (the tensors are used in place)."""
        spec, t = self.specs[name], self.tensors
        if spec == "dense":
            return Dense(t[name])
        if spec == "int8":
            return Int8(_aligned(t[f"{name}.q"]), _aligned(t[f"{name}.scale"]))
        if spec.startswith("int4k:"):
            packed = _aligned(t[f"{name}.packed"])
            return Int4(packed, _aligned(t[f"{name}.scale_zero"]), int(spec[6:]), packed.shape[0],
                        packed.shape[1] * 2)
        raise ConfigError(f"weight {name!r} is stored as {spec!r}, which this device cannot run: a block file of "
                          f"another form; it is fetched again")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself when its data starts on a 64-byte boundary, else an aligned copy: the quantized kernels
    read misaligned int8 rows wrong or crash (our block files align every tensor; this guards any other)."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _bias(src: ModelSource, name: str, n: int, rows=None) -> torch.Tensor:
    t = src.get(name, rows=rows)
    if tuple(t.shape) != (n,):
        raise ConfigError(f"tensor {name!r} read as shape {tuple(t.shape)}, but the model config implies {(n,)}: "
                          f"config and weights disagree")
    return t


def _vector(src: ModelSource, name: str, n: int, dtype: torch.dtype, rows=None) -> torch.Tensor:
    return _bias(src, name, n, rows).to(dtype)


def attn_tensors(src: ModelSource, layer: int, shard: Shard, dtype: torch.dtype, fmt: Format) -> BlockTensors:
    """This shard's attention slice of one layer (q rows of its heads, k/v rows of the kv heads they need)."""
    c = src.config
    d, hd = c.hidden_size, c.head_dim
    p = f"model.layers.{layer}."
    kv0, kv1 = shard.kv_range(c)
    nq, nkv = shard.num_q, kv1 - kv0
    qr, kvr = (shard.q_start * hd, shard.q_stop * hd), (kv0 * hd, kv1 * hd)
    act = ACT if fmt.quantized else dtype  # matmul activations, biases and dense matrices of this format
    b = BlockTensors()
    b.tensors["norm"] = _vector(src, p + "input_layernorm.weight", d, dtype)
    if nq == 0:
        b.put("wqkv", torch.empty(0, d), act, "attention q|k|v")
        b.put("wo", torch.empty(d, 0), act, "attention output")
    else:
        b.put("wqkv", _cat_rows([
            _matrix(src, p + "self_attn.q_proj.weight", (nq * hd, d), fmt, rows=qr),
            _matrix(src, p + "self_attn.k_proj.weight", (nkv * hd, d), fmt, rows=kvr),
            _matrix(src, p + "self_attn.v_proj.weight", (nkv * hd, d), fmt, rows=kvr),
        ]), act, "attention q|k|v")
        b.put("wo", _matrix(src, p + "self_attn.o_proj.weight", (d, nq * hd), fmt, cols=qr), act, "attention output")
        if c.attention_bias:
            b.tensors["bqkv"] = torch.cat([
                _vector(src, p + "self_attn.q_proj.bias", nq * hd, act, rows=qr),
                _vector(src, p + "self_attn.k_proj.bias", nkv * hd, act, rows=kvr),
                _vector(src, p + "self_attn.v_proj.bias", nkv * hd, act, rows=kvr),
            ])
    if c.attention_bias and shard.owns_bias:
        b.tensors["bo"] = _vector(src, p + "self_attn.o_proj.bias", d, act)
    return b


def mlp_tensors(src: ModelSource, layer: int, shard: Shard, dtype: torch.dtype, fmt: Format) -> BlockTensors:
    """This shard's MLP slice of one layer (its gate/up rows, the matching down columns)."""
    c = src.config
    d, n = c.hidden_size, shard.num_mlp
    p = f"model.layers.{layer}."
    cr = (shard.mlp_start, shard.mlp_stop)
    act = ACT if fmt.quantized else dtype
    b = BlockTensors()
    b.tensors["norm"] = _vector(src, p + "post_attention_layernorm.weight", d, dtype)
    if n == 0:
        b.put("w13", torch.empty(0, d), act, "MLP gate|up")
        b.put("w2", torch.empty(d, 0), act, "MLP down")
    else:
        b.put("w13", _cat_rows([_matrix(src, p + "mlp.gate_proj.weight", (n, d), fmt, rows=cr),
                                _matrix(src, p + "mlp.up_proj.weight", (n, d), fmt, rows=cr)]), act, "MLP gate|up")
        b.put("w2", _matrix(src, p + "mlp.down_proj.weight", (d, n), fmt, cols=cr), act, "MLP down")
        if c.mlp_bias:
            b.tensors["b13"] = torch.cat([_vector(src, p + "mlp.gate_proj.bias", n, act, rows=cr),
                                          _vector(src, p + "mlp.up_proj.bias", n, act, rows=cr)])
    if c.mlp_bias and shard.owns_bias:
        b.tensors["b2"] = _vector(src, p + "mlp.down_proj.bias", d, act)
    return b


def attn_block(b: BlockTensors, config: ModelConfig, shard: Shard) -> AttnBlock:
    """The attention block the math takes, from its device-form tensors."""
    kv0, kv1 = shard.kv_range(config)
    return AttnBlock(norm=b.tensors["norm"], wqkv=b.weight("wqkv"), bqkv=b.tensors.get("bqkv"), wo=b.weight("wo"),
                     bo=b.tensors.get("bo"), num_q=shard.num_q, num_kv=kv1 - kv0, head_dim=config.head_dim,
                     eps=config.rms_norm_eps, kv_index=kv_index_for(config, shard.q_start, shard.q_stop))


def mlp_block(b: BlockTensors, config: ModelConfig) -> MlpBlock:
    """The MLP block the math takes, from its device-form tensors."""
    return MlpBlock(norm=b.tensors["norm"], w13=b.weight("w13"), b13=b.tensors.get("b13"), w2=b.weight("w2"),
                    b2=b.tensors.get("b2"), eps=config.rms_norm_eps)


def load_attn_block(src: ModelSource, layer: int, shard: Shard, dtype: torch.dtype,
                    fmt: Format = Format()) -> AttnBlock:
    return attn_block(attn_tensors(src, layer, shard, dtype, fmt).device_form(), src.config, shard)


def load_mlp_block(src: ModelSource, layer: int, shard: Shard, dtype: torch.dtype,
                   fmt: Format = Format()) -> MlpBlock:
    return mlp_block(mlp_tensors(src, layer, shard, dtype, fmt).device_form(), src.config)


def load_head(src: ModelSource, dtype: torch.dtype, fmt: Format = Format()) -> HeadWeights:
    """The originator's embedding, final norm and LM head (tied to the embedding when the model says so).

    Quantized formats keep the embedding in the model file (`src` must stay open): only the rows a prompt looks
    up are read. The LM head runs on the quantized kernel, and the likeliest tokens' logits are made exact from
    the file's rows."""
    c = src.config
    shape = (c.vocab_size, c.hidden_size)
    norm = _vector(src, "model.norm.weight", c.hidden_size, dtype)
    head_name = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
    if not fmt.quantized or not hasattr(src, "rows"):
        e = _matrix(src, "model.embed_tokens.weight", shape, Format()).to(dtype)
        head = e if c.tie_word_embeddings else _matrix(src, head_name, shape, Format()).to(dtype)
        return HeadWeights(embed=DenseTable(e), norm=norm, lm_head=Dense(head), eps=c.rms_norm_eps)
    # the head only ranks the tokens (the likeliest are rescored exactly): int4 ranks as well as int8 (the true
    # argmax stays in the first few) and runs faster on one thread
    h = BlockTensors()
    h.put("head", _matrix(src, head_name, shape, Format("int4", 32) if shape[1] % 32 == 0 else Format("int8")),
          ACT, "LM head")
    exact = FileRows(src, head_name)
    embed = exact if c.tie_word_embeddings else FileRows(src, "model.embed_tokens.weight")
    return HeadWeights(embed=embed, norm=norm, lm_head=h.device_form().weight("head"), eps=c.rms_norm_eps,
                       exact=exact)
