"""Train a tiny sentencepiece BPE model offline, for tests that need a real `tokenizer.model`."""

from __future__ import annotations

import io
import random
from pathlib import Path

import sentencepiece as spm

_WORDS = (
    "the a an of to in and is was for on with as by at from that this it be are have has had not but or "
    "model token layer device network cluster prompt answer weight tensor shard split reduce gather "
    "hello world quick brown fox jumps over lazy dog river mountain city garden window morning evening "
    "python code function return value number list string error file folder read write open close "
    "small large fast slow first last every other many few one two three four five six seven eight nine ten"
).split()
_ACCENTED = "café naïve résumé façade jalapeño über straße crème brûlée déjà vu señor piñata coöperate".split()
# Few distinct CJK characters and emoji on purpose: most stay below the character coverage, so the
# trained model has to spell them with byte-fallback pieces, which is what the streaming tests need.
_CJK = ["你好", "世界", "模型", "東京", "こんにちは", "한국어"]
_EMOJI = ["🙂", "🚀", "👍", "🎉"]
_PUNCT = [".", ",", "!", "?", ":", ";", "...", " -", "'s", "\""]


def _corpus(lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if i % 3 == 0:
            words.insert(rng.randrange(len(words)), rng.choice(_ACCENTED))
        if i % 7 == 0:
            words.insert(rng.randrange(len(words)), rng.choice(_CJK))
        if i % 11 == 0:
            words.append(rng.choice(_EMOJI))
        if i % 5 == 0:
            words.append(str(rng.randint(0, 10_000)))
        line = " ".join(words) + rng.choice(_PUNCT)
        if i % 4 == 0:
            line = line.capitalize()
        if i % 9 == 0:
            line = "  " + line.replace(" ", "  ", 1)
        out.append(line)
    return out


# transformers 5 builds a LlamaTokenizer only when the config names the class (as real Llama folders
# do); without it, AutoTokenizer falls back to a generic tokenizer that drops sentencepiece's "▁"
# dummy prefix altogether. `legacy: false` (also transformers 5's default) puts the prefix on the
# first piece of text only, not after each special token. `clean_up_tokenization_spaces: false`
# keeps decode from deleting spaces before punctuation. No option makes transformers prepend "▁" to
# text that already starts with a space, as plain sentencepiece does; meshllm follows transformers.
LLAMA_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
    "clean_up_tokenization_spaces": False,
}


def train_sentencepiece(path: Path, vocab_size: int = 512) -> Path:
    """Train a byte-fallback BPE model into folder `path` and return the `tokenizer.model` path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(400)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.995,
        # Llama's own settings: no NFKC, spaces kept as written, one "▁" prepended to the text.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    out = path / "tokenizer.model"
    out.write_bytes(model.getvalue())
    return out
