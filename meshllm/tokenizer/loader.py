"""Find and load the tokenizer of a model folder or GGUF file."""

from __future__ import annotations

import os
from pathlib import Path

from meshllm.errors import ModelFileError
from meshllm.model.gguf_meta import is_gguf
from meshllm.tokenizer._config import read_folder_config
from meshllm.tokenizer.base import Tokenizer



def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder (tokenizer.json or tokenizer.model) or of a .gguf file."""
    path = Path(path)
    if path.is_file():
        if not is_gguf(path):
            raise ModelFileError(
                f"{path} is neither a model folder nor a .gguf file; pass the folder that holds "
                "tokenizer.json or tokenizer.model, or a GGUF file"
            )
        from meshllm.tokenizer.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if not path.is_dir():
        raise ModelFileError(f"{path} does not exist; pass a model folder or a .gguf file")
    config = read_folder_config(path)
    # tokenizer.json is the complete pipeline; tokenizer.model is the vocabulary model alone.
    if (path / "tokenizer.json").is_file():
        from meshllm.tokenizer.hf import HFTokenizer

        return HFTokenizer.from_folder(path / "tokenizer.json", config)
    if (path / "tokenizer.model").is_file():
        from meshllm.tokenizer.sentencepiece import SentencePieceTokenizer

        return SentencePieceTokenizer(path / "tokenizer.model", config)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    hint = f"; or pass the GGUF file itself ({ggufs[0]})" if ggufs else ""
    raise ModelFileError(
        f"no tokenizer in {path}: looked for tokenizer.json and tokenizer.model; "
        f"copy them from the model's source (most Hugging Face repos ship at least one){hint}"
    )
