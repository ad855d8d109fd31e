"""Turn generated token ids into text one id at a time, never splitting a character."""

from __future__ import annotations

from meshllm.tokenizer.base import Tokenizer


class StreamDecoder:
    """Incremental detokenizer: `push` ids, get the newly completed text.

    Each push decodes only a short window: the ids of the last emitted piece (context) plus those
    not yet emitted. The new text is decode(window) minus decode(context), which gives the spacing
    a full decode would (a window starting mid-sequence strips or keeps its leading space the same
    way in both). Text ending in U+FFFD is an incomplete UTF-8 sequence: hold it for more ids.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._window: list[int] = []
        self._context = 0  # how many ids at the start of the window were already emitted
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ('' while a character is still partial)."""
        if self._skip and self._tok.is_special(token_id):
            # decode(skip_special_tokens=True) drops these, so leaving them out keeps the window short.
            return ""
        self._window.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end decodes to U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._tok.decode(self._window[: self._context], skip_special_tokens=self._skip)
        now = self._tok.decode(self._window, skip_special_tokens=self._skip)
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        piece = now[len(before) :]
        # The ids just emitted become the next window's context; older ones are no longer needed.
        del self._window[: self._context]
        self._context = len(self._window)
        self.text += piece
        return piece
