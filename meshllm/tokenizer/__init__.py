"""Tokenizers for the models meshllm runs: text to token ids and back, chat templates, streaming.

    tok = load_tokenizer("path/to/model")      # a Hugging Face folder or a .gguf file
    # a rendered template already holds BOS where the model wants it (as in transformers)
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    stream = StreamDecoder(tok)
    for token_id in generated:
        print(stream.push(token_id), end="")
    print(stream.flush())

Backends: tokenizer.json (the `tokenizers` library), tokenizer.model (sentencepiece) and GGUF
metadata (rebuilt with `tokenizers`); each matches transformers' AutoTokenizer ids for its files.
"""

from meshllm.tokenizer.base import Tokenizer
from meshllm.tokenizer.chat import render_chat
from meshllm.tokenizer.loader import load_tokenizer
from meshllm.tokenizer.stream import StreamDecoder

__all__ = ["StreamDecoder", "Tokenizer", "load_tokenizer", "render_chat"]
