"""Model sources: read only the tensor slices a device needs, from a Hugging Face folder or a GGUF file.

Every source speaks transformers' tensor names (`model.layers.3.self_attn.q_proj.weight`) and returns
torch tensors in the checkpoint's layout, so the loader above is the same for every format.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..errors import ConfigError, MissingTensorError, ModelFileError
from .config import ModelConfig
from .gguf_meta import is_gguf

log = logging.getLogger("meshllm.model")

Rows = tuple[int, int] | None


class ModelSource(Protocol):
    """A checkpoint that hands out tensor slices by transformers name."""

    config: ModelConfig
    path: Path

    def has(self, name: str) -> bool: ...

    def get(self, name: str, rows: Rows = None, cols: Rows = None) -> torch.Tensor: ...

    def close(self) -> None: ...

    def forget(self) -> None:
        """Drop the file pages read so far from this process's memory (they stay in the page cache): a loader
        calls it after each block it has made its own copy of, so the process never holds the file and the copy."""


def open_model(path: str | os.PathLike) -> ModelSource:
    """Open a Hugging Face folder or a `.gguf` file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileError(
            f"model path {p} does not exist: give a Hugging Face model folder (config.json + *.safetensors) "
            f"or a Llama .gguf file"
        )
    if p.is_file():
        if is_gguf(p):
            from .gguf_source import GGUFSource

            return GGUFSource(p)
        raise ModelFileError(f"{p} is a file but not a GGUF file; give a .gguf file or a model folder")
    ggufs = sorted(p.glob("*.gguf"))
    if not (p / "config.json").exists() and len(ggufs) == 1:
        from .gguf_source import GGUFSource

        return GGUFSource(ggufs[0])
    return SafetensorsSource(p)




class SafetensorsSource:
    """A Hugging Face folder: config.json, one or sharded *.safetensors (with the index file)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder
        self.config = ModelConfig.from_file(folder / "config.json")
        gen = folder / "generation_config.json"
        if gen.exists():
            self.config = _with_generation_config(self.config, gen)
        self._where = self._index()
        self._handles: dict[str, object] = {}
        self._mapped: dict[str, tuple[np.ndarray, torch.dtype, int]] = {}

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ModelFileError(f"{index} is malformed (needs a 'weight_map' object): {e}") from e
            return dict(weight_map)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelFileError(
                f"no *.safetensors file in {self.path}: a Hugging Face model folder needs model.safetensors "
                f"(or shards listed in model.safetensors.index.json)"
            )
        from safetensors import safe_open

        where: dict[str, str] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for key in h.keys():
                        where[key] = f.name
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise ModelFileError(f"{f} is not a readable safetensors file: {e}") from e
        return where

    def _handle(self, filename: str):
        h = self._handles.get(filename)
        if h is None:
            from safetensors import safe_open

            f = self.path / filename
            if not f.exists():
                raise ModelFileError(
                    f"shard file {f} is missing (listed in model.safetensors.index.json); "
                    f"download it again or fix the index"
                )
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:
                raise ModelFileError(f"{f} is not a readable safetensors file: {e}") from e
            self._handles[filename] = h
        return h

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, rows: Rows = None, cols: Rows = None) -> torch.Tensor:
        if name not in self._where:
            raise MissingTensorError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
        sl = self._handle(self._where[name]).get_slice(name)
        r = slice(*rows) if rows else slice(None)
        if cols is not None:
            return sl[r, cols[0]:cols[1]]
        return sl[r] if rows else sl[:]

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """float32 rows `index` of a 2-D tensor, read from the file's pages (only those rows)."""
        if name not in self._where:
            raise MissingTensorError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
        view = self._mapped.get(name)
        if view is None:
            view = self._mapped[name] = _map_tensor(self.path / self._where[name], name)
        data, dtype, width = view
        picked = torch.from_numpy(np.ascontiguousarray(data[index])).view(dtype)
        return picked.reshape(len(index), width).float().numpy()

    def close(self) -> None:
        self._handles.clear()
        self._mapped.clear()

    def forget(self) -> None:
        self.close()  # the maps are made again on the next read


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _map_tensor(path: Path, name: str) -> tuple[np.ndarray, torch.dtype, int]:
    """A 2-D tensor of a safetensors file as a read-only (rows, bytes per row) map of its bytes."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(n))[name]
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None or len(info["shape"]) != 2:
        raise ModelFileError(f"tensor {name!r} in {path} is {info['dtype']} {info['shape']}: expected a 2-D float "
                             f"matrix")
    start, stop = info["data_offsets"]
    rows, width = info["shape"]
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n + start, shape=(stop - start,))
    return data.reshape(rows, -1), dtype, width


def _with_generation_config(config: ModelConfig, path: Path) -> ModelConfig:
    try:
        gen = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    eos = gen.get("eos_token_id")
    extra = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    ids = tuple(dict.fromkeys([*config.eos_token_ids, *extra]))
    bos = gen.get("bos_token_id") if isinstance(gen.get("bos_token_id"), int) else config.bos_token_id
    return ModelConfig.from_dict({**config.to_dict(), "eos_token_ids": ids, "bos_token_id": bos})

