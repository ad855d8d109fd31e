"""torch tensors <-> wire tensor records (raw bytes + dtype + shape)."""

from __future__ import annotations

from typing import Any

import torch

from ..wire.frames import check_tensor, tensor_record

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64,
          "int32": torch.int32, "uint8": torch.uint8}
_NAMES = {v: k for k, v in _TORCH.items()}


def to_record(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as a wire record (a copy of its bytes)."""
    t = t.detach().contiguous()
    return tensor_record(_NAMES[t.dtype], list(t.shape), t.view(torch.uint8).numpy().tobytes())


def from_record(record: Any, what: str = "tensor") -> torch.Tensor:
    """A validated wire record as a tensor (raises ProtocolError)."""
    dtype, shape, data = check_tensor(record, what)
    if not data:
        return torch.empty(shape, dtype=_TORCH[dtype])
    return torch.frombuffer(bytearray(data), dtype=_TORCH[dtype]).reshape(shape)
