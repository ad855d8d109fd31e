"""A local stand-in for the Hugging Face Hub's file API, for `HF_ENDPOINT`: repos served from folders.

Only what huggingface_hub (2.x) calls to fetch a model: `HEAD`/`GET {endpoint}/{repo}/resolve/{revision}/{file}`
(X-Repo-Commit, ETag, Content-Length; plain files, never Xet), `GET /api/models/{repo}[/revision/{revision}]` (the
commit `sha` and the `siblings`) and `GET /api/models/{repo}/tree/{revision}` (the file list). A missing repo, revision or file is a
404 with the `X-Error-Code` huggingface_hub turns into RepositoryNotFoundError, RevisionNotFoundError or
EntryNotFoundError; anything else (e.g. `/api/agent-harnesses`) is a plain 404. Every request is logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

REVISION = "main"


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string, unquoted
    status: int


class FakeHub:
    """Repos {repo_id: folder} at `url`; `requests` lists what was asked, in order."""

    def __init__(self, repos: Mapping[str, Path | str]):
        self.repos = {repo: Path(folder) for repo, folder in repos.items()}
        self.commits = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in self.repos}  # 40 hex, like git
        self.requests: list[Request] = []
        self.url = ""
        self._lock = threading.Lock()

    def downloads(self, repo: str | None = None) -> list[str]:
        """The files sent with GET (of `repo`, or of every repo as `repo/file`), in order."""
        out = []
        for r in self.requests:
            parts = r.path.strip("/").split("/", 4)
            if r.method == "GET" and r.status == 200 and len(parts) == 5 and parts[2] == "resolve":
                name = f"{parts[0]}/{parts[1]}"
                if repo is None or name == repo:
                    out.append(parts[4] if repo else f"{name}/{parts[4]}")
        return out

    def files(self, repo: str) -> list[str]:
        """The repo's files, relative paths with '/'."""
        root = self.repos[repo]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def _log(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append(Request(method, path, status))


def _etag(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response has a Content-Length

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        def _route(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            parts = path.strip("/").split("/")
            if len(parts) >= 5 and parts[2] == "resolve":  # /{org}/{name}/resolve/{revision}/{file...}
                self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), path, body)
            elif body and len(parts) >= 4 and parts[:2] == ["api", "models"]:
                repo, rest = "/".join(parts[2:4]), parts[4:]
                if not rest or (len(rest) == 2 and rest[0] == "revision"):
                    self._info(repo, rest[1] if rest else REVISION, path)
                elif len(rest) >= 2 and rest[0] == "tree":
                    self._tree(repo, rest[1], path)
                else:
                    self._send(path, 404, b"Not Found")
            else:
                self._send(path, 404, b"Not Found", body=body)

        def _check(self, repo: str, revision: str, path: str, body: bool) -> Path | None:
            """The repo's folder, or None with a 404 sent for a missing repo or revision."""
            if repo not in hub.repos:
                self._send(path, 404, b"Repository not found", {"X-Error-Code": "RepoNotFound",
                                                                 "X-Error-Message": "Repository not found"}, body)
                return None
            if revision not in (REVISION, hub.commits[repo]):
                self._send(path, 404, b"Invalid rev id", {"X-Error-Code": "RevisionNotFound",
                                                          "X-Error-Message": f"Invalid rev id: {revision}"}, body)
                return None
            return hub.repos[repo]

        def _resolve(self, repo: str, revision: str, file: str, path: str, body: bool) -> None:
            root = self._check(repo, revision, path, body)
            if root is None:
                return
            f = root / file
            if ".." in file.split("/") or not f.is_file():
                self._send(path, 404, b"Entry not found", {"X-Error-Code": "EntryNotFound",
                                                           "X-Error-Message": "Entry not found",
                                                           "X-Repo-Commit": hub.commits[repo]}, body)
                return
            headers = {"X-Repo-Commit": hub.commits[repo], "ETag": f'"{_etag(f)}"',
                       "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
            self._send(path, 200, f.read_bytes(), headers, body)

        def _info(self, repo: str, revision: str, path: str) -> None:
            if self._check(repo, revision, path, True) is not None:
                self._json(path, {"id": repo, "modelId": repo, "sha": hub.commits[repo], "private": False,
                                  "siblings": [{"rfilename": name} for name in hub.files(repo)]})

        def _tree(self, repo: str, revision: str, path: str) -> None:
            root = self._check(repo, revision, path, True)
            if root is not None:  # recursive listing of every file (what list_repo_tree asks, for snapshot_download)
                self._json(path, [{"type": "file", "oid": _git_blob_id(root / name),
                                   "size": (root / name).stat().st_size, "path": name} for name in hub.files(repo)])

        def _json(self, path: str, obj) -> None:
            self._send(path, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _send(self, path: str, status: int, data: bytes, headers: Mapping[str, str] = {}, body: bool = True):
            hub._log(self.command, path, status)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


@contextlib.contextmanager
def fake_hub(repos: Mapping[str, Path | str]) -> Iterator[FakeHub]:
    """Serve `repos` on 127.0.0.1 (a free port) in a background thread; yields the hub, its base URL in `.url`."""
    hub = FakeHub(repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
