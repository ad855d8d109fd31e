"""Read what a Hugging Face model folder says about its tokenizer, beyond the vocabulary itself."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshllm.errors import ModelFileError


@dataclass(frozen=True)
class AddedToken:
    """A token matched whole in the text before the vocabulary model runs (from `added_tokens_decoder`)."""

    id: int
    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


@dataclass(frozen=True)
class FolderConfig:
    """tokenizer_config.json, special_tokens_map.json, chat_template.jinja and generation_config.json, merged."""

    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    add_bos_token: bool | None = None  # None: the files do not say
    add_eos_token: bool | None = None
    add_prefix_space: bool | None = None
    legacy: bool = False  # transformers 5's default for Llama-style tokenizers
    chat_template: str | None = None
    generation_eos_ids: tuple[int, ...] = ()
    added_tokens: tuple[AddedToken, ...] = ()


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"cannot read {path}: {e}; restore the file from the model's source") from e
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} is not a JSON object; restore the file from the model's source")
    return data


def _token_text(value: Any) -> str | None:
    # Older files serialize special tokens as AddedToken dicts rather than plain strings.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    # A separate template file is the newer convention and wins over the copy in tokenizer_config.json.
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFileError(f"cannot read {jinja}: {e}; restore the file from the model's source") from e
    legacy_json = _read_json(folder / "chat_template.json")
    if legacy_json is not None and isinstance(legacy_json.get("chat_template"), str):
        return legacy_json["chat_template"]
    template = config.get("chat_template")
    if isinstance(template, list):
        # Several named templates (e.g. "default", "tool_use"); plain chat uses "default".
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _eos_ids(generation: dict[str, Any] | None) -> tuple[int, ...]:
    value = (generation or {}).get("eos_token_id")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, int))
    return ()


def _added_tokens(config: dict[str, Any]) -> tuple[AddedToken, ...]:
    out = []
    for key, spec in (config.get("added_tokens_decoder") or {}).items():
        content = _token_text(spec)
        if content is None:
            continue
        flags = spec if isinstance(spec, dict) else {}
        out.append(
            AddedToken(
                id=int(key),
                content=content,
                special=bool(flags.get("special", True)),
                lstrip=bool(flags.get("lstrip", False)),
                rstrip=bool(flags.get("rstrip", False)),
            )
        )
    return tuple(sorted(out, key=lambda t: t.id))


def read_folder_config(folder: Path) -> FolderConfig:
    """Everything the folder says about its tokenizer besides the vocabulary file."""
    config = _read_json(folder / "tokenizer_config.json") or {}
    special_map = _read_json(folder / "special_tokens_map.json") or {}

    def token(name: str) -> str | None:
        text = _token_text(config.get(name))
        return text if text is not None else _token_text(special_map.get(name))

    def flag(name: str) -> bool | None:
        value = config.get(name)
        return value if isinstance(value, bool) else None

    return FolderConfig(
        bos_token=token("bos_token"),
        eos_token=token("eos_token"),
        unk_token=token("unk_token"),
        pad_token=token("pad_token"),
        add_bos_token=flag("add_bos_token"),
        add_eos_token=flag("add_eos_token"),
        add_prefix_space=flag("add_prefix_space"),
        legacy=bool(config.get("legacy", False)),
        chat_template=_chat_template(folder, config),
        generation_eos_ids=_eos_ids(_read_json(folder / "generation_config.json")),
        added_tokens=_added_tokens(config),
    )
