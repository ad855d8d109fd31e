"""A fast reader of a GGUF file's header: metadata key/values and the tensor table, without touching tensor data.

gguf's GGUFReader builds numpy views for every part of every field (about 3 s for a 49k-token vocabulary); this
walks the same layout with struct and reads numeric arrays with one numpy call each (about 0.1 s). One parse per
file per process is shared by the model source and the tokenizer.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError

MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    """A .gguf name, or a file that starts with the GGUF magic."""
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9
MAX_ITEMS = 1 << 28  # an array longer than this is a corrupt length, not a vocabulary


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the fastest-varying (columns)
    ggml_type: int
    offset: int  # absolute, in the file


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_offset: int


class _Cursor:
    def __init__(self, buf, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ModelFileError(f"{self.path}: GGUF header ends early (truncated file?)")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ModelFileError(f"{self.path}: GGUF string of {n} bytes runs past the end of the file")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            itype, n = self.take("<I"), self.take("<Q")
            if n > MAX_ITEMS:
                raise ModelFileError(f"{self.path}: GGUF array of {n} items: corrupt header")
            # every item takes at least its fixed size (a string: its 8-byte length), so a count the rest of the
            # file cannot hold is caught before any loop runs
            least = np.dtype(_NUMPY[itype]).itemsize if itype in _NUMPY else 8
            if n * least > len(self.buf) - self.pos:
                raise ModelFileError(f"{self.path}: GGUF array of {n} items runs past the end of the file")
            if itype in _NUMPY:
                dt = np.dtype(_NUMPY[itype])
                end = self.pos + n * dt.itemsize
                out = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).tolist()
                self.pos = end
                return out
            return [self.value(itype) for _ in range(n)]
        raise ModelFileError(f"{self.path}: unknown GGUF value type {vtype}")


def read_header(path: Path) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file (memoized per file version)."""
    st = os.stat(path)
    return _read_header(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _read_header(path: str, mtime_ns: int, size: int) -> GGUFHeader:
    p = Path(path)
    try:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, p)
    except ModelFileError:
        raise
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{p}: a GGUF string is not UTF-8 ({e})") from e
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise ModelFileError(f"cannot read {p} as GGUF: {e}; check the file is a complete .gguf download") from e


def _parse(buf, path: Path) -> GGUFHeader:
    if bytes(buf[:4]) != MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
    c = _Cursor(buf, path)
    c.pos = 4
    version = c.take("<I")
    if version not in (2, 3):
        raise ModelFileError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = c.take("<Q"), c.take("<Q")
    if n_tensors > 1 << 24 or n_kv > 1 << 24:
        raise ModelFileError(f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} keys: corrupt header")
    metadata = {}
    for _ in range(n_kv):
        key = c.string()
        metadata[key] = c.value(c.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.take("<I")
        if n_dims > 8:
            raise ModelFileError(f"{path}: tensor {name!r} has {n_dims} dimensions: corrupt header")
        dims = tuple(c.take("<Q") for _ in range(n_dims))
        infos.append((name, dims, c.take("<I"), c.take("<Q")))
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align % 8:
        raise ModelFileError(f"{path}: general.alignment is {align!r}; GGUF requires a positive multiple of 8")
    data_offset = c.pos + (-c.pos) % align
    tensors = {name: TensorInfo(name, dims, t, data_offset + off) for name, dims, t, off in infos}
    return GGUFHeader(version, metadata, tensors, data_offset)


def tensor_array(buf, info: TensorInfo) -> np.ndarray:
    """A tensor's stored data as GGUFReader gives it: float arrays (rows, cols) for F32/F16, else the raw bytes
    shaped (rows, bytes per row) for gguf.quants.dequantize."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType(info.ggml_type)
    shape = tuple(reversed(info.dims))
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        dt = np.float32 if qtype == GGMLQuantizationType.F32 else np.float16
        count = int(np.prod(shape))
        _check_fits(buf, info, count * np.dtype(dt).itemsize)
        return np.frombuffer(buf, dt, count, info.offset).reshape(shape)
    block, nbytes = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ModelFileError(f"tensor {info.name!r}: {shape[-1]} columns is not a whole number of {qtype.name} "
                             f"blocks of {block}")
    row = shape[-1] // block * nbytes
    byte_shape = (*shape[:-1], row)
    _check_fits(buf, info, int(np.prod(byte_shape)))
    return np.frombuffer(buf, np.uint8, int(np.prod(byte_shape)), info.offset).reshape(byte_shape)


def _check_fits(buf, info: TensorInfo, nbytes: int) -> None:
    if info.offset + nbytes > len(buf):
        raise ModelFileError(f"tensor {info.name!r} runs past the end of the file ({info.offset + nbytes} > "
                             f"{len(buf)} bytes): the file is truncated; download it again")
