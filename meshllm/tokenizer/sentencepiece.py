"""A `tokenizer.model` (sentencepiece) tokenizer that encodes as transformers' LlamaTokenizer does.

The vocabulary model is sentencepiece's own; around it we apply the rules transformers 5 applies
to Llama-style tokenizers, so a folder gives the same ids whether it ships tokenizer.model or
tokenizer.json:

- special-token strings in the text ("<s>", "</s>", added tokens) are matched first and become
  their ids; the text between them is encoded piece by piece;
- the "▁" dummy prefix goes on the first piece of text only (`legacy: false`, the default), or on
  every piece (`legacy: true`), or nowhere (`add_prefix_space: false`); and, unlike plain
  sentencepiece, not on a piece that already starts with a space (a quirk of transformers'
  Metaspace pre-tokenizer that its reference ids carry);
- decoding maps "▁" to a space, joins byte pieces into UTF-8 and strips one leading space.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from meshllm.errors import ModelFileError, TokenizerError
from meshllm.tokenizer._config import AddedToken, FolderConfig
from meshllm.tokenizer._spm_proto import piece_types, with_dummy_prefix
from meshllm.tokenizer.base import Tokenizer, merge_ids

_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class SentencePieceTokenizer(Tokenizer):
    """Tokenizer over a sentencepiece `tokenizer.model`."""

    def __init__(self, model_file: Path, config: FolderConfig) -> None:
        try:
            proto = Path(model_file).read_bytes()
            types = piece_types(proto)
            # Two processors over one vocabulary: whether "▁" is prepended is our decision per piece of
            # text, not the model file's, so each call picks the processor that does what we want.
            self._with_prefix = spm.SentencePieceProcessor(model_proto=with_dummy_prefix(proto, True))
            self._bare = spm.SentencePieceProcessor(model_proto=with_dummy_prefix(proto, False))
        except (OSError, ValueError, IndexError, RuntimeError) as e:
            raise ModelFileError(
                f"cannot load the sentencepiece model {model_file}: {e}; restore it from the model's source"
            ) from e
        sp = self._bare
        size = sp.get_piece_size()
        self._piece_bytes: list[bytes] = []
        for i in range(size):
            piece = sp.id_to_piece(i)
            byte = _BYTE_PIECE.fullmatch(piece) if types[i] == _BYTE else None
            self._piece_bytes.append(bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode())

        # Which strings are matched whole in the text, and which ids decode drops (transformers: control
        # and unknown pieces plus the named special tokens are special; user-defined pieces are not).
        added: dict[str, AddedToken] = {}
        special: set[int] = set()
        for i, kind in enumerate(types):
            if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED):
                token = AddedToken(i, sp.id_to_piece(i), special=kind != _USER_DEFINED)
                added[token.content] = token
        for token in config.added_tokens:
            added[token.content] = token
            if token.id >= size:
                self._piece_bytes.extend(b"" for _ in range(token.id + 1 - len(self._piece_bytes)))
            self._piece_bytes[token.id] = token.content.encode()
        ids_of = {t.content: t.id for t in added.values()}

        def lookup(text: str | None) -> int | None:
            if text is None:
                return None
            i = ids_of.get(text, sp.piece_to_id(text))
            return None if i == sp.unk_id() and text != sp.id_to_piece(sp.unk_id()) else i

        for name in (config.bos_token, config.eos_token, config.unk_token, config.pad_token):
            i = lookup(name)
            if i is not None:
                special.add(i)
                added.setdefault(name, AddedToken(i, name))
        special.update(t.id for t in added.values() if t.special)
        self._special = frozenset(special)
        self._added = {t.content: t.id for t in added.values()}
        # Longest first, so that of two tokens starting at one place the longer wins (as in `tokenizers`).
        alternatives = [
            (r"\s*" if t.lstrip else "") + f"({re.escape(t.content)})" + (r"\s*" if t.rstrip else "")
            for t in sorted(added.values(), key=lambda t: -len(t.content))
        ]
        self._split = re.compile("|".join(f"(?:{a})" for a in alternatives)) if alternatives else None

        self.bos_id = lookup(config.bos_token) if config.bos_token else _or_none(sp.bos_id())
        eos_id = lookup(config.eos_token) if config.eos_token else _or_none(sp.eos_id())
        self.eos_ids = merge_ids([eos_id], config.generation_eos_ids)
        self.bos_token = config.bos_token or self._token_text(self.bos_id)
        self.eos_token = config.eos_token or self._token_text(eos_id)
        self._eos_id = eos_id
        # transformers 5 adds no BOS when tokenizer_config.json does not say; transformers 4 and
        # llama.cpp do, and the Llama-family models these files come with were trained with it.
        self.add_bos = (config.add_bos_token if config.add_bos_token is not None else True) and self.bos_id is not None
        self._add_eos = bool(config.add_eos_token) and eos_id is not None
        self._prefix = config.add_prefix_space if config.add_prefix_space is not None else True
        self._legacy = config.legacy
        self.vocab_size = len(self._piece_bytes)
        self.chat_template = config.chat_template

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._piece_bytes[token_id].decode("utf-8", "replace")

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        prepend = self._prefix and (self._legacy or at_start) and not text.startswith((" ", "\u2581"))
        return (self._with_prefix if prepend else self._bare).encode(text)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The ids of `text`; special-token strings in it become their ids; BOS/EOS added as the model asks."""
        ids: list[int] = [self.bos_id] if add_special_tokens and self.add_bos else []
        pos = 0
        if self._split is not None:
            for match in self._split.finditer(text):
                if match.start() > pos:
                    ids += self._encode_text(text[pos : match.start()], at_start=pos == 0)
                content = next(g for g in match.groups() if g is not None)
                ids.append(self._added[content])
                pos = match.end()
        if pos < len(text):
            ids += self._encode_text(text[pos:], at_start=pos == 0)
        if add_special_tokens and self._add_eos:
            ids.append(self._eos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of `ids`; an incomplete UTF-8 sequence decodes to U+FFFD."""
        special = self._special if skip_special_tokens else frozenset()
        size = len(self._piece_bytes)
        # An id past the vocabulary (a model's embedding table is often padded beyond it) decodes to
        # nothing, as in `tokenizers`; a negative one is a caller's bug.
        if ids and min(ids) < 0:
            raise TokenizerError(f"cannot decode negative token id {min(ids)}; token ids start at 0")
        data = b"".join(self._piece_bytes[i] for i in ids if i < size and i not in special)
        text = data.decode("utf-8", errors="replace")
        # The inverse of the dummy prefix: transformers' decoder strips one leading space.
        return text[1:] if self._prefix and text.startswith(" ") else text

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special token (dropped by `decode(skip_special_tokens=True)`)."""
        return token_id in self._special


def _or_none(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None
