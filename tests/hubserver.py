"""A Hugging Face Hub-compatible HTTP server on 127.0.0.1, for tests that drive the real `huggingface_hub` client.

Standard library only. State lives in memory: repos (model and dataset) with git-like commits, branches,
an LFS object store, and a log of every request. Endpoints implemented (as `huggingface_hub` 2.4 calls them):

    GET  /api/whoami-v2                                    whoami
    GET  /api/models?filter=&search=&author=&...           list_models
    GET  /api/{models|datasets}/{repo}[/revision/{rev}]    repo_info / model_info
    GET  /api/{models|datasets}/{repo}/tree/{rev}[/{dir}]  list_repo_tree (used by snapshot_download)
    GET  /api/{models|datasets}/{repo}/refs                list_repo_refs
    HEAD|GET /[datasets/]{repo}/resolve/{rev}/{path}       hf_hub_download (ETag, X-Repo-Commit, Range -> 206)
    POST /api/repos/create                                 create_repo (409 if it exists)
    POST /api/validate-yaml                                README.md check before a commit (always valid)
    POST /api/{models|datasets}/{repo}/preupload/{rev}     upload modes: lfs for LFS_SUFFIXES or > 1 MiB
    POST /[datasets/]{repo}.git/info/lfs/objects/batch     LFS batch: answers an upload href on this server
    PUT  /_lfs/{ticket}                                    the href: raw bytes, checked against the sha256
    POST /api/{models|datasets}/{repo}/commit/{branch}     ndjson commit (file, lfsFile, deletedFile/Folder)
    POST /api/{models|datasets}/{repo}/branch/{branch}     create_branch (409 if it exists)

Pointing the client at it (`huggingface_hub` reads its settings ONCE, at import, into `huggingface_hub.constants`):

- In a subprocess (e.g. the CLI): pass `env={**os.environ, **server.client_env(hf_home)}`; it sets `HF_ENDPOINT`,
  `HF_HOME`, `HF_TOKEN`, `HF_HUB_DISABLE_XET=1` and `HF_HUB_OFFLINE=0` before the child imports the client.
- In-process: pass `endpoint=server.endpoint` to `HfApi`, `hf_hub_download` and `snapshot_download`, and
  `cache_dir=`; or call `server.configure_client(monkeypatch, hf_home)`, which sets the same environment AND patches
  the constants the client already read at import (`ENDPOINT`, `HUGGINGFACE_CO_URL_TEMPLATE`, `HF_HUB_OFFLINE`,
  `HF_HUB_DISABLE_XET`, `HF_HUB_CACHE`, `HF_TOKEN_PATH`), so code that relies on the defaults talks to this server.
- `HF_HUB_DISABLE_XET` matters: with `hf_xet` installed (a default dependency) and Xet enabled, uploads go through
  Xet storage, which this server does not offer. `huggingface_hub.utils._runtime.is_xet_available()` reads
  `constants.HF_HUB_DISABLE_XET`, so patching the constant is enough in-process. Downloads never use Xet here
  because the server never sends `X-Xet-Hash`.

Auth: with `token=None` every request is authorized. With `token="..."`: writes need `Authorization: Bearer <token>`
(else 401); a wrong token gets 401 "Invalid credentials in Authorization header"; private repos answer 404
RepoNotFound to anonymous callers and are left out of listings; `require_token_for_reads=True` answers 401 to every
anonymous request. The LFS upload href carries a one-time ticket instead (the client sends no auth with that PUT).

Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound), `X-Error-Message` and a JSON body
`{"error": ...}`, so the client raises its typed errors (RepositoryNotFoundError, RevisionNotFoundError,
RemoteEntryNotFoundError). An exception inside the server answers 500 and is kept in `server.errors`.

Test hooks: `create_repo()` and `commit()` seed repos without the client; `corrupt()` serves different bytes of the
same length under the advertised ETag (the client checks sizes, never hashes); `fail_after()` drops a connection
mid-body once (the client resumes with `Range` only past whole 10 MiB chunks: `constants.DOWNLOAD_CHUNK_SIZE`);
`fail_with()` answers an HTTP status (5xx) to every request, optionally quoting its headers (Authorization too) in the
error message as a misbehaving proxy does; `requests` logs method, path and headers (Authorization left out) of every request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".onnx", ".msgpack")
LFS_SIZE_THRESHOLD = 1 << 20  # larger files go to LFS whatever their name
MAX_BODY = 256 << 20  # refuse request bodies above this (413)
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
PLANTED_TOKEN = "hf_PLANTED_" + secrets.token_hex(16)  # fresh per run: tests check it shows up nowhere but in auth headers

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_REPO_ACTIONS = {"revision", "tree", "refs", "preupload", "commit", "branch"}  # what may follow a repo id in /api
_PLURAL = {"model": "models", "dataset": "datasets"}
_URL_PREFIX = {"model": "", "dataset": "datasets/"}


def _now() -> str:
    """The Hub's date format, which `huggingface_hub.utils.parse_datetime` expects."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a blob: what the Hub sends as the ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """One file's content. Git stores an LFS file as a pointer: its git oid is the pointer's, its ETag the sha256."""

    data: bytes
    lfs: bool
    oid: str
    sha256: str
    pointer_size: int

    @classmethod
    def of(cls, data: bytes, lfs: bool) -> "Blob":
        sha256 = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
        return cls(data, lfs, git_blob_sha1(pointer if lfs else data), sha256, len(pointer))

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    tree: dict[str, Blob]
    title: str
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)  # sha -> commit


@dataclass
class RecordedRequest:
    """One request as the server saw it. `headers` has lower-case names and never the Authorization header."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]
    authorized: bool  # a valid token was sent (always True when the server has no token)
    status: int | None = None


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drop_after: int | None = None  # send this many body bytes, then close the connection


class HubError(Exception):
    """An HTTP error answer, typed the way the Hub types it (`X-Error-Code`)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.response = _json(status, {"error": message}, headers)
        self.response.headers["X-Error-Message"] = message.encode("ascii", "replace").decode()  # headers are latin-1
        if code is not None:
            self.response.headers["X-Error-Code"] = code


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card, for the flat subset cards use.

    Handles `key: scalar`, `key: [a, b]` and block lists (`- item`, indented or not); quoted strings; true/false/null.
    Keys holding nested mappings (e.g. `model-index`) are left out: the server only needs flat keys such as
    `base_model`, `library_name`, `tags`, `pipeline_tag`, `license` and `base_model_relation`.
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        return {}
    nested = object()  # marks a key whose value is a mapping: dropped at the end
    meta: dict[str, Any] = {}
    key = None
    for line in lines[1:end]:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("- ") or stripped == "-":
            item = stripped[1:].strip()
            if key is None or not isinstance(meta[key], list):
                continue
            if item[:1] not in "'\"" and (": " in item or item.endswith(":")):
                meta[key] = nested  # a list of mappings
            else:
                meta[key].append(_scalar(item))
        elif line[0] == " ":
            if key is not None:
                meta[key] = nested  # an indented `k: v` under `key:`
        else:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            meta[key] = _scalar(value) if value else []  # empty: a block list (or mapping) follows
    return {k: v for k, v in meta.items() if v is not nested and v != []}


def _scalar(value: str) -> Any:
    if value.startswith("[") and value.endswith("]"):
        return [_scalar(v.strip()) for v in value[1:-1].split(",") if v.strip()]
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return {"true": True, "false": False, "null": None, "~": None}.get(value, value)


def card_tags(card: dict[str, Any], paths: set[str]) -> list[str]:
    """The tags the Hub derives for a model: card tags, library, pipeline, license and `base_model:*` tags.

    The relation in `base_model:<relation>:<id>` is `base_model_relation` when set, else `merge` for several base
    models, `adapter` for PEFT repos (library_name peft, an `adapter` tag or an adapter_config.json), else `finetune`.
    """
    tags = card.get("tags") or []
    tags = [str(t) for t in ([tags] if isinstance(tags, str) else tags)]
    library = card.get("library_name")
    tags += [str(v) for v in (library, card.get("pipeline_tag")) if v]
    if card.get("license"):
        tags.append(f"license:{card['license']}")
    bases = card.get("base_model") or []
    bases = [bases] if isinstance(bases, str) else [str(b) for b in bases]
    relation = card.get("base_model_relation") or (
        "merge"
        if len(bases) > 1
        else "adapter"
        if library == "peft" or "adapter" in tags or "adapter_config.json" in paths
        else "finetune"
    )
    for base in bases:
        tags += [f"base_model:{base}", f"base_model:{relation}:{base}"]
    return list(dict.fromkeys(tags))


class HubServer:
    """A Hub-compatible server on 127.0.0.1; `with HubServer(token="hf_x") as hub: HfApi(endpoint=hub.endpoint)`.

    Args:
        token (`str`, *optional*):
            The only valid token. `None`: no auth at all, every caller sees everything and may write.
        require_token_for_reads (`bool`, defaults to `False`):
            Answer 401 to anonymous reads too (the default only protects writes and private repos).
        user (`str`, defaults to `"tester"`):
            The token's user: `whoami` name and the namespace of `create_repo("name")` without a namespace.
    """

    def __init__(self, token: str | None = None, *, require_token_for_reads: bool = False, user: str = "tester"):
        self.token = token
        self.require_token_for_reads = require_token_for_reads
        self.user = user
        self.repos: dict[tuple[str, str], Repo] = {}  # (repo_type, repo_id) -> repo
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self.errors: list[str] = []  # tracebacks of requests that crashed the server (answered 500)
        self._requests: list[RecordedRequest] = []
        self._tickets: dict[str, tuple[str, int]] = {}  # LFS upload ticket -> (sha256, size)
        self._corrupted: dict[tuple[str, str, str, str], bytes] = {}  # (type, repo, commit, path) -> served bytes
        self._failures: dict[tuple[str, str, str], int] = {}  # (type, repo, path) -> bytes sent before the drop
        self._forced: tuple[int, str, bool] | None = None  # fail_with(): (status, path filter, echo headers)
        self._lock = threading.RLock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> "HubServer":
        """Listen on a free port of 127.0.0.1, serving from a daemon thread."""
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True, name="hub")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening. Idle keep-alive connections die with their daemon threads (or after `_Handler.timeout`)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """`http://127.0.0.1:<port>`, to pass as `endpoint=` or `HF_ENDPOINT`."""
        assert self._httpd is not None, "call start() first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def client_env(self, hf_home: str | Path, token: str | None = None) -> dict[str, str]:
        """Environment for a client started after this call (a subprocess): merge into `os.environ`.

        `token` defaults to the server's token; pass `""` for an anonymous client.
        """
        env = {
            "HF_ENDPOINT": self.endpoint,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        token = self.token if token is None else token
        if token:
            env["HF_TOKEN"] = token
        return env

    def configure_client(self, monkeypatch: Any, hf_home: str | Path, token: str | None = None) -> None:
        """Point the already-imported `huggingface_hub` at this server, with pytest's `monkeypatch`.

        Sets `client_env()` and patches the constants that the client computed from the environment at import.
        """
        from huggingface_hub import constants

        env = self.client_env(hf_home, token)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        if "HF_TOKEN" not in env:
            monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(hf_home) / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(Path(hf_home) / "token"))

    # -- test hooks ------------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def create_repo(self, repo_id: str, *, private: bool = False, repo_type: str = "model") -> str:
        """Create a repo with its initial commit (a `.gitattributes`, as on the Hub); return that commit's sha."""
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}")
            repo = Repo(repo_id, repo_type, private, _now())
            self.repos[(repo_type, repo_id)] = repo
            tree = {".gitattributes": Blob.of(GITATTRIBUTES, lfs=False)}
            return self._new_commit(repo, "main", None, tree, "initial commit", "")

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        delete: tuple[str, ...] = (),
        branch: str = "main",
        message: str = "seed",
        repo_type: str = "model",
    ) -> str:
        """Commit `files` (LFS by the preupload rule) and `delete` paths to `branch`, creating the repo if needed."""
        with self._lock:
            if (repo_type, repo_id) not in self.repos:
                self.create_repo(repo_id, repo_type=repo_type)
            repo = self.repos[(repo_type, repo_id)]
            head = repo.commits[repo.branches[branch]]
            tree = {p: b for p, b in head.tree.items() if p not in delete}
            tree.update({p: Blob.of(data, self._wants_lfs(p, len(data))) for p, data in files.items()})
            return self._new_commit(repo, branch, head.sha, tree, message, "")

    def corrupt(self, repo_id: str, path: str, rev: str = "main", repo_type: str = "model") -> None:
        """Serve `path` at `rev` with its first byte flipped: same length, same ETag, different sha256."""
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            commit = self._resolve(repo, rev)
            data = commit.tree[path].data
            self._corrupted[(repo_type, repo_id, commit.sha, path)] = bytes([data[0] ^ 0xFF]) + data[1:]

    def fail_with(self, status: int, *, path_contains: str = "", echo_headers: bool = False) -> None:
        """Answer `status` (e.g. 503) to every request whose path contains `path_contains`, as a failing Hub or a
        proxy in front of it would; `echo_headers`: the error message quotes the request's headers, Authorization
        included, as some proxies do. `fail_with(0)` stops."""
        with self._lock:
            self._forced = (status, path_contains, echo_headers) if status else None

    def fail_after(self, repo_id: str, path: str, n_bytes: int, repo_type: str = "model") -> None:
        """The next GET of `path` (any revision) sends `n_bytes` of its body, then drops the connection. Once."""
        with self._lock:
            self._failures[(repo_type, repo_id, path)] = n_bytes

    # -- state -----------------------------------------------------------------------------------------------

    @staticmethod
    def _wants_lfs(path: str, size: int) -> bool:
        return path.endswith(LFS_SUFFIXES) or size > LFS_SIZE_THRESHOLD

    def _new_commit(self, repo: Repo, branch: str, parent: str | None, tree: dict, title: str, message: str) -> str:
        """Store a commit and move `branch` to it. The sha hashes repo, parent, tree and message, like git's."""
        content = {"repo": repo.repo_id, "parent": parent, "tree": {p: b.oid for p, b in sorted(tree.items())}}
        sha = hashlib.sha1(json.dumps({**content, "title": title, "message": message}).encode()).hexdigest()
        repo.commits[sha] = Commit(sha, parent, dict(tree), title, message, _now())
        repo.branches[branch] = sha
        return sha

    def _repo(self, repo_type: str, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, rev: str) -> Commit:
        """A branch name or a full commit sha of this repo."""
        sha = repo.branches.get(rev, rev if rev in repo.commits else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    def _branch(self, repo: Repo, rev: str) -> str:
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev} (commits go to a branch)", "RevisionNotFound")
        return rev

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _record(self, method: str, path: str, headers: Any) -> RecordedRequest:
        kept = {k.lower(): v for k, v in headers.items() if k.lower() != "authorization"}
        record = RecordedRequest(method, path, kept, self._authorized(headers.get("Authorization")))
        with self._lock:
            self._requests.append(record)
        return record

    def _authorized(self, header: str | None) -> bool:
        return self.token is None or header == f"Bearer {self.token}"

    def _dispatch(self, method: str, raw_path: str, headers: Any, body: bytes) -> _Response:
        url = urlsplit(raw_path)
        query = parse_qs(url.query)
        segs = [unquote(s) for s in url.path.split("/")[1:]]  # revisions arrive quoted: "a%2Fb" is one segment
        auth_header = headers.get("Authorization")
        authorized = self._authorized(auth_header)
        if auth_header is not None and not authorized:
            raise HubError(401, "Invalid credentials in Authorization header")
        is_write = method in ("POST", "PUT", "DELETE") and segs != ["api", "validate-yaml"]
        if not authorized and segs[:1] != ["_lfs"] and (is_write or self.require_token_for_reads):
            raise HubError(401, "Unauthorized: this request needs a token")

        match segs:
            case ["api", "whoami-v2"] if method == "GET":
                return _json(200, {"type": "user", "name": self.user, "fullname": self.user, "orgs": []})
            case ["api", "models"] if method == "GET":
                return _json(200, self._list_models(query, authorized))
            case ["api", "repos", "create"] if method == "POST":
                return self._create_repo(json.loads(body))
            case ["api", "validate-yaml"] if method == "POST":
                return _json(200, {"errors": [], "warnings": []})
            case ["api", ("models" | "datasets") as plural, *rest] if rest:
                repo_type = plural[:-1]
                repo_id, action = self._split_repo_id(repo_type, rest)
                return self._repo_api(method, self._repo(repo_type, repo_id, authorized), action, query, body)
            case ["_lfs", ticket] if method == "PUT":
                return self._lfs_put(ticket, body)
            case [*prefix, repo_git, "info", "lfs", "objects", "batch"] if (
                method == "POST" and repo_git.endswith(".git")
            ):
                repo_type, repo_id = self._split_url_repo(prefix + [repo_git[: -len(".git")]])
                return self._lfs_batch(self._repo(repo_type, repo_id, authorized), json.loads(body))
            case _ if method in ("GET", "HEAD") and "resolve" in segs[1:4]:
                return self._resolve_file(segs, authorized, method, headers.get("Range"))
        raise HubError(404, f"No route for {method} {url.path}")

    def _split_repo_id(self, repo_type: str, parts: list[str]) -> tuple[str, list[str]]:
        """`ns/name/action...` or `name/action...`: a two-segment id unless segment 2 is an action of a 1-segment id."""
        if len(parts) >= 2 and ((repo_type, "/".join(parts[:2])) in self.repos or parts[1] not in _REPO_ACTIONS):
            return "/".join(parts[:2]), parts[2:]
        return parts[0], parts[1:]

    @staticmethod
    def _split_url_repo(segs: list[str]) -> tuple[str, str]:
        """`[datasets/]ns/name` of a web URL -> (repo_type, repo_id)."""
        if segs and segs[0] == "datasets":
            return "dataset", "/".join(segs[1:])
        return "model", "/".join(segs)

    def _repo_api(self, method: str, repo: Repo, action: list[str], query: dict, body: bytes) -> _Response:
        match action:
            case [] if method == "GET":
                return _json(200, self._info(repo, self._resolve(repo, "main"), blobs="blobs" in query))
            case ["revision", rev] if method == "GET":
                return _json(200, self._info(repo, self._resolve(repo, rev), blobs="blobs" in query))
            case ["tree", rev, *path] if method == "GET":
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return _json(200, self._tree(self._resolve(repo, rev), "/".join(path), recursive))
            case ["refs"] if method == "GET":
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()]
                return _json(200, {"branches": branches, "tags": [], "converts": [], "pullRequests": []})
            case ["preupload", rev] if method == "POST":
                return self._preupload(repo, self._resolve(repo, rev), json.loads(body))
            case ["commit", rev] if method == "POST":
                if "create_pr" in query:
                    raise HubError(400, "create_pr is not supported by the test server")
                return self._commit(repo, self._branch(repo, rev), body)
            case ["branch", branch] if method == "POST":
                if branch in repo.branches:
                    raise HubError(409, f"Branch already exists: {branch}")
                start = (json.loads(body) if body else {}).get("startingPoint") or "main"
                repo.branches[branch] = self._resolve(repo, start).sha
                return _json(200, {})
        raise HubError(404, f"No route for {method} {repo.repo_id} {'/'.join(action)}")

    # -- endpoints -------------------------------------------------------------------------------------------

    def _create_repo(self, payload: dict) -> _Response:
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        repo_type = payload.get("type") or "model"
        if repo_type not in _PLURAL:
            raise HubError(400, f"Unsupported repo type: {repo_type}")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.repos:  # the client reads `url` from this 409 too (exist_ok=True)
            return _json(409, {"error": f"You already created this {repo_type} repo", "url": url})
        self.create_repo(repo_id, private=private, repo_type=repo_type)
        return _json(200, {"url": url, "name": repo_id})

    def _info(self, repo: Repo, commit: Commit, blobs: bool = False, card_data: bool = True) -> dict[str, Any]:
        """What `/api/models/{repo}[/revision/{rev}]` answers; also one item of `/api/models`."""
        readme = commit.tree.get("README.md")
        card = parse_front_matter(readme.data.decode("utf-8", "replace")) if readme else {}
        siblings = []
        for path, blob in sorted(commit.tree.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(blob.data), blobId=blob.oid)
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": len(blob.data), "pointerSize": blob.pointer_size}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": card_tags(card, set(commit.tree)),
            "library_name": card.get("library_name"),
            "pipeline_tag": card.get("pipeline_tag"),
            "siblings": siblings,
        }
        if card and card_data:
            info["cardData"] = card
        return info

    def _list_models(self, query: dict[str, list[str]], authorized: bool) -> list[dict[str, Any]]:
        """`filter` values must all be tags; `search` is a substring of the id; `author` the namespace."""
        filters = query.get("filter", [])
        search = query.get("search", [""])[0].lower()
        author = query.get("author", [None])[0]
        library = query.get("library", [None])[0]
        pipeline = query.get("pipeline_tag", [None])[0]
        full = "full" in query
        items = []
        for (repo_type, repo_id), repo in sorted(self.repos.items()):
            if repo_type != "model" or (repo.private and not authorized):
                continue
            info = self._info(repo, self._resolve(repo, "main"), card_data="cardData" in query or full)
            if not full:
                info.pop("siblings")
            if (
                all(f in info["tags"] for f in filters)
                and search in repo_id.lower()
                and author in (None, info["author"])
                and library in (None, info["library_name"])
                and pipeline in (None, info["pipeline_tag"])
            ):
                items.append(info)
        sort = query.get("sort", [None])[0]
        if sort in ("lastModified", "createdAt"):
            items.sort(key=lambda i: i[sort], reverse=True)
        limit = int(query.get("limit", [len(items)])[0])
        return items[:limit]

    def _tree(self, commit: Commit, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        """Files (and folders) under `prefix`, one level deep unless `recursive`."""
        prefix = prefix.strip("/")
        under = {p: b for p, b in commit.tree.items() if not prefix or p.startswith(prefix + "/")}
        if prefix and not under:
            raise HubError(404, f"Folder not found: {prefix}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        entries: dict[str, dict[str, Any]] = {}
        for path, blob in under.items():
            parts = path.split("/")
            depth = len(prefix.split("/")) if prefix else 0
            for i in range(depth + 1, len(parts) if recursive else min(len(parts), depth + 2)):
                folder = "/".join(parts[:i])
                content = "".join(f"{p} {b.oid}\n" for p, b in sorted(under.items()) if p.startswith(folder + "/"))
                oid = hashlib.sha1(content.encode()).hexdigest()
                entries[folder] = {"type": "directory", "oid": oid, "size": 0, "path": folder}
            if recursive or len(parts) == depth + 1:
                entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": blob.pointer_size}
                entries[path] = entry
        return [entries[p] for p in sorted(entries)]

    def _resolve_file(self, segs: list[str], authorized: bool, method: str, wanted: str | None) -> _Response:
        """HEAD/GET `/[datasets/]{repo}/resolve/{rev}/{path}`: the bytes, with the headers the client checks."""
        at = segs.index("resolve")
        repo_type, repo_id = self._split_url_repo(segs[:at])
        repo = self._repo(repo_type, repo_id, authorized)
        if len(segs) < at + 3:
            raise HubError(400, "Expected /resolve/{revision}/{path}")
        commit = self._resolve(repo, segs[at + 1])
        path = "/".join(segs[at + 2 :])
        headers = {"X-Repo-Commit": commit.sha}
        blob = commit.tree.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        data = self._corrupted.get((repo_type, repo_id, commit.sha, path), blob.data)
        headers.update({"ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
        status, start = 200, 0
        if wanted is not None:
            status, start, data = 206, *self._slice(data, wanted)
            headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{len(blob.data)}"
        drop_after = self._failures.pop((repo_type, repo_id, path), None) if method == "GET" else None
        return _Response(status, data, headers, drop_after)

    @staticmethod
    def _slice(data: bytes, wanted: str) -> tuple[int, bytes]:
        """`bytes=a-b`, `bytes=a-` or `bytes=-n` of `data` -> (start, slice); 416 when it is outside."""
        match = _RANGE.fullmatch(wanted.strip())
        if match is None or match.groups() == ("", ""):
            raise HubError(416, f"Unsupported range: {wanted}", headers={"Content-Range": f"bytes */{len(data)}"})
        first, last = match.groups()
        start = int(first) if first else max(len(data) - int(last), 0)
        end = min(int(last), len(data) - 1) if first and last else len(data) - 1
        if start >= len(data) or start > end:
            raise HubError(416, f"Range outside the file: {wanted}", headers={"Content-Range": f"bytes */{len(data)}"})
        return start, data[start : end + 1]

    def _preupload(self, repo: Repo, commit: Commit, payload: dict) -> _Response:
        """Upload mode per file; `oid` of the file already there lets the client skip unchanged files."""
        files = []
        for f in payload["files"]:
            existing = commit.tree.get(f["path"])
            files.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if self._wants_lfs(f["path"], f["size"]) else "regular",
                    "shouldIgnore": False,
                    "oid": existing.etag if existing else None,
                }
            )
        return _json(200, {"files": files, "commitOid": commit.sha})

    def _lfs_batch(self, repo: Repo, payload: dict) -> _Response:
        """git-lfs batch API, upload only: an href with a one-time ticket per object not stored yet."""
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the LFS upload operation is supported")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            answer: dict[str, Any] = {"oid": oid, "size": size}
            if oid not in self.lfs_objects:
                ticket = secrets.token_urlsafe(16)
                self._tickets[ticket] = (oid, size)
                answer["actions"] = {"upload": {"href": f"{self.endpoint}/_lfs/{ticket}"}}
            objects.append(answer)
        body = json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode()
        return _Response(200, body, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, ticket: str, body: bytes) -> _Response:
        if ticket not in self._tickets:
            raise HubError(403, "Unknown or expired upload ticket")
        oid, size = self._tickets[ticket]
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} and size {size}")
        self.lfs_objects[oid] = body
        return _Response(200)

    def _commit(self, repo: Repo, branch: str, body: bytes) -> _Response:
        """The ndjson commit: a header line, then file / lfsFile / deletedFile / deletedFolder lines."""
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first ndjson line must be the header")
        header = lines[0]["value"]
        head = repo.commits[repo.branches[branch]]
        if header.get("parentCommit") not in (None, head.sha):
            raise HubError(412, f"A commit has happened since {header['parentCommit']}. Please refresh and try again.")
        tree = dict(head.tree)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if path.startswith("/") or ".." in path.split("/"):
                raise HubError(400, f"Invalid path: {path}")
            if key == "file":
                tree[path] = Blob.of(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.lfs_objects.get(value["oid"])
                if data is None:
                    raise HubError(400, f"LFS object {value['oid']} for {path} was never uploaded")
                tree[path] = Blob.of(data, lfs=True)
            elif key in ("deletedFile", "deletedFolder"):
                folder = path.rstrip("/") + "/"
                gone = [p for p in tree if (p == path if key == "deletedFile" else p.startswith(folder))]
                if not gone:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del tree[p]
            else:
                raise HubError(400, f"Unsupported commit operation: {key}")
        sha = self._new_commit(repo, branch, head.sha, tree, header.get("summary", ""), header.get("description", ""))
        url = f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{sha}"
        return _json(200, {"commitUrl": url, "commitOid": sha, "pullRequestUrl": None})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    timeout = 30  # an idle keep-alive connection is closed after this
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _handle(self) -> None:
        hub = self.server.hub
        record = hub._record(self.command, self.path, self.headers)
        try:
            body = self._read_body()
            with hub._lock:
                forced = hub._forced
                if forced is not None and forced[1] in self.path:
                    status, _, echo = forced
                    echoed = "; request headers: " + "; ".join(f"{k}: {v}" for k, v in self.headers.items()) if echo else ""
                    raise HubError(status, f"Service unavailable{echoed}")
                response = hub._dispatch(self.command, self.path, self.headers, body)
        except HubError as e:
            response = e.response
        except Exception:
            hub.errors.append(traceback.format_exc())
            response = HubError(500, "Internal error in the test hub server").response
        record.status = response.status
        self._write(response)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    def _read_body(self) -> bytes:
        """Content-Length or chunked bodies, at most MAX_BODY bytes."""
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.close_connection = True
                raise HubError(413, f"Body over {MAX_BODY} bytes")
            return self.rfile.read(length)
        chunks, total = [], 0
        while True:
            size = int(self.rfile.readline(1024).split(b";")[0] or b"0", 16)
            total += size
            if total > MAX_BODY:
                self.close_connection = True
                raise HubError(413, f"Body over {MAX_BODY} bytes")
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)  # the CRLF after each chunk

    def _write(self, response: _Response) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            if response.drop_after is None:
                self.wfile.write(response.body)
            else:  # the client sees a short body: httpx raises RemoteProtocolError
                self.wfile.write(response.body[: response.drop_after])
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
