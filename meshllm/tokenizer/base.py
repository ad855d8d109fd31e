"""The tokenizer interface every backend (sentencepiece, tokenizer.json, GGUF) implements."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from meshllm.errors import TokenizerError
from meshllm.tokenizer.chat import render_chat


class Tokenizer:
    """A model's tokenizer: text to ids and back, its special tokens and its chat template."""

    bos_id: int | None
    eos_ids: tuple[int, ...]
    vocab_size: int
    add_bos: bool
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The ids of `text`; special-token strings in it become their ids; BOS/EOS added as the model asks."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of `ids`; an incomplete UTF-8 sequence decodes to U+FFFD."""
        raise NotImplementedError

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special token (dropped by `decode(skip_special_tokens=True)`)."""
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`, rendered with the model's own chat template."""
        if self.chat_template is None:
            raise TokenizerError(
                "this model ships no chat template (none in tokenizer_config.json, chat_template.jinja or the "
                "GGUF metadata); send the prompt in raw mode, or add a chat_template.jinja to the model folder"
            )
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, add_bos={self.add_bos})"
        )


def merge_ids(*groups: Iterable[int | None]) -> tuple[int, ...]:
    """The ids of all `groups` in first-seen order, without duplicates or None."""
    seen: dict[int, None] = {}
    for group in groups:
        for i in group:
            if i is not None:
                seen.setdefault(int(i), None)
    return tuple(seen)
