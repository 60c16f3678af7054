"""A test double of the Hugging Face Hub HTTP API, for tests only: product code never knows it exists.

`LocalHub` keeps model repos in memory and serves, on 127.0.0.1 with an ephemeral port, the part of the Hub protocol
that huggingface_hub 2.4.0 speaks (with `HF_HUB_DISABLE_XET=1`) to create repos and branches, upload files (regular
files inline in the commit, LFS files through the basic Git LFS transfer) and download them. Tests thus push and pull
for real through `huggingface_hub` and `transformers` without reaching huggingface.co.

The `local_hub` fixture starts one per test and points huggingface_hub at it, in this process and in child processes
(through the environment). Deliberate simplifications compared with the real Hub:

- model repos only; a namespace is a user name (no organisations) and users write to their own namespace only;
- a file goes to LFS when its name matches `LFS_PATTERNS` (the `.gitattributes` of the initial commit), when it has
  at least `LFS_MIN_SIZE` bytes or when its first 512 bytes hold a NUL byte;
- LFS files are served by `/resolve` itself (the real Hub redirects to a CDN) with the same `X-Linked-*` headers;
- an LFS upload URL works once the batch API has announced the object, like a signed URL; no multipart, no verify;
- no Xet, pull requests, tags, pagination, gated repos, `expand` or `blobs` data, chunked request bodies.
"""

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

import pytest


LFS_PATTERNS = ("*.bin", "*.safetensors", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.npy", "*.npz",
                "*.pkl", "*.pickle", "*.model", "*.zip", "*.gz", "*.tar", "*.zst", "*tfevents*")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS).encode()

USERS = {"alice": "hf_local_alice", "bob": "hf_local_bob"}  # user name -> token; the fixture logs in as the first


@dataclass(frozen=True)
class Blob:
    """A file of a commit, with the ids the Hub reports for it."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        """The Git LFS pointer file that git stores instead of an LFS file's content."""
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def git_oid(self) -> str:
        stored = self.pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()

    @property
    def upload_oid(self) -> str:
        """The id huggingface_hub compares with its local file (`CommitOperationAdd._local_oid`) to skip it."""
        return self.sha256 if self.lfs else self.git_oid

    def entry(self, path: str) -> dict:
        """The file as listed by the tree and paths-info endpoints."""
        entry = {"type": "file", "path": path, "oid": self.git_oid, "size": len(self.data)}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class Commit:
    id: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> head commit id
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    announced_lfs: dict[str, int] = field(default_factory=dict)  # sha256 -> size that the batch API let be PUT

    def add_commit(self, branch: str, files: dict[str, Blob], title: str, message: str, author: str) -> Commit:
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        commit = Commit(secrets.token_hex(20), self.branches.get(branch), title, message, author, date, files)
        self.commits[commit.id] = commit
        self.branches[branch] = commit.id
        return commit

    def resolve(self, revision: str) -> Commit:
        """A branch's head or a commit given by its full id."""
        commit_id = self.branches.get(revision, revision)
        if commit_id not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return self.commits[commit_id]

    def history(self, revision: str) -> list[Commit]:
        """Commits reachable from `revision`, newest first."""
        commits = [self.resolve(revision)]
        while commits[-1].parent is not None:
            commits.append(self.commits[commits[-1].parent])
        return commits


class HubError(Exception):
    """An error answer. huggingface_hub maps `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) to its
    error classes and shows `X-Error-Message`."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **fields):
        super().__init__(message)
        self.status = status
        self.headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
        self.body = json.dumps({"error": message, **fields}).encode()


REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"
GIT_REPO = r"/(?P<repo>[^/]+/[^/]+)"
ROUTES = [  # (methods, path pattern, LocalHub method); revisions and tree paths come percent-encoded as one segment
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", REPO + r"(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("GET", REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
    ("POST", REPO + r"/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("GET", REPO + r"/commits/(?P<rev>[^/]+)", "list_commits"),
    ("POST", REPO + r"/branch/(?P<branch>[^/]+)", "create_branch"),
    ("POST", REPO + r"/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", REPO + r"/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", GIT_REPO + r"\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", GIT_REPO + r"\.git/info/lfs/objects/(?P<oid>[0-9a-f]{64})", "lfs_put"),
    ("GET HEAD", GIT_REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


class LocalHub:
    """In-memory Hub state and the HTTP server that serves it; a context manager that runs the server in a thread.

    `users` maps user names to their tokens; `user` and `token` are the first user's. `requests` logs
    "METHOD /path" of every request, so that tests can tell what reached the Hub.
    """

    def __init__(self, users: dict[str, str]):
        self.users = dict(users)
        self.user, self.token = next(iter(self.users.items()))
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _RequestHandler)
        self._server.hub = self
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._routes = [(methods.split(), re.compile(pattern), name) for methods, pattern, name in ROUTES]

    def __enter__(self) -> "LocalHub":
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()  # fast shutdown
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """History of a branch (or up to a commit id) in the order it was made: `[-1]` is the latest commit."""
        with self._lock:
            return self.repos[repo_id].history(revision)[::-1]

    def handle(self, method: str, target: str, authorization: str | None, body: bytes) -> tuple[int, dict, bytes]:
        """Answer one request: status, headers and body."""
        path, _, query = target.partition("?")
        with self._lock:
            self.requests.append(f"{method} {path}")
            try:
                user = self._authenticate(authorization)
                for methods, pattern, name in self._routes:
                    match = pattern.fullmatch(path)
                    if match and method in methods:
                        groups = {key: unquote(value) for key, value in match.groupdict().items() if value}
                        answer = getattr(self, f"_{name}")(user=user, body=body, params=parse_qs(query), **groups)
                        break
                else:
                    raise HubError(404, f"No route for {method} {path} in the local Hub test double")
            except HubError as error:
                return error.status, {"Content-Type": "application/json", **error.headers}, error.body
        data, headers = answer if isinstance(answer, tuple) else (answer, {})
        if not isinstance(data, bytes):
            data, headers = json.dumps(data).encode(), {"Content-Type": "application/json", **headers}
        return 200, headers, data

    def _authenticate(self, authorization: str | None) -> str | None:
        users = {f"Bearer {token}": user for user, token in self.users.items()}
        if authorization is not None and authorization not in users:
            raise HubError(401, "Invalid credentials in Authorization header")  # a message huggingface_hub knows
        return users.get(authorization)

    def _repo(self, repo_id: str, user: str | None) -> Repo:
        """The repo if `user` may read it. Like the real Hub: 401 for anonymous, 404 otherwise, both RepoNotFound."""
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and repo_id.split("/")[0] != user):
            raise HubError(401 if user is None else 404, "Repository not found", code="RepoNotFound")
        return repo

    def _writable_repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self._repo(repo_id, user)
        _require_write(user, repo_id)
        return repo

    def _whoami(self, user, **_):
        if user is None:
            raise HubError(401, "Authentication required")
        return {"type": "user", "name": user, "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"role": "write"}}}

    def _create_repo(self, user, body, **_):
        request = json.loads(body)
        repo_id = f"{request.get('organization') or user}/{request['name']}"
        _require_write(user, repo_id)
        if request.get("type", "model") != "model":
            raise HubError(400, "The local Hub test double only hosts model repos")
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=url)  # create_repo(exist_ok) reads url
        self.repos[repo_id] = repo = Repo(private=request.get("visibility") == "private")
        repo.add_commit("main", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)}, "initial commit", "", user)
        return {"url": url, "name": repo_id}

    def _validate_yaml(self, **_):
        return {"errors": [], "warnings": []}

    def _repo_info(self, user, repo, rev="main", **_):
        repository = self._repo(repo, user)
        commit = repository.resolve(rev)
        return {"id": repo, "author": repo.split("/")[0], "private": repository.private, "sha": commit.id,
                "lastModified": commit.date, "gated": False, "disabled": False, "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)]}

    def _tree(self, user, repo, rev, params, path="", **_):
        commit = self._repo(repo, user).resolve(rev)
        entries = _listing(commit.files, f"{path.strip('/')}/" if path else "", params.get("recursive") == ["true"])
        if path and not entries:
            raise HubError(404, f"{path} does not exist", code="EntryNotFound", headers={"X-Repo-Commit": commit.id})
        return entries

    def _paths_info(self, user, repo, rev, body, **_):
        commit = self._repo(repo, user).resolve(rev)
        entries = []
        for path in parse_qs(body.decode()).get("paths", []):
            if path in commit.files:
                entries.append(commit.files[path].entry(path))
            elif any(name.startswith(f"{path}/") for name in commit.files):
                entries.append(_folder_entry(path))
        return entries

    def _list_commits(self, user, repo, rev, **_):
        return [{"id": commit.id, "title": commit.title, "message": commit.message, "date": commit.date,
                 "authors": [{"user": commit.author}]} for commit in self._repo(repo, user).history(rev)]

    def _create_branch(self, user, repo, branch, body, **_):
        repository = self._writable_repo(repo, user)
        if branch in repository.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repository.branches[branch] = repository.resolve(start).id
        return {}

    def _preupload(self, user, repo, rev, body, **_):
        """Decide regular vs LFS per file and give the remote id, which lets huggingface_hub skip unchanged files."""
        commit = self._writable_repo(repo, user).resolve(rev)
        answers = []
        for file in json.loads(body)["files"]:
            remote = commit.files.get(file["path"])
            lfs = (file["size"] >= LFS_MIN_SIZE or b"\0" in base64.b64decode(file["sample"])
                   or any(fnmatch.fnmatch(file["path"].rsplit("/", 1)[-1], pattern) for pattern in LFS_PATTERNS))
            answers.append({"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": remote.upload_oid if remote else None})
        return {"files": answers}

    def _lfs_batch(self, user, repo, body, **_):
        """Git LFS batch API, basic transfer: an upload action for each object not stored yet."""
        repository = self._writable_repo(repo, user)
        request = json.loads(body)
        if request.get("operation") != "upload":
            raise HubError(400, "The local Hub test double only supports LFS uploads")
        objects = []
        for obj in request["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in repository.lfs_objects:
                repository.announced_lfs[obj["oid"]] = obj["size"]
                answer["actions"] = {"upload": {"href": f"{self.endpoint}/{repo}.git/info/lfs/objects/{obj['oid']}"}}
            objects.append(answer)
        return {"transfer": "basic", "objects": objects}

    def _lfs_put(self, repo, oid, body, **_):
        """Store an announced LFS object; like a signed storage URL, it takes no token but checks sha256 and size."""
        repository = self.repos.get(repo)
        size = repository.announced_lfs.get(oid) if repository else None
        if size is None:
            raise HubError(403, "No upload of this object was announced through the LFS batch API")
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match sha256 {oid} and size {size}")
        repository.lfs_objects[oid] = body
        del repository.announced_lfs[oid]
        return b""

    def _commit(self, user, repo, rev, body, params, **_):
        """Commit NDJSON lines (a header, then file, lfsFile and deletedFile operations) on top of a branch."""
        repository = self._writable_repo(repo, user)
        if "create_pr" in params:
            raise HubError(400, "The local Hub test double does not support pull requests")
        if rev not in repository.branches:
            raise HubError(404, f"Branch not found: {rev}", code="RevisionNotFound")
        head = repository.resolve(rev)
        (first, *operations) = [json.loads(line) for line in body.splitlines() if line.strip()]
        if first["key"] != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = first["value"]
        if not head.id.startswith(header.get("parentCommit", "")):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for operation in operations:
            key, path = operation["key"], operation["value"]["path"]
            if key == "file":
                files[path] = Blob(base64.b64decode(operation["value"]["content"]), lfs=False)
            elif key == "lfsFile":
                data = repository.lfs_objects.get(operation["value"]["oid"])
                if data is None:
                    raise HubError(422, f"LFS object of {path} was never uploaded")
                files[path] = Blob(data, lfs=True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            else:
                raise HubError(400, f"Unsupported commit operation: {key}")
        commit = repository.add_commit(rev, files, header["summary"], header.get("description", ""), user)
        return {"commitOid": commit.id, "commitUrl": f"{self.endpoint}/{repo}/commit/{commit.id}"}

    def _resolve(self, user, repo, rev, path, **_):
        """File content with the headers hf_hub_download needs: commit, ETag (git blob id; for LFS files the
        sha256 in X-Linked-Etag, which huggingface_hub prefers and uses as the cache's blob name) and sizes."""
        commit = self._repo(repo, user).resolve(rev)
        headers = {"X-Repo-Commit": commit.id}
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers=headers)
        headers |= {"ETag": f'"{blob.git_oid}"', "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers |= {"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))}
        return blob.data, headers


def _require_write(user: str | None, repo_id: str) -> None:
    if user is None:
        raise HubError(401, "You must be authenticated to write to the Hub")
    if repo_id.split("/")[0] != user:
        raise HubError(403, f"You don't have the rights to write to {repo_id}")


def _folder_entry(path: str) -> dict:
    return {"type": "directory", "path": path, "oid": hashlib.sha1(f"tree {path}".encode()).hexdigest(), "size": 0}


def _listing(files: dict[str, Blob], prefix: str, recursive: bool) -> list[dict]:
    """Tree entries below `prefix`: its direct children, or with `recursive` all files and folders below it."""
    entries = {}
    for path, blob in files.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            folder = prefix + "/".join(parts[:depth])
            entries[folder] = _folder_entry(folder)
        if recursive or len(parts) == 1:
            entries[path] = blob.entry(path)
    return [entries[path] for path in sorted(entries)]


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries a Content-Length

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, headers, data = self.server.hub.handle(self.command, self.path, self.headers.get("Authorization"), body)
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = _serve

    def log_message(self, format, *args) -> None:
        """Silent: `LocalHub.requests` records what tests need."""


URL_TEMPLATE_TAIL = "{repo_id}/resolve/{revision}/{filename}"


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A running `LocalHub` that huggingface_hub uses in this process and in child processes, logged in as its first
    user, with a cache of its own under `tmp_path`."""
    from huggingface_hub import constants, hf_api
    from transformers.utils import hub as transformers_hub

    with LocalHub(USERS) as hub:
        home = tmp_path / "hf_home"
        environment = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
                       "HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        # huggingface_hub read the environment when it was imported: patch what it derived from it.
        derived = {"ENDPOINT": hub.endpoint, "HUGGINGFACE_CO_URL_TEMPLATE": f"{hub.endpoint}/{URL_TEMPLATE_TAIL}",
                   "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_TOKEN_PATH": str(home / "token"),
                   "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"), "HF_HUB_DISABLE_XET": True,
                   "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_OFFLINE": False}
        for name, value in derived.items():
            monkeypatch.setattr(constants, name, value)
        # Shared HfApi instances keep the endpoint they were created with: huggingface_hub's module-level functions
        # and transformers' lazily created one (reset so that the one made during the test is dropped afterwards).
        monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
        yield hub
