"""A tokenizer run by the `tokenizers` library: a folder's tokenizer.json, or one built from GGUF metadata."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers

from meshllm.errors import ModelFileError, TokenizerError
from meshllm.tokenizer._config import FolderConfig
from meshllm.tokenizer.base import Tokenizer, merge_ids


class HFTokenizer(Tokenizer):
    """Tokenizer over a `tokenizers.Tokenizer` (normalizer, pre-tokenizer, model, post-processor, decoder)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
        extra_special: Iterable[str | None] = (),
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        self._tok = backend
        # Some tokenizer.json files carry a truncation or padding setting from training; a prompt must
        # never be cut or padded silently (transformers also turns both off unless asked per call).
        backend.no_truncation()
        backend.no_padding()
        # The named special tokens are special even where the vocabulary file does not mark them
        # (transformers registers them the same way), so decode drops them and the text matches them whole.
        missing = [
            tokenizers.AddedToken(t, special=True, normalized=False)
            for t in dict.fromkeys((bos_token, eos_token, *extra_special))
            if t is not None and backend.token_to_id(t) is not None and not self._is_added_special(t)
        ]
        if missing:
            backend.add_special_tokens(missing)
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.bos_token = bos_token if self.bos_id is not None else None
        self.eos_token = eos_token if eos_id is not None else None
        self.eos_ids = merge_ids([eos_id], extra_eos_ids)
        self._special = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        # Whether BOS is added is the post-processor's decision alone: transformers 5 ignores
        # tokenizer_config.json's add_bos_token / add_eos_token when a tokenizer.json is present.
        with_specials = backend.encode("a", add_special_tokens=True).ids
        without = backend.encode("a", add_special_tokens=False).ids
        self.add_bos = (
            self.bos_id is not None
            and with_specials[:1] == [self.bos_id]
            and without[:1] != [self.bos_id]
        )
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template

    def _is_added_special(self, token: str) -> bool:
        token_id = self._tok.token_to_id(token)
        added = self._tok.get_added_tokens_decoder().get(token_id)
        return added is not None and added.special

    @classmethod
    def from_folder(cls, tokenizer_json: Path, config: FolderConfig) -> HFTokenizer:
        """Load a folder's tokenizer.json, with the folder's tokenizer_config.json settings."""
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the Rust loader raises plain Exception for any malformed file
            raise ModelFileError(
                f"cannot load {tokenizer_json}: {e}; restore it from the model's source"
            ) from e
        return cls(
            backend,
            bos_token=config.bos_token,
            eos_token=config.eos_token,
            chat_template=config.chat_template,
            extra_special=(config.unk_token, config.pad_token),
            extra_eos_ids=config.generation_eos_ids,
        )

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The ids of `text`; special-token strings in it become their ids; BOS/EOS added as the model asks."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of `ids`; an incomplete UTF-8 sequence decodes to U+FFFD."""
        # `tokenizers` decodes an id past the vocabulary (a padded embedding table) to nothing.
        if ids and min(ids) < 0:
            raise TokenizerError(f"cannot decode negative token id {min(ids)}; token ids start at 0")
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special token (dropped by `decode(skip_special_tokens=True)`)."""
        return token_id in self._special

