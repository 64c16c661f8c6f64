"""A local, dependency-free stand-in for the Hugging Face Hub, for tests.

Only the standard library is used on the server side (``http.server`` + ``threading``). The server binds
``127.0.0.1`` on an ephemeral port and answers the routes ``huggingface_hub`` (checked against 2.4) calls for:

Downloads
    * ``GET  /api/{models,datasets,spaces}/{repo_id}[/revision/{rev}]`` -> ``model_info`` / ``repo_info`` JSON
      (``id``, ``sha``, ``siblings``; sizes/blob ids/LFS info always included). ``resolve_revision`` uses it too.
    * ``GET  /api/{type}s/{repo_id}/tree/{rev}[/{path}]?recursive=...`` -> ``list_repo_tree`` (``snapshot_download``).
    * ``HEAD|GET /[{datasets,spaces}/]{repo_id}/resolve/{rev}/{filename}`` -> file metadata / bytes
      (``hf_hub_download``), with ``X-Repo-Commit``, ``ETag`` (git blob sha1, or sha256 for LFS files, plus
      ``X-Linked-Etag``/``X-Linked-Size``), ``Content-Length``, ``Accept-Ranges`` and ``Range`` support.
    * Errors carry the ``X-Error-Code`` header ``huggingface_hub.utils.hf_raise_for_status`` maps to typed
      exceptions: ``RepoNotFound`` (-> ``RepositoryNotFoundError``), ``RevisionNotFound``, ``EntryNotFound``.

Uploads (what ``create_repo`` + ``upload_folder`` / ``create_commit`` / ``push_to_hub`` call; like the Hub, they
need an ``Authorization`` header -- any token -- or get a 401, unless ``LocalHub(require_token_for_writes=False)``)
    * ``POST /api/repos/create`` (409 if the repo exists; ``exist_ok=True`` handles that client side).
    * ``POST /api/validate-yaml`` (README.md metadata check made by ``create_commit``).
    * ``POST /api/{type}s/{repo_id}/preupload/{rev}`` -> files matching the Hub's default ``.gitattributes`` LFS
      patterns (:data:`LFS_SUFFIXES`: weights, ``.parquet``, ``.arrow``, ...) are uploaded "lfs", all others
      "regular" (inline base64 in the commit call). ``datasets``' ``push_to_hub`` relies on this: it deletes each
      parquet shard's temporary file right after ``preupload_lfs_files``.
    * LFS (basic transfer; the clients are pointed away from Xet, which the stub does not speak, with
      ``HF_HUB_DISABLE_XET``): ``POST /[{datasets,spaces}/]{repo_id}.git/info/lfs/objects/batch`` answers upload
      and verify actions for objects not stored yet, ``PUT /lfs-objects/{sha256}`` stores the bytes (their sha256
      must match), ``POST /lfs-verify/{sha256}`` checks them; commits then name them by ``lfsFile`` operations.
    * ``POST /api/{type}s/{repo_id}/commit/{rev}`` (ndjson) -> applied to the in-memory repo and recorded in
      :attr:`LocalHub.commits` (repo id, revision, files with sizes, deletions), so a test can push and pull back.

Every request is logged in :attr:`LocalHub.requests`; requests no route matched also go to
:attr:`LocalHub.unhandled` (a test can assert it is empty to catch client changes).

Pointing the client at the stub
    ``huggingface_hub`` reads ``HF_ENDPOINT``/``HF_HOME``/``HF_HUB_OFFLINE``... into module constants at import
    time, and both it and diffusers copy some of them into other modules (``from ..constants import ENDPOINT``,
    ``from huggingface_hub.constants import HF_HUB_OFFLINE``, diffusers' ``HUGGINGFACE_CO_RESOLVE_ENDPOINT``) or
    into objects (the module-level ``huggingface_hub.hf_api.api = HfApi()`` behind ``model_info``,
    ``create_repo``, ``upload_folder``... keeps the endpoint it saw at import). :class:`HubClientPatch` therefore
    sets the environment variables *and* rewrites every such copy it finds in the loaded ``huggingface_hub`` /
    ``diffusers`` / ``transformers`` / ``flowmo_diffusers`` modules, closes the shared HTTP session (so the
    ``NO_PROXY`` it adds for 127.0.0.1 is honoured), and undoes all of it on exit, including copies made by
    modules first imported while the patch was active. For a fresh process, :meth:`LocalHub.client_env`
    returns the equivalent environment (no in-process patching needed there).

Typical use (see ``tests/utils/test_hub.py``)::

    from hub_stub import local_hub  # pytest fixture: LocalHub + patched client in tmp_path

    def test_x(local_hub, tmp_path):
        local_hub.add_repo("user/tiny", saved_folder)
        pipe = MyPipeline.from_pretrained("user/tiny")
        assert "/user/tiny/resolve/main/model_index.json" in local_hub.request_paths("GET")
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import re
import sys
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "HubCommit",
    "HubClientPatch",
    "HubRequest",
    "LocalHub",
    "hub_client",
    "local_hub",
    "running_hub",
]

# Files the real Hub stores with git LFS by default (see the .gitattributes it creates for new repos).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npz", ".pb",
                ".parquet", ".arrow")
DEFAULT_GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
_TYPE_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}
_TIMESTAMP = "2025-01-01T00:00:00.000Z"


# --------------------------------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class HubRequest:
    """One request the stub answered."""

    method: str
    path: str  # URL path as sent (percent-encoded), without the query string
    query: str
    status: int
    authorized: bool  # whether an ``Authorization`` header was sent (the token itself is never stored)


@dataclass(frozen=True)
class HubCommit:
    """One commit received through ``POST /api/{type}s/{repo_id}/commit/{rev}``."""

    repo_id: str
    repo_type: str
    revision: str
    sha: str
    message: str
    files: dict[str, int]  # path in repo -> size in bytes, for every added/updated file
    deleted: tuple[str, ...]


@dataclass
class _Commit:
    sha: str
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class _Repo:
    repo_id: str
    repo_type: str
    refs: dict[str, str] = field(default_factory=dict)  # branch / ref name -> commit sha
    commits: dict[str, _Commit] = field(default_factory=dict)
    n_prs: int = 0


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def _etag(path: str, data: bytes) -> str:
    # The Hub's ETag is the git blob sha1 for regular files and the sha256 of the content for LFS files.
    return hashlib.sha256(data).hexdigest() if _is_lfs(path) else _git_blob_sha1(data)


def _commit_sha(files: Mapping[str, bytes], parent: str | None, message: str) -> str:
    h = hashlib.sha1()
    h.update(f"parent {parent}\nmessage {message}\n".encode())
    for path in sorted(files):
        h.update(f"{path}\0{_git_blob_sha1(files[path])}\n".encode())
    return h.hexdigest()


def _read_folder(folder: str | os.PathLike) -> dict[str, bytes]:
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and ".cache" not in p.relative_to(root).parts[:1]:
            files[p.relative_to(root).as_posix()] = p.read_bytes()
    return files


class _HttpError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None,
                 body: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, dict(headers or {})
        self.body = dict(body or {})  # extra JSON fields next to "error"


# --------------------------------------------------------------------------------------------------- the server

_API_RE = re.compile(
    r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+(?:/[^/]+)?)"
    r"(?:/(?P<action>revision|tree|preupload|commit)/(?P<rev>[^/]+)(?P<rest>/.*)?)?/?$"
)
_LFS_BATCH_RE = re.compile(r"^/(?:(?P<prefix>datasets|spaces)/)?(?P<repo>[^/]+(?:/[^/]+)?)\.git/info/lfs/objects/batch$")
_LFS_OBJECT_RE = re.compile(r"^/lfs-(?P<action>objects|verify)/(?P<oid>[0-9a-f]{64})$")
_RESOLVE_RE = re.compile(
    r"^/(?:(?P<prefix>datasets|spaces)/)?(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$"
)


class LocalHub:
    """In-memory Hub served over HTTP on ``127.0.0.1:<ephemeral port>``; a context manager (start/stop).

    Repos are snapshots held in memory (``add_repo`` reads the folder once), so later edits of the source
    folder do not leak into the served content.
    """

    def __init__(self, default_namespace: str = "user", require_token_for_writes: bool = True):
        self.default_namespace = default_namespace  # used by create_repo for a repo id without namespace
        # Like the real Hub, reject create/preupload/commit calls sent without an Authorization header (401).
        self.require_token_for_writes = require_token_for_writes
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._requests: list[HubRequest] = []
        self._unhandled: list[HubRequest] = []
        self._commits: list[HubCommit] = []
        self._lfs_objects: dict[str, bytes] = {}  # sha256 -> content uploaded through the LFS routes
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.client: HubClientPatch | None = None  # set by `running_hub` / the `local_hub` fixture

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
        server.hub = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"LocalHub:{server.server_address[1]}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()  # stops serve_forever
        server.server_close()  # closes the listening socket and joins the request threads
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LocalHub is not running")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The endpoint to use as ``HF_ENDPOINT``, e.g. ``http://127.0.0.1:43123``."""
        return f"http://127.0.0.1:{self.port}"

    endpoint = url

    # -- content -----------------------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        folder: str | os.PathLike | None = None,
        *,
        files: Mapping[str, bytes | str] | None = None,
        revision: str = "main",
        repo_type: str = "model",
        message: str = "Upload folder",
    ) -> str:
        """Serve ``folder`` (and/or ``files``: path in repo -> content) as branch ``revision`` of ``repo_id``.

        Creates the repo if needed; otherwise adds a commit replacing the branch content. Returns the commit sha.
        """
        content: dict[str, bytes] = _read_folder(folder) if folder is not None else {}
        for path, data in (files or {}).items():
            content[path] = data.encode() if isinstance(data, str) else bytes(data)
        with self._lock:
            repo = self._repos.setdefault((repo_type, repo_id), _Repo(repo_id, repo_type))
            return self._commit(repo, revision, content, message)

    def remove_repo(self, repo_id: str, repo_type: str = "model") -> None:
        with self._lock:
            self._repos.pop((repo_type, repo_id), None)

    def has_repo(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def commit_sha(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            return self._resolve(self._get_repo(repo_type, repo_id), revision).sha

    def repo_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Current content of ``repo_id`` at ``revision`` (path -> bytes)."""
        with self._lock:
            return dict(self._resolve(self._get_repo(repo_type, repo_id), revision).files)

    # -- request log -------------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[HubRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def unhandled(self) -> list[HubRequest]:
        with self._lock:
            return list(self._unhandled)

    @property
    def commits(self) -> list[HubCommit]:
        with self._lock:
            return list(self._commits)

    def request_paths(self, method: str | None = None) -> list[str]:
        """Unquoted paths of the logged requests (optionally only ``method``), e.g. ``/user/tiny/resolve/...``."""
        return [urllib.parse.unquote(r.path) for r in self.requests if method is None or r.method == method]

    def downloaded_files(self, repo_id: str) -> set[str]:
        """Repo files whose content was fetched (``GET .../resolve/...``) from ``repo_id``."""
        prefix = f"/{repo_id}/resolve/"
        out = set()
        for p in self.request_paths("GET"):
            if p.startswith(prefix):
                out.add(p[len(prefix):].split("/", 1)[1])
        return out

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()
            self._unhandled.clear()

    # -- client configuration ----------------------------------------------------------------------------------

    def client_env(self, home: str | os.PathLike, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for running a Hub client in a *fresh* process against this stub (see ``hub_client``)."""
        env = dict(os.environ if base is None else base)
        for key, value in _client_env_changes(self.url, Path(home)).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def patch_client(self, home: str | os.PathLike) -> HubClientPatch:
        """In-process client patch pointing at this stub (a context manager), see :class:`HubClientPatch`."""
        return HubClientPatch(self.url, home)

    def offline(self, enabled: bool = True):
        """Shortcut for ``self.client.offline(enabled)`` (needs a client patched via ``running_hub``)."""
        if self.client is None:
            raise RuntimeError("no client patch active; use running_hub()/local_hub or hub_client()")
        return self.client.offline(enabled)

    # -- internals (called with the lock held) -----------------------------------------------------------------

    def _commit(self, repo: _Repo, revision: str, files: dict[str, bytes], message: str) -> str:
        parent = repo.refs.get(revision)
        sha = _commit_sha(files, parent, message)
        repo.commits[sha] = _Commit(sha, files, message, parent)
        repo.refs[revision] = sha
        return sha

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HttpError(404, "RepoNotFound", "Repository not found")
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> _Commit:
        sha = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if sha is None:
            raise _HttpError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo.commits[sha]

    def _log(self, request: HubRequest, handled: bool) -> None:
        with self._lock:
            self._requests.append(request)
            if not handled:
                self._unhandled.append(request)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # request threads are tracked ...
    block_on_close = True  # ... and joined by server_close(), so nothing outlives LocalHub.stop()
    allow_reuse_address = False
    hub: LocalHub


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 10  # a client that connects and sends nothing cannot pin a request thread forever
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # silence the default stderr access log
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        split = urllib.parse.urlsplit(self.path)
        self._status = 500
        handled = True
        try:
            handler = self._route(method, split.path)
            if handler is None:
                handled = False
                raise _HttpError(404, None, f"LocalHub: no route for {method} {split.path}")
            # LFS object uploads go to storage URLs the batch call handed out, which need no Authorization.
            if (method == "POST" and split.path != "/api/validate-yaml" and hub.require_token_for_writes
                    and not split.path.startswith("/lfs-") and not self._authorized()):
                raise _HttpError(401, None, "Invalid username or password.")
            handler(split, urllib.parse.parse_qs(split.query))
        except _HttpError as e:
            self._send_json({"error": e.message, **e.body}, status=e.status, headers={
                **({"X-Error-Code": e.code} if e.code else {}), "X-Error-Message": e.message, **e.headers})
        except Exception as e:  # a bug in the stub: report it as a 500 the client will surface
            self._send_json({"error": f"LocalHub internal error: {e!r}"}, status=500)
        finally:
            hub._log(HubRequest(method, split.path, split.query, self._status, self._authorized()), handled)

    def _authorized(self) -> bool:
        return any(key.lower() == "authorization" for key in self.headers.keys())

    def _route(self, method: str, path: str):
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml
        m = _LFS_BATCH_RE.match(path)
        if m and method == "POST":
            return lambda s, q: self._lfs_batch(m)
        m = _LFS_OBJECT_RE.match(path)
        if m and (method, m["action"]) in (("PUT", "objects"), ("POST", "verify")):
            return lambda s, q: self._lfs_object(m)
        m = _API_RE.match(path)
        if m:
            action = m["action"]
            if method == "GET" and action in (None, "revision"):
                return lambda s, q: self._repo_info(m, q)
            if method == "GET" and action == "tree":
                return lambda s, q: self._tree(m, q)
            if method == "POST" and action == "preupload":
                return lambda s, q: self._preupload(m, q)
            if method == "POST" and action == "commit":
                return lambda s, q: self._commit(m, q)
            return None
        m = _RESOLVE_RE.match(path)
        if m and method in ("GET", "HEAD"):
            return lambda s, q: self._resolve_file(m, method)
        return None

    def _send(self, status: int, body: bytes, headers: Mapping[str, str], content_length: int | None = None) -> None:
        self._status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.send_header("Connection", "close")  # one request per connection: no idle keep-alive threads
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.close_connection = True

    def _send_json(self, obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self._send(status, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    # -- download routes ---------------------------------------------------------------------------------------

    def _repo_info(self, m: re.Match, query: Mapping[str, list[str]]) -> None:
        hub = self.server.hub
        repo_type, repo_id = _API_TYPE[m["type"]], m["repo"]
        revision = urllib.parse.unquote(m["rev"]) if m["rev"] else "main"
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            commit = hub._resolve(repo, revision)
        siblings = []
        for path, data in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path, "size": len(data), "blobId": _git_blob_sha1(data)}
            if _is_lfs(path):
                sibling["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(sibling)
        self._send_json({
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None, "sha": commit.sha,
            "lastModified": _TIMESTAMP, "createdAt": _TIMESTAMP, "private": False, "gated": False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
        })

    def _tree(self, m: re.Match, query: Mapping[str, list[str]]) -> None:
        hub = self.server.hub
        repo_type, repo_id = _API_TYPE[m["type"]], m["repo"]
        revision = urllib.parse.unquote(m["rev"])
        base = "/".join(urllib.parse.unquote(s) for s in (m["rest"] or "").split("/") if s)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        with hub._lock:
            commit = hub._resolve(hub._get_repo(repo_type, repo_id), revision)
        files = {p: d for p, d in commit.files.items() if not base or p.startswith(base + "/")}
        if base and not files:
            raise _HttpError(404, "EntryNotFound", f"{base} does not exist on \"{revision}\"",
                             {"X-Repo-Commit": commit.sha})
        entries: dict[str, dict[str, Any]] = {}
        for path, data in sorted(files.items()):
            rel = path[len(base) + 1:] if base else path
            parts = rel.split("/")
            # folders between `base` and the file
            for i in range(1, len(parts)):
                if not recursive and i > 1:
                    break
                folder = "/".join(([base] if base else []) + parts[:i])
                entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                            "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entry: dict[str, Any] = {"type": "file", "oid": _git_blob_sha1(data), "size": len(data), "path": path}
                if _is_lfs(path):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries[path] = entry
        self._send_json(list(entries.values()))

    def _resolve_file(self, m: re.Match, method: str) -> None:
        hub = self.server.hub
        repo_type = {"datasets": "dataset", "spaces": "space", None: "model"}[m["prefix"]]
        revision = urllib.parse.unquote(m["rev"])
        filename = "/".join(urllib.parse.unquote(s) for s in m["file"].split("/"))
        with hub._lock:
            commit = hub._resolve(hub._get_repo(repo_type, m["repo"]), revision)
        data = commit.files.get(filename)
        if data is None:
            raise _HttpError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.sha})
        etag = _etag(filename, data)
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
        }
        if _is_lfs(filename):
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        start, end, status = 0, len(data) - 1, 200
        rng = self.headers.get("Range")
        if method == "GET" and rng:
            mr = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if mr is None or (not mr[1] and not mr[2]):
                raise _HttpError(416, None, f"Invalid range {rng}")
            if mr[1]:
                start, end = int(mr[1]), min(int(mr[2]) if mr[2] else len(data) - 1, len(data) - 1)
            else:  # suffix range "bytes=-N"
                start, end = max(len(data) - int(mr[2]), 0), len(data) - 1
            if start >= len(data) and len(data) > 0:
                raise _HttpError(416, None, f"Range {rng} not satisfiable",
                                 {"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(status, data[start:end + 1], headers)

    # -- upload routes -----------------------------------------------------------------------------------------

    def _create_repo(self, split: urllib.parse.SplitResult, query: Mapping[str, list[str]]) -> None:
        hub = self.server.hub
        payload = json.loads(self._read_body() or b"{}")
        repo_type = payload.get("type") or "model"
        if repo_type not in _TYPE_PREFIX:
            raise _HttpError(400, None, f"Unsupported repo type {repo_type!r}")
        repo_id = f"{payload.get('organization') or hub.default_namespace}/{payload['name']}"
        url = f"{self._base()}/{_TYPE_PREFIX[repo_type]}{repo_id}"
        with hub._lock:
            if (repo_type, repo_id) in hub._repos:
                # Like the Hub, the 409 body carries the url: huggingface_hub 1.3's create_repo(exist_ok=True) reads it.
                raise _HttpError(409, None, "You already created this repo", {"X-Error-Url": url}, body={"url": url})
            repo = hub._repos[(repo_type, repo_id)] = _Repo(repo_id, repo_type)
            hub._commit(repo, "main", {".gitattributes": DEFAULT_GITATTRIBUTES.encode()}, "initial commit")
        self._send_json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _validate_yaml(self, split: urllib.parse.SplitResult, query: Mapping[str, list[str]]) -> None:
        self._read_body()
        self._send_json({"errors": [], "warnings": []})

    def _preupload(self, m: re.Match, query: Mapping[str, list[str]]) -> None:
        hub = self.server.hub
        repo_type, repo_id = _API_TYPE[m["type"]], m["repo"]
        payload = json.loads(self._read_body() or b"{}")
        with hub._lock:
            hub._get_repo(repo_type, repo_id)
        # "regular" => the content travels base64-encoded inside the commit call; "lfs" => through the LFS routes.
        files = [{"path": f["path"], "uploadMode": "lfs" if _is_lfs(f["path"]) else "regular", "shouldIgnore": False,
                  "oid": None} for f in payload.get("files", [])]
        self._send_json({"files": files})

    def _lfs_batch(self, m: re.Match) -> None:
        hub = self.server.hub
        repo_type = _API_TYPE[m["prefix"]] if m["prefix"] else "model"
        payload = json.loads(self._read_body() or b"{}")
        with hub._lock:
            hub._get_repo(repo_type, m["repo"])
            stored = set(hub._lfs_objects)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise _HttpError(400, None, "LocalHub's LFS batch endpoint only takes basic uploads")
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in stored:  # no "actions": the client skips objects already stored
                entry["actions"] = {"upload": {"href": f"{self._base()}/lfs-objects/{obj['oid']}"},
                                    "verify": {"href": f"{self._base()}/lfs-verify/{obj['oid']}"}}
            objects.append(entry)
        self._send_json({"transfer": "basic", "objects": objects})

    def _lfs_object(self, m: re.Match) -> None:
        hub = self.server.hub
        oid = m["oid"]
        if m["action"] == "objects":
            data = self._read_body()
            if hashlib.sha256(data).hexdigest() != oid:
                raise _HttpError(400, None, f"LFS object {oid}: the uploaded bytes have another sha256")
            with hub._lock:
                hub._lfs_objects[oid] = data
            self._send(200, b"", {})
            return
        claimed = json.loads(self._read_body() or b"{}")
        with hub._lock:
            data = hub._lfs_objects.get(oid)
        if data is None or claimed.get("size") != len(data):
            raise _HttpError(404, None, f"LFS object {oid} is not stored (or has another size)")
        self._send_json({"success": True})

    def _commit(self, m: re.Match, query: Mapping[str, list[str]]) -> None:
        hub = self.server.hub
        repo_type, repo_id = _API_TYPE[m["type"]], m["repo"]
        revision = urllib.parse.unquote(m["rev"])
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        header = next((item["value"] for item in lines if item.get("key") == "header"), {})
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for item in lines:
            key, value = item.get("key"), item.get("value", {})
            if key == "file":
                added[value["path"]] = (base64.b64decode(value["content"]) if value.get("encoding") == "base64"
                                        else value["content"].encode())
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            elif key == "lfsFile":
                with hub._lock:
                    data = hub._lfs_objects.get(value["oid"])
                if data is None or value.get("algo", "sha256") != "sha256":
                    raise _HttpError(400, None, f"{value['path']}: LFS object {value['oid']} was never uploaded")
                added[value["path"]] = data
            elif key != "header":
                raise _HttpError(400, None, f"Unknown commit operation {key!r}")
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            pr_url = None
            if query.get("create_pr", ["0"])[0] in ("1", "true", "True"):
                repo.n_prs += 1
                target = f"refs/pr/{repo.n_prs}"
                pr_url = f"{self._base()}/{_TYPE_PREFIX[repo_type]}{repo_id}/discussions/{repo.n_prs}"
                base_commit = hub._resolve(repo, revision)
            else:
                target = revision
                base_commit = hub._resolve(repo, revision) if repo.refs else None
            if header.get("parentCommit") and base_commit is not None and header["parentCommit"] != base_commit.sha:
                raise _HttpError(412, None, "parentCommit is not the head of the branch")
            files = dict(base_commit.files) if base_commit is not None else {}
            for path in deleted:
                if path.endswith("/"):
                    files = {p: d for p, d in files.items() if not p.startswith(path)}
                else:
                    files.pop(path, None)
                    files = {p: d for p, d in files.items() if not p.startswith(path + "/")}
            files.update(added)
            message = header.get("summary") or "Commit"
            if target != revision:  # the PR branch starts at the head of `revision`
                repo.refs[target] = base_commit.sha
            sha = hub._commit(repo, target, files, message)
            hub._commits.append(HubCommit(repo_id, repo_type, target, sha, message,
                                          {p: len(d) for p, d in added.items()}, tuple(deleted)))
        self._send_json({
            "success": True, "commitOid": sha, "hookOutput": "", "pullRequestUrl": pr_url,
            "commitUrl": f"{self._base()}/{_TYPE_PREFIX[repo_type]}{repo_id}/commit/{sha}",
        })


# --------------------------------------------------------------------------------------------------- client patch

# Loaded modules whose copies of Hub settings get rewritten (prefix match on the module name).
_PATCHED_MODULE_PREFIXES = ("huggingface_hub", "diffusers", "transformers", "flowmo_diffusers", "accelerate",
                            "datasets", "evaluate", "peft")
# Env vars that would leak the developer's identity / settings into the tests.
_UNSET_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN", "HUGGINGFACE_HUB_CACHE",
              "HUGGINGFACE_ASSETS_CACHE", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT", "_HF_DEFAULT_STAGING",
              "HUGGINGFACE_CO_STAGING", "HF_HUB_DISABLE_IMPLICIT_TOKEN")


def _client_env_changes(endpoint: str, home: Path) -> dict[str, str | None]:
    home = home.resolve()
    no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "",
                                    "127.0.0.1,localhost") if x)
    changes: dict[str, str | None] = {key: None for key in _UNSET_ENV}
    changes.update({
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_MODULES_CACHE": str(home / "modules"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_XET": "1",  # the stub speaks LFS, not Xet
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    })
    return changes


class HubClientPatch:
    """Point ``huggingface_hub`` (and diffusers' copies of its settings) at ``endpoint``, in this process.

    On ``__enter__``:
      * env: ``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE``/... under ``home``, ``HF_HUB_DISABLE_TELEMETRY=1``,
        ``NO_PROXY`` += 127.0.0.1; ``HF_HUB_OFFLINE``, ``HF_TOKEN`` & co removed;
      * ``huggingface_hub.constants`` (``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, cache/token paths,
        ``HF_HUB_OFFLINE=False``, ``HF_HUB_DISABLE_TELEMETRY=True``, ``HF_URL_HOSTS``) and every copy of these
        names in loaded ``huggingface_hub``/``diffusers``/``transformers``/... modules (matched by name *and*
        value, so unrelated attributes are left alone), incl. diffusers' ``HUGGINGFACE_CO_RESOLVE_ENDPOINT``
        and ``HF_MODULES_CACHE``;
      * the endpoint of the import-time ``huggingface_hub.hf_api.api`` instance, and the shared HTTP session is
        closed so the next one is built with the new ``NO_PROXY``.
    ``__exit__`` restores all of it (and closes the session again so no connection to the stub survives).
    No token is configured: ``HF_TOKEN_PATH`` points to a file that does not exist.
    """

    _STR_NAMES = ("ENDPOINT", "HUGGINGFACE_CO_RESOLVE_ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HOME",
                  "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE",
                  "HF_XET_CACHE", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH", "HF_MODULES_CACHE",
                  "default_cache_path", "default_assets_cache_path", "default_xet_cache_path")
    _BOOL_NAMES = ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")

    def __init__(self, endpoint: str, home: str | os.PathLike):
        self.endpoint = endpoint.rstrip("/")
        self.home = Path(home).resolve()
        self.cache_dir = self.home / "hub"
        self._undo: list[tuple[Any, str, Any]] = []  # (object, attribute, old value); object None => os.environ
        self._str_map: dict[str, tuple[str, str]] = {}  # name -> (original value, patched value)
        self._bool_map: dict[str, tuple[bool, bool]] = {}
        self._active = False

    # -- helpers -----------------------------------------------------------------------------------------------

    def _set(self, obj: Any, name: str, value: Any) -> None:
        if obj is None:
            self._undo.append((None, name, os.environ.get(name)))
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        else:
            self._undo.append((obj, name, obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__")
                               else getattr(obj, name, _MISSING)))
            setattr(obj, name, value)

    @staticmethod
    def _modules() -> list[Any]:
        return [m for n, m in list(sys.modules.items())
                if m is not None and n.startswith(_PATCHED_MODULE_PREFIXES) and hasattr(m, "__dict__")]

    # -- context manager ---------------------------------------------------------------------------------------

    def __enter__(self) -> HubClientPatch:
        if self._active:
            raise RuntimeError("HubClientPatch is not re-entrant")
        self._active = True
        try:
            self._apply()
        except BaseException:
            self.close()
            raise
        return self

    def _apply(self) -> None:
        import huggingface_hub.constants as C
        import huggingface_hub.hf_api as hf_api

        self.home.mkdir(parents=True, exist_ok=True)
        orig_env = dict(os.environ)
        orig_home = C.HF_HOME
        for key, value in _client_env_changes(self.endpoint, self.home).items():
            self._set(None, key, value)

        new = {
            "ENDPOINT": self.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": self.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HOME": str(self.home),
            "HF_HUB_CACHE": str(self.cache_dir),
            "HUGGINGFACE_HUB_CACHE": str(self.cache_dir),
            "default_cache_path": str(self.cache_dir),
            "HF_ASSETS_CACHE": str(self.home / "assets"),
            "HUGGINGFACE_ASSETS_CACHE": str(self.home / "assets"),
            "default_assets_cache_path": str(self.home / "assets"),
            "HF_XET_CACHE": str(self.home / "xet"),
            "default_xet_cache_path": str(self.home / "xet"),
            "HF_TOKEN_PATH": str(self.home / "token"),
            "HF_STORED_TOKENS_PATH": str(self.home / "stored_tokens"),
        }
        for name, value in new.items():
            if isinstance(getattr(C, name, None), str):
                self._str_map[name] = (getattr(C, name), value)
        # diffusers keeps its own copy of the endpoint (read from HF_ENDPOINT at its import) and a modules cache.
        self._str_map["HUGGINGFACE_CO_RESOLVE_ENDPOINT"] = (orig_env.get("HF_ENDPOINT", C._HF_DEFAULT_ENDPOINT),
                                                            self.endpoint)
        self._str_map["HF_MODULES_CACHE"] = (orig_env.get("HF_MODULES_CACHE", os.path.join(orig_home, "modules")),
                                             str(self.home / "modules"))
        self._bool_map = {"HF_HUB_OFFLINE": (bool(C.HF_HUB_OFFLINE), False),
                          "HF_HUB_DISABLE_TELEMETRY": (bool(C.HF_HUB_DISABLE_TELEMETRY), True),
                          "HF_HUB_DISABLE_XET": (bool(getattr(C, "HF_HUB_DISABLE_XET", False)), True)}

        for mod in self._modules():
            d = mod.__dict__
            for name, (old, value) in self._str_map.items():
                if isinstance(d.get(name), str) and d[name] == old:
                    self._set(mod, name, value)
            for name, (_, value) in self._bool_map.items():
                if isinstance(d.get(name), bool):
                    self._set(mod, name, value)

        host = urllib.parse.urlsplit(self.endpoint).hostname or "127.0.0.1"
        if isinstance(getattr(C, "HF_URL_HOSTS", None), frozenset):
            self._set(C, "HF_URL_HOSTS", C.HF_URL_HOSTS | {host})
        try:
            from huggingface_hub.utils import _http
        except ImportError:  # pragma: no cover - older huggingface_hub
            _http = None
        if _http is not None and isinstance(getattr(_http, "_HUB_ORIGINS", None), frozenset):
            split = urllib.parse.urlsplit(self.endpoint)
            self._set(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {(split.scheme, host, split.port or 80)})
        # `model_info`, `create_repo`, `upload_folder`, ... are bound methods of this import-time instance.
        self._set(hf_api.api, "endpoint", self.endpoint)
        self._close_session()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._active:
            return
        self._active = False
        self._close_session()
        restored = set()
        for obj, name, old in reversed(self._undo):
            if obj is None:
                if old is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = old
                continue
            restored.add((id(obj), name))
            if old is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._undo.clear()
        # Modules first imported while the patch was active copied patched values: put the originals back.
        for mod in self._modules():
            d = mod.__dict__
            for name, (old, value) in self._str_map.items():
                if (id(mod), name) not in restored and d.get(name) == value:
                    setattr(mod, name, old)
            for name, (old, _) in self._bool_map.items():
                if (id(mod), name) not in restored and isinstance(d.get(name), bool):
                    setattr(mod, name, old)

    @staticmethod
    def _close_session() -> None:
        try:
            from huggingface_hub.utils._http import close_session
        except ImportError:  # pragma: no cover - older huggingface_hub
            from huggingface_hub.utils import reset_sessions as close_session  # type: ignore[no-redef]
        close_session()

    @contextlib.contextmanager
    def offline(self, enabled: bool = True) -> Iterator[None]:
        """Temporarily set ``HF_HUB_OFFLINE`` (env + every module copy); back to online afterwards."""
        if not self._active:
            raise RuntimeError("HubClientPatch is not active")
        previous = os.environ.get("HF_HUB_OFFLINE")

        def apply(flag: bool, env_value: str | None) -> None:
            if env_value is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = env_value
            for mod in self._modules():
                if isinstance(mod.__dict__.get("HF_HUB_OFFLINE"), bool):
                    setattr(mod, "HF_HUB_OFFLINE", flag)

        apply(enabled, "1" if enabled else None)
        try:
            yield
        finally:
            apply(False, previous)


_MISSING = object()


@contextlib.contextmanager
def hub_client(endpoint: str, home: str | os.PathLike) -> Iterator[HubClientPatch]:
    """``with hub_client(hub.url, tmp_path / "hf_home") as client: ...`` -- see :class:`HubClientPatch`."""
    patch = HubClientPatch(endpoint, home)
    with patch:
        yield patch


@contextlib.contextmanager
def running_hub(home: str | os.PathLike) -> Iterator[LocalHub]:
    """A started :class:`LocalHub` with the in-process client pointed at it (cache under ``home``)."""
    with LocalHub() as hub, hub_client(hub.url, home) as client:
        hub.client = client
        try:
            yield hub
        finally:
            hub.client = None


try:  # pytest is the test runner, not a dependency of the stub itself
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture
    def local_hub(tmp_path: Path) -> Iterator[LocalHub]:
        """Pytest fixture: ``running_hub(tmp_path / "hf_home")``."""
        with running_hub(tmp_path / "hf_home") as hub:
            yield hub
