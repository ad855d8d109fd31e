"""meshllm.tokenizer against transformers' AutoTokenizer, the independent reference, on three backends.

- tokenizer.model: a sentencepiece BPE model trained here in milliseconds (tests/helpers/spm.py);
- tokenizer.json: transformers' own conversion of that model, saved with save_pretrained;
- GGUF: SmolLM2-135M-Instruct (byte-level BPE, "gpt2"), and a vocabulary-only GGUF of the trained
  model written here (sentencepiece-style, "llama").
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

# Before transformers is first imported: huggingface_hub reads this once. Everything here is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from meshllm.errors import ModelFileError, TokenizerError  # noqa: E402
from meshllm.tokenizer import StreamDecoder, Tokenizer, load_tokenizer, render_chat  # noqa: E402
from helpers.spm import LLAMA_TOKENIZER_CONFIG, train_sentencepiece  # noqa: E402 - tests/ is on sys.path (conftest.py)


CHATML = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPM_CONFIG = {**LLAMA_TOKENIZER_CONFIG, "chat_template": CHATML}

TEXTS = [
    "Hello world",
    " leading space",
    "  two  spaces  inside",
    "trailing  ",
    "line one\nline two\n\n",
    "\ttab and\r\nCRLF",
    "café naïve déjà vu, Über straße",
    "你好世界 こんにちは 한국어",
    "emoji 🙂🎉 👍🏽 🏳️‍🌈",
    "e\u0301 combining",
    "def f(x):\n    return x ** 2  # square",
    "3.14159 + 2,718 = 1234567",
    "a<s>b</s> c",
    "<s>starts special",
    "",
    " ",
]

MULTIBYTE = ["café 你好 🙂 🎉 こんにちは 👍 straße", "  spaced 🎉🎉 emoji\n\n🏳️‍🌈 e\u0301", "Hello, 12345 world!"]

MESSAGES = [{"role": "user", "content": "Hi there! What is 2+2?"}]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *MESSAGES]


def _write_config(folder: Path, config: dict) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def _reference(folder: Path, **kwargs):
    transformers = pytest.importorskip("transformers")
    if "gguf_file" not in kwargs and not (folder / "tokenizer.json").exists():
        # transformers reads tokenizer.model through protobuf; without it, it falls back to tiktoken and fails.
        pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read tokenizer.model")
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("spm_train"))


@pytest.fixture(scope="module")
def spm_llama_dir(spm_model: Path) -> Path:
    _write_config(spm_model.parent, SPM_CONFIG)
    return spm_model.parent


@pytest.fixture(scope="module")
def spm_ref(spm_llama_dir: Path):
    return _reference(spm_llama_dir)


@pytest.fixture(scope="module")
def json_dir(spm_ref, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer_json")
    spm_ref.save_pretrained(str(folder))
    assert (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").exists()
    return folder


@pytest.fixture(scope="module")
def json_ref(json_dir: Path):
    return _reference(json_dir)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_ref(smollm2_gguf: Path):
    return _reference(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def _write_vocab_gguf(spm_model: Path, path: Path, architecture: str) -> Path:
    """A vocabulary-only GGUF ("llama" tokenizer) of the trained model, written as llama.cpp would."""
    gguf = pytest.importorskip("gguf")
    import sentencepiece as spm

    from meshllm.tokenizer._spm_proto import piece_types

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    writer = gguf.GGUFWriter(str(path), architecture)
    # transformers reads a model config from the same file before it builds the tokenizer.
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(32)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    writer.add_token_types(piece_types(spm_model.read_bytes()))
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHATML)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def llama_gguf(spm_model: Path, tmp_path_factory) -> Path:
    return _write_vocab_gguf(spm_model, tmp_path_factory.mktemp("gguf") / "vocab.gguf", "llama")


def _assert_same(ours: Tokenizer, ref, texts: Sequence[str]) -> None:
    for text in texts:
        ids = ref.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (text, skip)


# --- tokenizer.model (sentencepiece) ---------------------------------------------------------------


def test_sentencepiece_matches_transformers(spm_llama_dir: Path, spm_ref) -> None:
    tok = load_tokenizer(spm_llama_dir)
    assert type(tok).__name__ == "SentencePieceTokenizer"
    _assert_same(tok, spm_ref, TEXTS)


def test_sentencepiece_attributes(spm_llama_dir: Path) -> None:
    tok = load_tokenizer(spm_llama_dir)
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size, tok.add_bos) == (1, (2,), 512, True)
    assert (tok.bos_token, tok.eos_token, tok.chat_template) == ("<s>", "</s>", CHATML)
    assert tok.is_special(1) and tok.is_special(2) and tok.is_special(0)
    assert not any(tok.is_special(i) for i in tok.encode("Hello world", add_special_tokens=False))


def test_sentencepiece_agrees_with_plain_sentencepiece_elsewhere(spm_llama_dir: Path, spm_model: Path) -> None:
    """Only text starting with a space (or holding "<s>") encodes unlike plain sentencepiece."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    tok = load_tokenizer(spm_llama_dir)
    for text in TEXTS:
        if text and not text.startswith(" ") and "<s>" not in text:
            assert tok.encode(text) == [1, *sp.encode(text)], text
            assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), text


@pytest.mark.parametrize(
    "overrides",
    [
        {"legacy": True},
        {"add_prefix_space": False},
        {"add_bos_token": False, "add_eos_token": True},
    ],
    ids=["legacy", "no-prefix-space", "eos-not-bos"],
)
def test_sentencepiece_config_variants_match_transformers(spm_model: Path, tmp_path: Path, overrides: dict) -> None:
    (tmp_path / "tokenizer.model").write_bytes(spm_model.read_bytes())
    _write_config(tmp_path, {**SPM_CONFIG, **overrides})
    _assert_same(load_tokenizer(tmp_path), _reference(tmp_path), TEXTS)


def test_sentencepiece_added_tokens_match_transformers(spm_model: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(spm_model.read_bytes())
    added = {"512": ("<|im_start|>", True), "513": ("<|im_end|>", True), "514": ("<think>", False)}
    decoder = {
        k: {"content": c, "special": s, "lstrip": False, "rstrip": False, "normalized": False}
        for k, (c, s) in added.items()
    }
    _write_config(tmp_path, {**SPM_CONFIG, "eos_token": "<|im_end|>", "added_tokens_decoder": decoder})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [513, 2]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.vocab_size, tok.eos_ids) == (515, (513, 2))
    assert tok.is_special(512) and not tok.is_special(514)
    prompt = tok.apply_chat_template(WITH_SYSTEM)
    _assert_same(tok, _reference(tmp_path), [*TEXTS, prompt, "a <think>b</think> c"])


# --- tokenizer.json ---------------------------------------------------------------------------------


def test_tokenizer_json_matches_transformers(json_dir: Path, json_ref) -> None:
    tok = load_tokenizer(json_dir)
    assert type(tok).__name__ == "HFTokenizer"
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size, tok.add_bos) == (1, (2,), 512, True)
    _assert_same(tok, json_ref, TEXTS)


def test_tokenizer_json_and_model_agree(spm_llama_dir: Path, json_dir: Path) -> None:
    a, b = load_tokenizer(spm_llama_dir), load_tokenizer(json_dir)
    for text in TEXTS:
        assert a.encode(text) == b.encode(text), text


_NO_BOS = {
    "type": "TemplateProcessing",
    "single": [{"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {},
}


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": True}, {"add_bos_token": False, "add_eos_token": True}])
@pytest.mark.parametrize("post_processor", ["saved", "no-bos", "none"])
def test_tokenizer_json_bos_comes_from_post_processor(
    json_dir: Path, tmp_path: Path, post_processor: str, flags: dict
) -> None:
    # transformers 5 takes BOS/EOS from tokenizer.json's post-processor alone: tokenizer_config.json's
    # add_bos_token / add_eos_token change nothing, even with no post-processor at all.
    data = json.loads((json_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if post_processor != "saved":
        data["post_processor"] = _NO_BOS if post_processor == "no-bos" else None
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = json.loads((json_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    _write_config(tmp_path, {k: v for k, v in config.items() if k not in ("add_bos_token", "add_eos_token")} | flags)
    ref = _reference(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.add_bos == (post_processor == "saved") == (ref.encode("x")[:1] == [1])
    _assert_same(tok, ref, ["Hello world", "", "a<s>b"])


def test_tokenizer_json_truncation_setting_is_ignored(json_dir: Path, tmp_path: Path) -> None:
    data = json.loads((json_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_bytes((json_dir / "tokenizer_config.json").read_bytes())
    text = "a prompt much longer than four tokens"
    ids = load_tokenizer(tmp_path).encode(text)
    assert ids == _reference(tmp_path).encode(text) == load_tokenizer(json_dir).encode(text)


# --- GGUF -------------------------------------------------------------------------------------------


def test_gguf_byte_level_matches_transformers(smollm2: Tokenizer, smollm2_ref) -> None:
    assert (smollm2.bos_id, smollm2.eos_ids, smollm2.add_bos, smollm2.vocab_size) == (1, (2,), False, 49152)
    assert (smollm2.bos_token, smollm2.eos_token) == ("<|im_start|>", "<|im_end|>")
    texts = [
        *TEXTS,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|><file_sep>x <repo_name>",
        "I'm sure they'll've DONE it",
        "ｆｕｌｌ　ｗｉｄｔｈ",
    ]
    _assert_same(smollm2, smollm2_ref, texts)
    assert smollm2.is_special(0) and smollm2.is_special(2) and not smollm2.is_special(19556)


def test_gguf_sentencepiece_matches_transformers(llama_gguf: Path, spm_llama_dir: Path) -> None:
    tok = load_tokenizer(llama_gguf)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.vocab_size) == (1, (2,), True, 512)
    _assert_same(tok, _reference(llama_gguf.parent, gguf_file=llama_gguf.name), TEXTS)
    # One vocabulary, three files: the ids agree.
    spm_tok = load_tokenizer(spm_llama_dir)
    assert all(tok.encode(t) == spm_tok.encode(t) for t in TEXTS)


def test_gguf_phi3_sentencepiece_matches_transformers(spm_model: Path, tmp_path: Path) -> None:
    path = _write_vocab_gguf(spm_model, tmp_path / "phi3.gguf", "phi3")
    tok = load_tokenizer(path)
    # "▁" goes before a leading space too, so leading spaces survive a round trip, unlike with Metaspace.
    assert tok.decode(tok.encode("  two")) == "  two"
    _assert_same(tok, _reference(tmp_path, gguf_file=path.name), TEXTS)


@pytest.mark.parametrize(
    ("architecture", "kind", "message"), [("bert", "bert", "'bert'"), ("gemma2", "llama", "Gemma")]
)
def test_gguf_unsupported_tokenizer(tmp_path: Path, architecture: str, kind: str, message: str) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tokenizer_model(kind)
    writer.add_token_list(["[PAD]", "[UNK]", "hello"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(path)


# --- chat templates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("messages", [MESSAGES, WITH_SYSTEM], ids=["user", "system"])
@pytest.mark.parametrize("backend", ["spm", "gguf"])
def test_chat_template_matches_transformers(request, backend: str, messages: list[dict]) -> None:
    if backend == "spm":
        tok, ref = load_tokenizer(request.getfixturevalue("spm_llama_dir")), request.getfixturevalue("spm_ref")
    else:
        tok, ref = request.getfixturevalue("smollm2"), request.getfixturevalue("smollm2_ref")
    for add in (True, False):
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert tok.apply_chat_template(messages, add_generation_prompt=add) == expected
    prompt = tok.apply_chat_template(messages)
    assert tok.encode(prompt, add_special_tokens=False) == ref.encode(prompt, add_special_tokens=False)


def test_render_chat_globals_match_transformers(spm_ref) -> None:
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson }}|{{ m.content | tojson(indent=2) }}"
        "{% generation %}!{% endgeneration %}"
        "{% endfor %}{{ ns.n }}{{ bos_token }}{{ tools is none }}{{ strftime_now('%Y') | length }}"
    )
    messages = [{"role": "user", "content": "<b>&'\"é🙂</b>"}, {"role": "skip", "content": "x"}]
    expected = spm_ref.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert render_chat(template, messages, add_generation_prompt=False, bos_token="<s>", eos_token="</s>") == expected


def test_chat_template_raise_exception() -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('Conversation roles must alternate!') }}"
        "{% endif %}"
    )
    with pytest.raises(TokenizerError, match="Conversation roles must alternate!"):
        render_chat(template, WITH_SYSTEM, add_generation_prompt=True, bos_token=None, eos_token=None)


def test_chat_template_syntax_error() -> None:
    with pytest.raises(TokenizerError, match="does not parse"):
        render_chat("{% for m in messages %}", MESSAGES, add_generation_prompt=True, bos_token=None, eos_token=None)


def test_no_chat_template_names_raw_mode(spm_model: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(spm_model.read_bytes())
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template is None
    with pytest.raises(TokenizerError, match="raw mode"):
        tok.apply_chat_template(MESSAGES)


def test_chat_template_sources(spm_model: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(spm_model.read_bytes())
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    _write_config(tmp_path, {**SPM_CONFIG, "chat_template": templates})
    assert load_tokenizer(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J", encoding="utf-8")
    assert load_tokenizer(tmp_path).chat_template == "J"


# --- streaming --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["spm_llama_dir", "json_dir", "llama_gguf", "smollm2_gguf"])
@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_stream_equals_full_decode(request, backend: str, skip: bool) -> None:
    if backend == "smollm2_gguf":
        tok = request.getfixturevalue("smollm2")
    else:
        tok = load_tokenizer(request.getfixturevalue(backend))
    for text in MULTIBYTE:
        ids = [*tok.encode(text), tok.eos_ids[0], *tok.encode(" more 🎉 text", add_special_tokens=False)]
        stream = StreamDecoder(tok, skip_special_tokens=skip)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == stream.text == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces), pieces


def test_stream_holds_byte_fallback_character(spm_llama_dir: Path, spm_model: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    tok = load_tokenizer(spm_llama_dir)
    ids = tok.encode("a 🎉", add_special_tokens=False)
    assert [sp.is_byte(i) for i in ids[-4:]] == [True] * 4, "the fixture must spell 🎉 in byte pieces"
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in ids] == ["a", " ", "", "", "", "🎉"]
    assert stream.flush() == ""


def test_stream_flush_emits_incomplete_tail(spm_llama_dir: Path) -> None:
    tok = load_tokenizer(spm_llama_dir)
    ids = tok.encode("ok 🎉", add_special_tokens=False)[:-1]
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in ids) == "ok "
    assert stream.flush() == "\ufffd"


class _CountingTokenizer(Tokenizer):
    """Wraps a tokenizer and records the longest id list it is asked to decode."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.longest = 0

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return self.inner.is_special(token_id)


def test_stream_decodes_a_bounded_window(spm_llama_dir: Path) -> None:
    tok = load_tokenizer(spm_llama_dir)
    ids = tok.encode(" ".join(["the quick brown fox 🎉 你好 über"] * 200))
    counting = _CountingTokenizer(tok)
    stream = StreamDecoder(counting)
    for i in ids:
        stream.push(i)
    stream.flush()
    assert len(ids) > 1000 and counting.longest <= 12
    assert stream.text == tok.decode(ids)


# --- errors -----------------------------------------------------------------------------------------


def test_missing_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="tokenizer.json and tokenizer.model") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ModelFileError, match="neither a model folder nor a .gguf"):
        load_tokenizer(tmp_path / "weights.bin")


def test_unreadable_files(spm_model: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(spm_model.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelFileError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 16)
    with pytest.raises(ModelFileError, match="broken.gguf"):
        load_tokenizer(broken)


@pytest.mark.parametrize("backend", ["spm_llama_dir", "json_dir"])
def test_decode_ids_outside_the_vocabulary(request, backend: str, json_ref) -> None:
    # A model's embedding table is often padded past the tokenizer; transformers decodes those ids to nothing.
    tok = load_tokenizer(request.getfixturevalue(backend))
    ids = [*tok.encode("a b", add_special_tokens=False), 9999]
    assert tok.decode(ids) == json_ref.decode(ids) == "a b"
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == "a b"
    with pytest.raises(TokenizerError, match="negative"):
        tok.decode([5, -1])
