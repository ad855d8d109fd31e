"""Models by name (`--model org/name`, `org/name:file.gguf`) fetched from a local stand-in of the Hugging Face Hub.

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE when it is imported, so every resolution runs in
a process of its own (`python -m meshllm ...`, as a user runs it) with the fake hub's URL and a private HF_HOME.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as QType

from helpers.fake_hub import FakeHub, fake_hub
from helpers.gguf_export import export_gguf

ROOT = Path(__file__).resolve().parents[1]
REPO = "testorg/tiny-llama"  # a Hugging Face folder, plus files meshllm must not fetch
GGUF_REPO = "testorg/tiny-llama-gguf"  # GGUF files only
GGUF = "tiny-f32.gguf"
OTHER_GGUF = "tiny-q8_0.gguf"
GENERATE = ["generate", "--prompt", "Hello", "--max-tokens", "5", "--json", "--raw", "--ignore-eos", "--threads", "1"]


@pytest.fixture(scope="module")
def repos(make_model, tmp_path_factory) -> dict[str, Path]:
    """{repo id: folder}: the checkpoint folder with a README and an unrelated weight file, and a GGUF-only repo."""
    source = make_model("gqa_tied")
    root = tmp_path_factory.mktemp("hub-repos")
    folder = shutil.copytree(source, root / "folder")
    (folder / "README.md").write_text("# tiny llama\n")
    (folder / "original").mkdir()
    (folder / "original" / "consolidated.pth").write_bytes(b"\0" * 1024)
    ggufs = root / "ggufs"
    ggufs.mkdir()
    export_gguf(source, ggufs / GGUF)
    export_gguf(source, ggufs / OTHER_GGUF, QType.Q8_0)
    return {REPO: folder, GGUF_REPO: ggufs}


def hub_env(url: str, hf_home: Path, offline: bool = False) -> dict[str, str]:
    """This environment, pointed at the fake hub and a private Hugging Face cache (no token, no mesh)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE", "MESHLLM_SECRET",
                        "HUGGINGFACE_HUB_CACHE", "HF_HUB_ENABLE_HF_TRANSFER", "HF_XET_HIGH_PERFORMANCE")}
    env.update(HF_ENDPOINT=url, HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"),
               HF_HUB_OFFLINE="1" if offline else "0", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_IMPLICIT_TOKEN="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return env


def meshllm(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m meshllm ARGS`, run from `cwd` (where no `org/name` folder exists)."""
    return subprocess.run([sys.executable, "-m", "meshllm", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def generated(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def resolve(env: dict[str, str], *refs: str, cwd: Path) -> list[str]:
    """resolve_model(ref) for each ref, in one fresh process."""
    code = "import sys\nfrom meshllm.model.hub import resolve_model\nfor r in sys.argv[1:]: print(resolve_model(r))"
    proc = subprocess.run([sys.executable, "-c", code, *refs], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """exit 1, and stderr is one `meshllm: error: ...` line naming each of `names` (no traceback)."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshllm: error: "), proc.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def fetched(repos, tmp_path_factory) -> dict:
    """Generate once from each repo by name into one Hugging Face cache, and once from the local copies."""
    work = tmp_path_factory.mktemp("hub-fetch")
    hf_home = work / "hf"
    out = {"hf_home": hf_home, "cwd": work}
    local = hub_env("http://127.0.0.1:9", work / "unused-hf")  # nothing to fetch: no hub needed
    with ThreadPoolExecutor(1) as pool, fake_hub(repos) as hub:  # the local runs meanwhile, one at a time
        folder_local = pool.submit(meshllm, local, *GENERATE, "--model", str(repos[REPO]), cwd=work)
        gguf_local = pool.submit(meshllm, local, *GENERATE, "--model", str(repos[GGUF_REPO] / GGUF), cwd=work)
        env = hub_env(hub.url, hf_home)
        out["folder"] = generated(meshllm(env, *GENERATE, "--model", REPO, cwd=work))
        out["folder_requests"] = list(hub.requests)
        out["folder_downloads"] = hub.downloads()
        n = len(hub.requests)
        out["gguf"] = generated(meshllm(env, *GENERATE, "--model", f"{GGUF_REPO}:{GGUF}", cwd=work))
        out["gguf_requests"] = hub.requests[n:]
        out["gguf_downloads"] = hub.downloads()[len(out["folder_downloads"]):]
        out["folder_local"], out["gguf_local"] = generated(folder_local.result()), generated(gguf_local.result())
    return out


def snapshot(hf_home: Path, repo: str) -> Path:
    (folder,) = (hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir()
    return folder


def test_a_repo_id_fetches_the_model_folder_and_generates_like_it(fetched, repos):
    model_files = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                   "tokenizer_config.json"}
    assert model_files <= {p.name for p in repos[REPO].iterdir()}  # the checkpoint has what meshllm needs
    # the model's files were downloaded, once each; the README and the unrelated weights were not
    assert sorted(fetched["folder_downloads"]) == sorted(f"{REPO}/{name}" for name in model_files)
    assert all(GGUF_REPO not in r.path for r in fetched["folder_requests"])
    folder = snapshot(fetched["hf_home"], REPO)
    assert Path(fetched["folder"]["model"]) == folder
    assert {p.name for p in folder.iterdir()} == model_files
    for name in model_files:
        assert (folder / name).read_bytes() == (repos[REPO] / name).read_bytes()
    ids = fetched["folder"]["token_ids"]
    assert len(ids) == 5 and ids == fetched["folder_local"]["token_ids"]


def test_a_repo_file_fetches_just_that_gguf_and_generates_like_it(fetched, repos):
    assert fetched["gguf_downloads"] == [f"{GGUF_REPO}/{GGUF}"]  # not the other GGUF, nothing of the other repo
    assert [(r.method, r.path) for r in fetched["gguf_requests"] if r.path.startswith(f"/{GGUF_REPO}/")] == [
        ("HEAD", f"/{GGUF_REPO}/resolve/main/{GGUF}"), ("GET", f"/{GGUF_REPO}/resolve/main/{GGUF}")]
    path = Path(fetched["gguf"]["model"])
    assert path.name == GGUF and path.is_relative_to(fetched["hf_home"] / "hub")
    assert path.read_bytes() == (repos[GGUF_REPO] / GGUF).read_bytes()
    ids = fetched["gguf"]["token_ids"]
    assert len(ids) == 5 and ids == fetched["gguf_local"]["token_ids"]


def test_a_second_resolution_downloads_nothing(fetched, repos):
    with fake_hub(repos) as hub:
        paths = resolve(hub_env(hub.url, fetched["hf_home"]), REPO, f"{GGUF_REPO}:{GGUF}", cwd=fetched["cwd"])
    assert paths == [fetched["folder"]["model"], fetched["gguf"]["model"]]
    assert hub.downloads() == []  # the cache was used ...
    asked = {(r.method, r.path) for r in hub.requests}
    assert ("GET", f"/api/models/{REPO}/revision/main") in asked  # ... though the hub was asked what is current
    assert ("HEAD", f"/{GGUF_REPO}/resolve/main/{GGUF}") in asked


def test_a_gguf_only_repo_without_a_file_names_one_to_choose(repos, tmp_path):
    with fake_hub(repos) as hub:
        proc = meshllm(hub_env(hub.url, tmp_path / "hf"), *GENERATE, "--model", GGUF_REPO, cwd=tmp_path)
    line = assert_one_line_error(proc, f"{GGUF_REPO}:{GGUF}", OTHER_GGUF)
    assert "name one" in line
    assert hub.downloads() == []
    assert ("GET", f"/api/models/{GGUF_REPO}", 200) in [(r.method, r.path, r.status) for r in hub.requests]


@pytest.mark.parametrize("ref, names, asked", [
    ("testorg/no-such-model", ["'testorg/no-such-model'", "not found"], "/api/models/testorg/no-such-model"),
    ("testorg/no-such-model:x.gguf", ["'testorg/no-such-model'", "not found"],
     "/testorg/no-such-model/resolve/main/x.gguf"),
    (f"{GGUF_REPO}:missing.gguf", ["'missing.gguf'", f"'{GGUF_REPO}'", "not found"],
     f"/{GGUF_REPO}/resolve/main/missing.gguf"),
])
def test_a_missing_repo_or_file_is_a_one_line_error_naming_it(repos, tmp_path, ref, names, asked):
    with fake_hub(repos) as hub:
        proc = meshllm(hub_env(hub.url, tmp_path / "hf"), *GENERATE, "--model", ref, cwd=tmp_path)
    assert_one_line_error(proc, *names)
    assert asked in [r.path for r in hub.requests if r.status == 404]  # the hub said no (not a network error)
    assert hub.downloads() == []


def test_models_lists_the_fetched_repos(fetched, repos):
    env = hub_env("http://127.0.0.1:9", fetched["hf_home"], offline=True)  # listing asks no hub
    proc = meshllm(env, "models", "--json", cwd=fetched["cwd"])
    assert proc.returncode == 0, proc.stderr
    models = {m["name"]: m for m in json.loads(proc.stdout)}
    folder = models[REPO]
    assert folder["format"] == "safetensors" and folder["path"] == fetched["folder"]["model"]
    assert folder["size_bytes"] == sum(p.stat().st_size for p in Path(folder["path"]).iterdir())
    assert folder["size_bytes"] > (repos[REPO] / "model.safetensors").stat().st_size
    gguf = models[f"{GGUF_REPO}:{GGUF}"]
    assert gguf["format"] == "gguf" and gguf["size_bytes"] == (repos[GGUF_REPO] / GGUF).stat().st_size
    assert gguf["path"] == fetched["gguf"]["model"]
    assert f"{GGUF_REPO}:{OTHER_GGUF}" not in models  # never fetched


@contextlib.contextmanager
def no_hub(how: str, repos) -> Iterator[tuple[str, FakeHub]]:
    """The hub out of reach: HF_HUB_OFFLINE=1 (the hub up, to see it is not asked), or a closed port."""
    with fake_hub(repos) as hub:
        if how == "offline":
            yield hub.url, hub
    if how == "unreachable":
        yield hub.url, hub  # shut: connections are refused


@pytest.mark.slow
@pytest.mark.parametrize("how", ["offline", "unreachable"])
def test_without_the_hub_a_fetched_name_resolves_from_the_cache(fetched, repos, how):
    with no_hub(how, repos) as (url, hub):
        paths = resolve(hub_env(url, fetched["hf_home"], offline=how == "offline"), REPO, f"{GGUF_REPO}:{GGUF}",
                        cwd=fetched["cwd"])
    assert paths == [fetched["folder"]["model"], fetched["gguf"]["model"]]
    assert hub.requests == []  # offline, the hub (up) was not asked


@pytest.mark.slow
# (not `org/name:file.gguf` with the hub unreachable: huggingface_hub retries that for ~25 s before it gives up)
@pytest.mark.parametrize("how, ref", [("offline", REPO), ("offline", f"{GGUF_REPO}:{GGUF}"), ("unreachable", REPO)])
def test_without_the_hub_an_unfetched_name_is_a_one_line_error(repos, tmp_path, how, ref):
    with no_hub(how, repos) as (url, hub):
        proc = meshllm(hub_env(url, tmp_path / "hf", offline=how == "offline"), *GENERATE, "--model", ref,
                       cwd=tmp_path)
    line = assert_one_line_error(proc, ref, "not cached", "cannot be reached")
    assert "not found" not in line  # the repo may well exist: it is the cache that lacks it
    assert hub.requests == []
