"""Models by name: a Hugging Face repo id (`org/name`, or `org/name:file.gguf` for one GGUF of a repo), fetched once
with huggingface_hub (resumable, cached in its own cache, `HF_ENDPOINT`, `HF_HUB_OFFLINE` and tokens honoured), and
the list of models on this machine (`meshllm models`).

Blocking: call from a thread, never from the event loop.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import DownloadError, ModelFileError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
# what a Hugging Face Llama folder needs (weights, configuration, tokenizer, chat template)
FOLDER_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "chat_template.json"]


def is_repo_ref(ref: str) -> bool:
    """Does `ref` name a Hub repo (and not a path on this machine)?"""
    repo, _, file = ref.partition(":")
    return bool(REPO_ID.match(repo)) and (not file or file.endswith(".gguf")) and not Path(ref).exists()


def resolve_model(ref: str | Path) -> Path:
    """A local path as is; a model of meshllm's cache by name; a repo id fetched (once) into the Hugging Face cache; anything else a clear error."""
    text = str(ref)
    path = Path(text).expanduser()
    if path.exists():
        return path
    from .default import cache_dir

    named = cache_dir() / "models" / f"{text}.gguf"  # a name `meshllm models` lists
    if "/" not in text and named.exists():
        return named
    if not is_repo_ref(text):
        raise ModelFileError(f"model path {text} does not exist: give a Hugging Face model folder (config.json + "
                             f"*.safetensors), a Llama .gguf file, or a Hugging Face repo id (org/name or "
                             f"org/name:file.gguf)")
    repo, _, file = text.partition(":")
    return fetch(repo, file or None)


def fetch(repo: str, file: str | None = None) -> Path:
    """Download a repo's model files (or one GGUF of it) with huggingface_hub; returns the local path."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        if file is not None:
            return Path(hf_hub_download(repo, file))
        try:  # one request, never retried (list_repo_files retries an unreachable Hub for ~25 s)
            siblings = HfApi().model_info(repo).siblings
        except RepositoryNotFoundError:
            raise
        except Exception:  # offline, or the Hub unreachable (its HTTP client's errors are not OSErrors)
            siblings = None  # the cached snapshot, if any, is what there is: snapshot_download finds it or says why not
        files = None if siblings is None else [s.rfilename for s in siblings]
        if files is not None and "config.json" not in files:
            ggufs = sorted(f for f in files if f.endswith(".gguf"))
            if ggufs:
                raise DownloadError(f"{repo} holds GGUF files, not a model folder: name one, e.g. "
                                    f"{repo}:{ggufs[0]} (it has {', '.join(ggufs[:6])}{' ...' if len(ggufs) > 6 else ''})")
            raise DownloadError(f"{repo} has no config.json: not a Hugging Face model folder")
        return Path(snapshot_download(repo, allow_patterns=FOLDER_FILES))
    except RepositoryNotFoundError:
        raise DownloadError(f"Hugging Face repo {repo!r} not found (or private: set HF_TOKEN), and no such path "
                            f"here") from None
    except RevisionNotFoundError:
        raise DownloadError(f"Hugging Face repo {repo!r} has no such revision") from None
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its base class: not cached, not "not found"
        raise DownloadError(f"{repo}{':' + file if file else ''} is not cached and the Hub cannot be reached "
                            f"(offline): fetch it once with network access") from None
    except EntryNotFoundError:
        raise DownloadError(f"file {file!r} not found in Hugging Face repo {repo!r}") from None
    except HfHubHTTPError as e:
        raise DownloadError(f"could not fetch {repo} from the Hugging Face Hub: {str(e).splitlines()[0]}") from None


def cached_models(meshllm_cache: Path) -> list[dict]:
    """Models on this machine: meshllm's default model and the Hugging Face cache's model repos (name, format,
    size, path)."""
    out = []
    models = meshllm_cache / "models"
    if models.is_dir():
        for f in sorted(models.glob("*.gguf")):
            out.append({"name": f.stem, "format": "gguf", "size_bytes": f.stat().st_size, "path": str(f)})
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # no Hugging Face cache yet (or an unreadable one): nothing there to list
        return out
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)[:1]:  # the newest
            names = {f.file_name for f in rev.files}
            ggufs = sorted(f for f in rev.files if f.file_name.endswith(".gguf"))
            for f in ggufs:
                out.append({"name": f"{repo.repo_id}:{f.file_name}", "format": "gguf", "size_bytes": f.size_on_disk,
                            "path": str(f.file_path)})
            if "config.json" in names:
                size = sum(f.size_on_disk for f in rev.files if not f.file_name.endswith(".gguf"))
                out.append({"name": repo.repo_id, "format": "safetensors", "size_bytes": size,
                            "path": str(rev.snapshot_path)})
    return out
