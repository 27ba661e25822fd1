"""A small in-memory Hugging Face Hub on 127.0.0.1 for tests (standard library, plus PyYAML for card metadata).

It speaks the part of the Hub protocol that ``huggingface_hub``'s ``hf_hub_download``,
``HfApi.model_info``/``repo_info``/``resolve_revision``, ``HfApi.create_repo`` and
``HfApi.upload_folder`` use (non-Xet path), which is also everything transformers'
``from_pretrained`` and ``pipeline`` ask for:

* ``HEAD``/``GET /{repo}/resolve/{revision}/{path}``: the file, with ``X-Repo-Commit``,
  ``ETag`` (the git blob sha1, as the Hub sends for regular files) and
  ``Content-Length``; ``404`` with ``X-Error-Code: RepoNotFound``, ``RevisionNotFound``
  or ``EntryNotFound`` otherwise.
* ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{revision}``: the model
  info (``sha``, ``private``, ``siblings``, and ``pipeline_tag``, ``library_name``, ``tags``,
  ``cardData`` from the ``README.md`` metadata, as the Hub derives them).
* ``GET /api/agent-harnesses``: huggingface_hub's user-agent registry (empty here), which
  it fetches once a day for any client, transformers included.
* ``POST /api/repos/create`` (``409`` if it exists; the ``visibility`` (or older ``private``)
  is kept), ``POST /api/validate-yaml``, ``POST /api/models/{repo}/preupload/{revision}``
  (every file is ``regular``, so commits carry their content inline and no LFS/Xet upload
  is needed) and ``POST /api/models/{repo}/commit/{revision}`` (the ndjson commit payload).
* Pull requests, both ways huggingface_hub opens them: ``POST /api/models/{repo}/discussions``
  with ``pullRequest`` (the Xet upload path: a branch ``refs/pr/N`` off ``main``, then
  ``GET /api/models/{repo}/discussions/{N}`` for its details, then commits to that ref) and
  ``?create_pr=1`` on a commit (the legacy path: the commit goes to a new ``refs/pr/N``, and
  the answer carries its ``pullRequestUrl``).

A private repo answers reads only with a token in :attr:`HubServer.tokens` (``401
RepoNotFound`` otherwise, as the Hub does). Requests no route serves are answered ``404``
and listed in :attr:`HubServer.unrouted`, so a test can assert a client asked for nothing
this Hub lacks.

Fixtures: ``hub_server`` (a running :class:`HubServer`) and ``hub`` (the server, with
``huggingface_hub`` pointed at it: endpoint, an empty cache in ``tmp_path``, online). Import them into a test module with ``from hub_server import hub, hub_server``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

REPO_TYPE_PREFIX = "/api/models/"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of ``data``: the ETag the Hub serves for a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """One model repo: commits (``sha -> {path: bytes}``), their ``messages`` (``sha -> (summary,
    description)``), branches (``name -> sha``), ``pull_requests`` (``number -> title``) and whether it is ``private``."""

    commits: Dict[str, Dict[str, bytes]] = field(default_factory=dict)
    branches: Dict[str, str] = field(default_factory=dict)
    messages: Dict[str, Tuple[str, str]] = field(default_factory=dict)
    private: bool = False
    pull_requests: Dict[int, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Optional[str]:
        """Commit sha of a branch name or a full commit sha; ``None`` if unknown."""
        return self.branches.get(revision) or (revision if revision in self.commits else None)

    def open_pull_request(self, title: str) -> int:
        """A new pull request: number ``N``, branch ``refs/pr/N`` at ``main``'s head."""
        number = len(self.pull_requests) + 1
        self.pull_requests[number] = title
        self.branches[f"refs/pr/{number}"] = self.branches["main"]
        return number

    def commit(self, branch: str, files: Dict[str, bytes], deleted: Set[str], message: str, description: str = "") -> str:
        parent = self.branches.get(branch)
        tree = dict(self.commits.get(parent, {})) if parent else {}
        tree.update(files)
        for path in deleted:
            tree.pop(path, None)
        sha = hashlib.sha1(json.dumps([parent, message, sorted((p, git_blob_sha1(d)) for p, d in tree.items())]).encode()).hexdigest()
        self.commits[sha] = tree
        self.messages[sha] = (message, description)
        self.branches[branch] = sha
        return sha


class HubServer(ThreadingHTTPServer):
    """The server: ``url``, ``repos``, a ``requests`` log of ``(method, path)``, ``unrouted``
    (the requests no route serves), ``corrupt`` (``(repo_id, path)`` pairs whose body is
    served damaged, with the intact file's ETag and length, as a download corrupted in
    transit), ``read_only`` (every write answers ``403``, as for a token without write
    access) and ``tokens`` (the tokens that may read private repos)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: Dict[str, Repo] = {}
        self.requests: List[Tuple[str, str]] = []
        self.unrouted: List[Tuple[str, str]] = []
        self.tokens: Set[str] = {"hf_test_token"}
        self.corrupt: Set[Tuple[str, str]] = set()
        self.read_only = False
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # --- responses ------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload: object, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, head: bool = False, headers: Optional[Dict[str, str]] = None, **extra: str) -> None:
        body = json.dumps({"error": message, **extra}).encode()
        self._send(status, body, {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message, **(headers or {})}, head=head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # --- routes ---------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        raw = urlsplit(self.path)
        path = unquote(raw.path)
        query = parse_qs(raw.query)
        with self.server.lock:
            self.server.requests.append((method, path))
        if method == "POST" and self.server.read_only and path != "/api/validate-yaml":
            self._body()
            return self._error(403, "Forbidden", "You don't have the rights to write to this namespace")
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(self._body()))
        if method == "POST" and path == "/api/validate-yaml":
            self._body()
            return self._json(200, {"errors": [], "warnings": []})
        if method == "GET" and path == "/api/agent-harnesses":
            return self._json(200, {"standardEnvVars": [], "harnesses": {}})
        if raw.path.startswith(REPO_TYPE_PREFIX):  # /api/models/{org}/{name}[/{action}/{revision}], revision quoted
            org, _, rest = raw.path[len(REPO_TYPE_PREFIX):].partition("/")
            name, _, rest = rest.partition("/")
            action, _, revision = rest.partition("/")
            repo_id, revision = unquote(f"{org}/{name}"), unquote(revision)
            if method == "POST" and action in ("preupload", "commit"):
                create_pr = query.get("create_pr") == ["1"]
                return self._preupload(repo_id, revision) if action == "preupload" else self._commit(repo_id, revision, create_pr)
            if method == "GET" and (not action or (action == "revision" and revision)):
                return self._model_info(repo_id, revision or "main")
            if action == "discussions" and method == "POST" and not revision:
                return self._open_pull_request(repo_id, json.loads(self._body()))
            if action == "discussions" and method == "GET" and revision.isdigit():
                return self._pull_request(repo_id, int(revision))
        if method in ("HEAD", "GET") and "/resolve/" in raw.path:
            repo_id, _, rest = raw.path.lstrip("/").partition("/resolve/")
            revision, _, file_path = rest.partition("/")
            return self._resolve(unquote(repo_id), unquote(revision), unquote(file_path), head=method == "HEAD")
        with self.server.lock:
            self.server.unrouted.append((method, path))
        self._error(404, "NotFound", f"no route for {method} {path}", head=method == "HEAD")

    def _repo_or_404(self, repo_id: str, head: bool = False) -> Optional[Repo]:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head=head)
        elif repo.private and self.headers.get("Authorization", "").removeprefix("Bearer ") not in self.server.tokens:
            self._error(401, "RepoNotFound", "Repository not found (private: a valid token is needed)", head=head)
            return None
        return repo

    def _create_repo(self, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        with self.server.lock:
            if repo_id in self.server.repos:
                return self._error(409, "RepoExists", "You already created this model repo", url=f"{self.server.url}/{repo_id}")
            private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
            repo = self.server.repos[repo_id] = Repo(private=private)
            repo.commit("main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, set(), "initial commit")
        self._json(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id})

    def _preupload(self, repo_id: str, revision: str) -> None:
        payload = json.loads(self._body())
        if self._repo_or_404(repo_id) is not None:
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]]
            self._json(200, {"files": files})

    def _commit(self, repo_id: str, revision: str, create_pr: bool = False) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        repo = self._repo_or_404(repo_id)
        if repo is None:
            return
        files: Dict[str, bytes] = {}
        deleted: Set[str] = set()
        message = description = ""
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "header":
                message, description = value["summary"], value.get("description", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, "BadRequest", "this test Hub accepts base64 file content only")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.add(value["path"])
            else:
                return self._error(400, "BadRequest", f"this test Hub does not support {key!r} operations")
        answer = {}
        with self.server.lock:
            if create_pr:
                number = repo.open_pull_request(message)
                revision = f"refs/pr/{number}"
                answer["pullRequestUrl"] = f"{self.server.url}/{repo_id}/discussions/{number}"
            sha = repo.commit(revision, files, deleted, message, description)
        self._json(200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True, **answer})

    def _open_pull_request(self, repo_id: str, payload: dict) -> None:
        repo = self._repo_or_404(repo_id)
        if repo is None:
            return
        if not payload.get("pullRequest"):
            return self._error(400, "BadRequest", "this test Hub opens pull requests only, not plain discussions")
        with self.server.lock:
            number = repo.open_pull_request(payload.get("title", ""))
        self._json(200, {"num": number, "url": f"{self.server.url}/{repo_id}/discussions/{number}"})

    def _pull_request(self, repo_id: str, number: int) -> None:
        repo = self._repo_or_404(repo_id)
        if repo is None:
            return
        if number not in repo.pull_requests:
            return self._error(404, "NotFound", f"no discussion #{number}")
        self._json(200, {
            "num": number, "title": repo.pull_requests[number], "author": {"name": "test"},
            "createdAt": "2026-01-01T00:00:00.000Z", "status": "draft", "repo": {"name": repo_id, "type": "model"},
            "isPullRequest": True, "events": [], "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [],
            "diff": "",
        })

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo_or_404(repo_id)
        if repo is None:
            return
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        tree = repo.commits[sha]
        card = card_metadata(tree.get("README.md", b"").decode())
        self._json(200, {
            "_id": sha[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
            "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
            "library_name": card.get("library_name"), "pipeline_tag": card.get("pipeline_tag"),
            "tags": list(card.get("tags") or []), "cardData": card or None,
            "siblings": [{"rfilename": p, "size": len(d), "blobId": git_blob_sha1(d)} for p, d in sorted(tree.items())],
        })

    def _resolve(self, repo_id: str, revision: str, file_path: str, head: bool) -> None:
        repo = self._repo_or_404(repo_id, head=head)
        if repo is None:
            return
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        data = repo.commits[sha].get(file_path)
        if data is None:
            return self._error(404, "EntryNotFound", f"{file_path} does not exist on {revision}", head=head, headers={"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Content-Type": "application/octet-stream"}
        if (repo_id, file_path) in self.server.corrupt:
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        self._send(200, data, headers, head=head)


def card_metadata(readme: str) -> Dict[str, object]:
    """The YAML metadata block at the top of a model card (``{}`` if none): what the Hub indexes."""
    import yaml

    if not readme.startswith("---"):
        return {}
    block, sep, _ = readme[3:].partition("\n---")
    return (yaml.safe_load(block) or {}) if sep else {}


@pytest.fixture
def hub_server() -> Iterator[HubServer]:
    """A running :class:`HubServer`, shut down after the test."""
    server = HubServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hub(hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """``hub_server`` with huggingface_hub (and transformers) pointed at it and an empty cache in ``tmp_path / "hf-cache"``.

    huggingface_hub reads its environment once, at import, into ``huggingface_hub.constants``;
    the constants are patched directly. transformers keeps one shared ``HfApi``, which holds
    the endpoint it was made with: it is dropped, so transformers makes a new one for this server.
    """
    import sys

    from huggingface_hub import constants

    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    if hasattr(constants, "AGENT_HARNESSES_PATH"):  # huggingface_hub's daily registry cache: not in the real HF_HOME
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return hub_server


def publish_timm_weights(repo: str, architecture: str = "test_resnet", seed: int = 123) -> Dict[str, object]:
    """Upload a timm-format checkpoint of ``architecture`` (seeded random weights, ``model.safetensors``
    + ``config.json``) to ``repo`` on the Hub ``huggingface_hub`` points at (the ``hub`` fixture); returns the weights."""
    import safetensors.torch
    import timm
    import torch
    from huggingface_hub import HfApi

    torch.manual_seed(seed)
    weights = timm.create_model(architecture).state_dict()
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    config = {"architecture": architecture, "num_classes": 1000,
              "pretrained_cfg": timm.models.get_pretrained_cfg(architecture).to_dict()}
    api.upload_file(path_or_fileobj=safetensors.torch.save(weights), path_in_repo="model.safetensors", repo_id=repo)
    api.upload_file(path_or_fileobj=json.dumps(config).encode(), path_in_repo="config.json", repo_id=repo)
    return weights
