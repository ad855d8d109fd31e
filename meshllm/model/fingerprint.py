"""A model's content hash: SHA-256 over its config and every weight file, remembered per (path, size, mtime)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .config import ModelConfig


def weight_files(path: Path) -> list[Path]:
    """The files whose bytes define the weights."""
    if path.is_file():
        return [path]
    return sorted(path.glob("*.safetensors"))


def model_hash(path: str | os.PathLike, config: ModelConfig, memo_dir: Path | None = None) -> str:
    """Content hash of a model (blocking; hashing a large model once takes seconds, then it is remembered)."""
    path = Path(path).resolve()
    files = weight_files(path)
    stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    memo = memo_dir / "model-hashes.json" if memo_dir else None
    key = hashlib.sha256(json.dumps([stamp, config.to_dict()], sort_keys=True).encode()).hexdigest()
    known: dict[str, str] = {}
    if memo and memo.exists():
        try:
            known = json.loads(memo.read_text())
        except (OSError, json.JSONDecodeError):
            known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(4 << 20):
                h.update(chunk)
    digest = h.hexdigest()
    if memo:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            known[key] = digest
            tmp = memo.with_suffix(".tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, memo)
        except OSError:
            pass  # a memo we cannot write only costs a rehash next time
    return digest
