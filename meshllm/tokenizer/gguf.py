"""Build a tokenizer from a GGUF file's metadata, as transformers' GGUF loader does.

A GGUF carries no tokenizer.json: the vocabulary, merges, token types and special ids are metadata
under llama.cpp's key names. We rebuild the pipeline transformers builds for the same file
(transformers/integrations/gguf/gguf_tokenizer_mapping.py), so ids match its reference:

- "gpt2": byte-level BPE; tokens not spelled in the byte alphabet are respelled into it; the split
  regex comes from `tokenizer.ggml.pre` when it is one transformers knows, else GPT-2's.
- "llama": sentencepiece-style BPE with byte fallback, with merges from the file or recovered from
  the token scores, a "▁" Metaspace pre-tokenizer (Phi-3: a "▁"-prepending normalizer) and the
  matching decoder. Gemma's variant is refused.

Control tokens (type 3) are special added tokens; user-defined ones (type 4) plain added tokens.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from meshllm.errors import TokenizerError
from meshllm.tokenizer.base import merge_ids
from meshllm.tokenizer.hf import HFTokenizer

_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> the split regex its merges were learned with (the table transformers uses);
# a name not here keeps GPT-2's regex, built into the ByteLevel pre-tokenizer.
_PRE_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Recover BPE merges from a sentencepiece vocabulary: every split of a token into two tokens, best score first."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [
            (token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    # The same order transformers' generate_merges gives (a stable sort, reversed on the score).
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _byte_level(meta: dict[str, Any]) -> tokenizers.Tokenizer:
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(meta["tokens"])
    }
    merges = [tuple(m.split(" ")) for m in meta.get("merges") or ()]
    model = BPE(
        vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
    )
    tok = tokenizers.Tokenizer(model)
    split = _PRE_SPLITS.get(meta.get("pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_style(meta: dict[str, Any], add_prefix_space: bool) -> tokenizers.Tokenizer:
    tokens = meta["tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if meta.get("merges"):
        merges = [tuple(m.split(" ")) for m in meta["merges"]]
    elif meta.get("scores") is not None:
        merges = _merges_from_scores(tokens, meta["scores"])
    else:
        raise TokenizerError(
            "the GGUF sentencepiece vocabulary has neither tokenizer.ggml.merges nor tokenizer.ggml.scores; "
            "re-convert the model with a current llama.cpp"
        )
    tok = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_prefix_space else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _bos_eos_template(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.TemplateProcessing:
    """The post-processor transformers builds from the file's add_bos_token / add_eos_token."""
    head = [f"{bos[0]}:0"] if bos else []
    tail = [f"{eos[0]}:0"] if eos else []
    single = [*head, "$A:0", *tail]
    pair = [*single, *([f"{bos[0]}:1"] if bos else []), "$B:1", *([f"{eos[0]}:1"] if eos else [])]
    specials = dict(t for t in (bos, eos) if t)  # one entry when BOS and EOS are the same token
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(specials.items()))


def _read_metadata(path: Path) -> dict[str, Any]:
    from ..model.gguf_meta import read_header

    prefix = "tokenizer.ggml."
    meta = {}
    for key, value in read_header(path).metadata.items():
        if key.startswith(prefix):
            meta[key[len(prefix) :]] = value
        elif key == "tokenizer.chat_template":
            meta["chat_template"] = value
        elif key == "general.architecture":
            meta["architecture"] = value
    return meta


def load_gguf_tokenizer(path: Path) -> HFTokenizer:
    """The tokenizer described by the metadata of GGUF file `path` (tensors are not read)."""
    meta = _read_metadata(path)
    kind = meta.get("model")
    if kind is None or "tokens" not in meta:
        raise TokenizerError(f"{path} has no tokenizer metadata (tokenizer.ggml.*); use a GGUF that embeds one")
    if kind == "gpt2":
        backend = _byte_level(meta)
        default_bos = False
    elif kind == "llama" and str(meta.get("architecture", "")).startswith("gemma"):
        raise TokenizerError(
            f"{path} holds a Gemma sentencepiece vocabulary, which needs Gemma's own token spelling and merge "
            "order; that is not supported, use the model's Hugging Face folder instead"
        )
    elif kind == "llama":
        add_prefix_space = bool(meta.get("add_space_prefix", True))
        backend = _sentencepiece_style(meta, add_prefix_space)
        if meta.get("architecture") == "phi3":
            # Phi-3 prepends "▁" in a normalizer, to every piece of text and even before a leading space
            # ("  hi" -> "▁▁▁hi"), where Metaspace would not; transformers picks this by architecture too.
            backend.normalizer = normalizers.Sequence(
                [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
            )
            backend.pre_tokenizer = None
        # llama.cpp prepends BOS to a sentencepiece vocabulary whose file does not say otherwise.
        default_bos = True
    else:
        raise TokenizerError(
            f"{path} uses tokenizer type {kind!r} (tokenizer.ggml.model); only 'gpt2' (byte-level BPE) and "
            "'llama' (sentencepiece BPE) are supported; use the model's Hugging Face folder instead"
        )

    tokens: list[str] = meta["tokens"]
    types: list[int] = meta.get("token_type") or []
    alphabet = set(_byte_alphabet().values()) if kind == "gpt2" else None
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel; transformers skips it.
    control = [
        tokenizers.AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types)
        if k == _CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user = [
        tokenizers.AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types)
        if k == _USER_DEFINED and t in vocab
    ]
    if user:
        backend.add_tokens(user)

    def token(key: str) -> tuple[str, int] | None:
        i = meta.get(key)
        return (tokens[i], i) if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    backend.post_processor = _bos_eos_template(
        bos if meta.get("add_bos_token", default_bos) else None,
        eos if meta.get("add_eos_token", False) else None,
    )
    unk, pad = token("unknown_token_id"), token("padding_token_id")
    return HFTokenizer(
        backend,
        bos_token=bos[0] if bos else None,
        eos_token=eos[0] if eos else None,
        chat_template=meta.get("chat_template"),
        extra_special=(unk[0] if unk else None, pad[0] if pad else None),
        # End-of-turn and end-of-message tokens end generation as much as EOS does.
        extra_eos_ids=merge_ids([meta.get("eot_token_id"), meta.get("eom_token_id")]),
    )
