"""A small in-process Hugging Face Hub for tests: the real ``huggingface_hub`` client talks HTTP to it.

Standard library only. It speaks the parts of the Hub protocol that uploads and downloads use, as
``huggingface_hub`` 2.4 sends them (read in hf_api.py, _commit_api.py, lfs.py, file_download.py):

    GET    /api/whoami-v2                                  who the token belongs to
    POST   /api/repos/create, DELETE /api/repos/delete     create (409 when it exists) and delete repos
    POST   /api/validate-yaml                              check a README's YAML front matter
    GET    /api/{models|datasets|spaces}/{id}[/revision/{rev}]   repo info (sha, siblings, cardData)
    GET    /api/{type}s/{id}/tree/{rev}[/{path}]           tree listing (recursive, expand)
    POST   /api/{type}s/{id}/paths-info/{rev}              info on given paths
    GET    /api/{type}s/{id}/commits/{rev}, /refs          history and refs (branches, pull requests)
    POST   /api/{type}s/{id}/preupload/{rev}               regular or LFS, per file
    POST   /{prefix}{id}.git/info/lfs/objects/batch        LFS batch API, "basic" transfer
    PUT    /_lfs/{type}/{id}/{oid}, POST .../verify        LFS upload target and verify step
    POST   /api/{type}s/{id}/commit/{rev}                  NDJSON commit (optionally as a pull request)
    POST   /api/{type}s/{id}/branch/{name}                 create a branch
    POST   /api/{type}s/{id}/discussions, GET .../{num}    open a pull request, read it back
    GET|HEAD /{prefix}{id}/resolve/{rev}/{path}            file download: ETag, X-Repo-Commit, Range

Revisions are branch names ("main"), full commit shas or pull request refs ("refs/pr/1"). Users and
tokens are fixed: alice (``hf_alice_token``, member of the org ``hubprune-org``) and bob
(``hf_bob_token``). Errors use the Hub's shape: a JSON ``{"error": ...}`` body plus ``X-Error-Code`` and
``X-Error-Message`` headers, which the client turns into its typed exceptions.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

TOKENS = {"hf_alice_token": "alice", "hf_bob_token": "bob"}
ORGS = {"hubprune-org": {"alice"}}
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".gguf", ".msgpack", ".npy",
                ".npz", ".png", ".jpg", ".jpeg", ".gif", ".zip", ".gz", ".tar", ".parquet", ".arrow", ".pkl")
GITATTRIBUTES = b"".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode() for s in LFS_SUFFIXES)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_hash(data: bytes) -> str:
    """The git blob id of ``data`` (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An error answer: status, message, and the Hub's ``X-Error-Code`` when the client needs one."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra

    def response(self):
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return _json({"error": self.message, **self.extra}, self.status, headers)


def _json(obj, status: int = 200, headers: dict | None = None):
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()


@dataclass(frozen=True)
class Blob:
    """File content; ``lfs`` files are stored through the LFS API and served with X-Linked-* headers.

    Hashes are computed once per blob (cached_property writes to __dict__, which a frozen dataclass allows).
    """

    data: bytes
    lfs: bool = False

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @cached_property
    def oid(self) -> str:
        """The git blob id: of the content, or of the LFS pointer file for LFS files."""
        return git_hash(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    owner: str
    sdk: str | None = None
    created_at: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1", ... -> commit oid
    lfs: dict[str, bytes] = field(default_factory=dict)  # uploaded LFS objects by sha256
    announced: set[str] = field(default_factory=set)  # oids a batch call allowed to be PUT (like signed URLs)
    discussions: list[dict] = field(default_factory=list)

    @property
    def url_path(self) -> str:
        return PREFIX[self.type] + self.id

    def resolve(self, revision: str) -> Commit:
        """The commit a branch, a refs/pr/N ref or a full sha points to (404 RevisionNotFound otherwise)."""
        revision = revision.removeprefix("refs/heads/")
        oid = self.refs.get(revision) or (revision if revision in self.commits else None)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def history(self, commit: Commit) -> list[Commit]:
        out = [commit]
        while out[-1].parent:
            out.append(self.commits[out[-1].parent])
        return out


# ---------------------------------------------------------------- YAML front matter (PyYAML)

_FRONT_MATTER = re.compile(r"^\s*---\r?\n([\s\S]*?)\r?\n---[ \t]*(?:\r?\n|$)")
def card_data(readme: bytes) -> dict | None:
    """The YAML front matter of a README as a dict (None without one); ValueError if it is malformed."""
    match = _FRONT_MATTER.match(readme.decode("utf-8-sig"))
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        raise ValueError(f"invalid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError("the metadata must be a YAML mapping")
    return data


@dataclass
class _Failure:
    count: int
    status: int
    path_contains: str | None
    method: str | None


class HubServer:
    """The Hub's state and the HTTP server around it; ``start()`` it, or use it as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, lfs_threshold: int = 10 * 1024 * 1024):
        self.lfs_threshold = lfs_threshold  # files at least this large go through LFS, whatever their suffix
        self._default_lfs_threshold = lfs_threshold
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for tests to inspect
        self._failures: list[_Failure] = []
        self._ids = itertools.count()
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self
        self.endpoint = f"http://{host}:{self._httpd.server_port}"
        self._thread: threading.Thread | None = None

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers for tests

    def reset(self) -> None:
        """Forget every repo, pending failure and logged request; restore the LFS threshold."""
        with self.lock:
            self.repos.clear()
            self.requests.clear()
            self._failures.clear()
            self.lfs_threshold = self._default_lfs_threshold

    def fail_next(self, count: int = 1, status: int = 503, path_contains: str | None = None,
                  method: str | None = None) -> None:
        """Answer the next ``count`` requests whose path contains ``path_contains`` (and method) with ``status``."""
        with self.lock:
            self._failures.append(_Failure(count, status, path_contains, method and method.upper()))

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """The history of ``revision``, newest first."""
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            return repo.history(repo.resolve(revision))

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The content of every file of ``repo_id`` at ``revision``."""
        with self.lock:
            return {p: b.data for p, b in self.repos[(repo_type, repo_id)].resolve(revision).files.items()}

    def lfs_paths(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> set[str]:
        """The files of ``repo_id`` at ``revision`` that are stored through LFS."""
        with self.lock:
            return {p for p, b in self.repos[(repo_type, repo_id)].resolve(revision).files.items() if b.lfs}

    # -- internals used by the handler

    def _take_failure(self, method: str, path: str) -> int | None:
        with self.lock:
            for rule in self._failures:
                if rule.count > 0 and (rule.method in (None, method)) and (rule.path_contains or "") in path:
                    rule.count -= 1
                    return rule.status
        return None

    def _new_commit(self, repo: Repo, parent: Commit | None, files: dict[str, Blob], title: str, message: str,
                    author: str) -> Commit:
        seed = f"{repo.id}\0{parent and parent.oid}\0{title}\0{next(self._ids)}\0{_now()}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent and parent.oid, title, message, author,
                        _now(), files)
        repo.commits[commit.oid] = commit
        return commit


def _route(method: str, pattern: str, handler: str):
    pattern = (pattern.replace("{type}", "(models|datasets|spaces)").replace("{repo}", r"([\w.-]+/[\w.-]+)")
               .replace("{prefix}", "(datasets/|spaces/)?").replace("{seg}", "([^/]+)"))
    return method, re.compile(pattern), handler


class _Handler(BaseHTTPRequestHandler):
    """Routes each request to one ``h_*`` method; each returns (status, headers, body) or raises HubError."""

    protocol_version = "HTTP/1.1"
    ROUTES = [
        _route("GET", r"/api/whoami-v2", "h_whoami"),
        _route("POST", r"/api/repos/create", "h_create_repo"),
        _route("DELETE", r"/api/repos/delete", "h_delete_repo"),
        _route("POST", r"/api/validate-yaml", "h_validate_yaml"),
        _route("GET", r"/api/{type}/{repo}(?:/revision/{seg})?", "h_repo_info"),
        _route("GET", r"/api/{type}/{repo}/tree/{seg}(?:/(.+))?", "h_tree"),
        _route("POST", r"/api/{type}/{repo}/paths-info/{seg}", "h_paths_info"),
        _route("GET", r"/api/{type}/{repo}/commits/{seg}", "h_commits"),
        _route("GET", r"/api/{type}/{repo}/refs", "h_refs"),
        _route("POST", r"/api/{type}/{repo}/preupload/{seg}", "h_preupload"),
        _route("POST", r"/api/{type}/{repo}/commit/{seg}", "h_commit"),
        _route("POST", r"/api/{type}/{repo}/branch/{seg}", "h_create_branch"),
        _route("POST", r"/api/{type}/{repo}/discussions", "h_create_discussion"),
        _route("GET", r"/api/{type}/{repo}/discussions/(\d+)", "h_discussion"),
        _route("POST", r"/{prefix}{repo}\.git/info/lfs/objects/batch", "h_lfs_batch"),
        _route("PUT", r"/_lfs/(model|dataset|space)/{repo}/([0-9a-f]{64})", "h_lfs_put"),
        _route("POST", r"/_lfs/(model|dataset|space)/{repo}/([0-9a-f]{64})/verify", "h_lfs_verify"),
        _route("GET", r"/{prefix}{repo}/resolve/{seg}/(.+)", "h_resolve"),
    ]

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # -- plumbing

    def _dispatch(self) -> None:
        method, self.hub = self.command, self.server.hub
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self._read_body()  # always drain it, so that the kept-alive connection stays in sync
        with self.hub.lock:
            self.hub.requests.append((method, self.path))
        try:
            if (status := self.hub._take_failure(method, self.path)) is not None:
                raise HubError(status, f"Injected failure ({status})")
            self.user = self._authenticate()
            for route_method, pattern, name in self.ROUTES:
                match = pattern.fullmatch(url.path)
                if match and route_method == ("GET" if method == "HEAD" else method):
                    with self.hub.lock:
                        response = getattr(self, name)(*(unquote(g or "") for g in match.groups()))
                    break
            else:
                raise HubError(404, f"Not Found: {method} {url.path}")
        except HubError as err:
            response = err.response()
        except Exception as err:  # a bug here: answer 500 with the reason rather than hang the client
            response = _json({"error": f"hubserver: {type(err).__name__}: {err}"}, 500)
        status, headers, body = response
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authenticate(self) -> str | None:
        auth = self.headers.get("Authorization")
        if auth is None:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in TOKENS:
            raise HubError(401, "Invalid credentials in Authorization header")
        return TOKENS[token]

    def _json_body(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, "The request body is not valid JSON") from None

    def _require_user(self) -> str:
        if self.user is None:
            raise HubError(401, "You must be authenticated to do this: pass a token")
        return self.user

    def _can_write(self, namespace: str) -> bool:
        return self.user is not None and (self.user == namespace or self.user in ORGS.get(namespace, ()))

    def _repo(self, plural_or_type: str, repo_id: str, write: bool = False) -> Repo:
        """The repo, 404 RepoNotFound if it is missing or private to others; 401/403 if ``write`` is refused."""
        repo_type = TYPES.get(plural_or_type, plural_or_type)
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._can_write(repo.owner)):
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        if write:
            self._require_user()
            if not self._can_write(repo.owner):
                raise HubError(403, f"You don't have the rights to write to {repo_type} {repo_id}")
        return repo

    def _url(self, repo: Repo, suffix: str = "") -> str:
        return f"{self.hub.endpoint}/{repo.url_path}{suffix}"

    def _flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")

    # -- account and repos

    def h_whoami(self):
        user = self._require_user()
        orgs = [{"type": "org", "name": org, "fullname": org, "roleInOrg": "admin"}
                for org, members in ORGS.items() if user in members]
        return _json({"type": "user", "id": f"id-{user}", "name": user, "fullname": user.title(),
                      "email": f"{user}@example.com", "emailVerified": True, "isPro": False, "canPay": False,
                      "orgs": orgs, "auth": {"type": "access_token",
                                             "accessToken": {"displayName": "tests", "role": "write"}}})

    def h_create_repo(self):
        user, body = self._require_user(), self._json_body()
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or user
        repo_id = f"{namespace}/{body.get('name')}"
        if repo_type not in PREFIX or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise HubError(400, f"Invalid repo type or name: {repo_type} {repo_id}")
        if not self._can_write(namespace):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace \"{namespace}\"")
        if (repo_type, repo_id) in self.hub.repos:  # the client's exist_ok path reads "url" from this answer
            existing = self.hub.repos[(repo_type, repo_id)]
            raise HubError(409, f"You already created this {repo_type} repo", url=self._url(existing))
        private = body.get("visibility", "private" if body.get("private") else "public") != "public"
        repo = Repo(repo_type, repo_id, private, namespace, sdk=body.get("sdk"))
        initial = self.hub._new_commit(repo, None, {".gitattributes": Blob(GITATTRIBUTES)}, "initial commit", "", user)
        repo.refs["main"] = initial.oid
        self.hub.repos[(repo_type, repo_id)] = repo
        return _json({"url": self._url(repo), "name": repo_id, "id": f"id-{repo_id}"})

    def h_delete_repo(self):
        user, body = self._require_user(), self._json_body()
        repo = self._repo(body.get("type") or "model", f"{body.get('organization') or user}/{body.get('name')}",
                          write=True)
        del self.hub.repos[(repo.type, repo.id)]
        return _json({})

    def h_validate_yaml(self):
        try:
            card_data(self._json_body().get("content", "").encode())
        except ValueError as err:
            return _json({"errors": [{"message": f"Invalid YAML in the front matter: {err}"}], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    def h_repo_info(self, plural, repo_id, revision):
        repo = self._repo(plural, repo_id)
        commit = repo.resolve(revision or "main")
        blobs = self._flag("blobs")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=len(blob.data), blobId=blob.oid)
                if blob.lfs:
                    sibling["lfs"] = {"size": len(blob.data), "sha256": blob.sha256, "pointerSize": len(blob.pointer)}
            siblings.append(sibling)
        info = {"_id": f"id-{repo.id}", "id": repo.id, "author": repo.owner, "sha": commit.oid,
                "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
                "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(len(b.data) for b in commit.files.values())}
        if "README.md" in commit.files:
            try:
                data = card_data(commit.files["README.md"].data)
            except ValueError:
                data = None
            if data:
                info["cardData"] = data
                tags = data.get("tags")
                info["tags"] = list(tags) if isinstance(tags, list) else [tags] if tags else []
                info.update({k: data[k] for k in ("library_name", "pipeline_tag") if k in data})
        if repo.type == "space":
            info.update(sdk=repo.sdk, subdomain=repo.id.replace("/", "-").lower(),
                        runtime={"stage": "BUILDING", "hardware": {"current": None, "requested": "cpu-basic"}})
        return _json(info)

    # -- listing

    def _entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        """A tree entry as the Hub lists it: a file (with its LFS pointer info) or a directory."""
        if path in commit.files:
            blob = commit.files[path]
            entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
            if expand:
                entry["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False, "virusNames": None},
                                               "pickleImportScan": None}
        else:
            below = sorted((p, b.oid) for p, b in commit.files.items() if p.startswith(path + "/"))
            entry = {"type": "directory", "oid": hashlib.sha1(repr(below).encode()).hexdigest(), "size": 0,
                     "path": path}
        if expand:
            last = self._last_commit(repo, commit, path)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return entry

    @staticmethod
    def _last_commit(repo: Repo, commit: Commit, path: str) -> Commit:
        def state(c):
            return sorted((p, b.oid) for p, b in c.files.items() if p == path or p.startswith(path + "/"))

        history = repo.history(commit)
        for newer, older in zip(history, history[1:]):
            if state(newer) != state(older):
                return newer
        return history[-1]

    def _paths(self, commit: Commit) -> set[str]:
        """Every file and folder path of a commit."""
        paths = set(commit.files)
        for path in commit.files:
            parts = path.split("/")
            paths.update("/".join(parts[:n]) for n in range(1, len(parts)))
        return paths

    def h_tree(self, plural, repo_id, revision, path):
        repo = self._repo(plural, repo_id)
        commit = repo.resolve(revision)
        path = path.strip("/")
        paths = self._paths(commit)
        if path and (path not in paths or path in commit.files):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        prefix = path + "/" if path else ""
        recursive = self._flag("recursive")
        listed = sorted(p for p in paths if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):]))
        return _json([self._entry(repo, commit, p, self._flag("expand")) for p in listed])

    def h_paths_info(self, plural, repo_id, revision):
        repo = self._repo(plural, repo_id)
        commit = repo.resolve(revision)
        form = parse_qs(self.body.decode())
        expand = form.get("expand", ["false"])[-1].lower() == "true"
        paths = self._paths(commit)
        wanted = [p.strip("/") for p in form.get("paths", [])]
        return _json([self._entry(repo, commit, p, expand) for p in wanted if p in paths])

    def h_commits(self, plural, repo_id, revision):
        repo = self._repo(plural, repo_id)
        out = []
        for commit in repo.history(repo.resolve(revision)):
            item = {"id": commit.oid, "title": commit.title, "message": commit.message, "date": commit.date,
                    "authors": [{"user": commit.author, "avatar": None}]}
            if "formatted" in self.query.get("expand[]", []):
                item["formatted"] = {"title": commit.title, "message": commit.message}
            out.append(item)
        return _json(out)

    def h_refs(self, plural, repo_id):
        repo = self._repo(plural, repo_id)

        def ref(name, full):
            return {"name": name, "ref": full, "targetCommit": repo.refs[name]}

        branches = [ref(n, f"refs/heads/{n}") for n in repo.refs if not n.startswith("refs/")]
        body = {"branches": branches, "converts": [], "tags": []}
        if self._flag("include_prs"):
            body["pullRequests"] = [ref(n, n) for n in repo.refs if n.startswith("refs/pr/")]
        return _json(body)

    # -- uploads

    def h_preupload(self, plural, repo_id, revision):
        repo = self._repo(plural, repo_id, write=not self._flag("create_pr"))
        self._require_user()
        commit = repo.resolve(revision)
        files = []
        for item in self._json_body().get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            sample = base64.b64decode(item.get("sample", ""))
            lfs = path.lower().endswith(LFS_SUFFIXES) or size >= self.hub.lfs_threshold or b"\0" in sample
            remote = commit.files.get(path)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": (remote.sha256 if remote.lfs else remote.oid) if remote else None})
        return _json({"files": files, "commitOid": commit.oid})

    def h_lfs_batch(self, prefix, repo_id):
        body = self._json_body()  # no "ref" when the upload is for a pull request: then reading is enough
        repo = self._repo((prefix or "models/").rstrip("/"), repo_id, write="ref" in body)
        self._require_user()
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(400, "Only uploads with the basic transfer are supported")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs:
                repo.announced.add(oid)
                href = f"{self.hub.endpoint}/_lfs/{repo.type}/{repo.id}/{oid}"
                item["actions"] = {"upload": {"href": href, "header": {}},
                                   "verify": {"href": f"{href}/verify", "header": {}}}
            objects.append(item)
        status, headers, payload = _json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})
        return status, {**headers, "Content-Type": "application/vnd.git-lfs+json"}, payload

    def h_lfs_put(self, repo_type, repo_id, oid):
        """The upload target; like a signed storage URL it needs no token, only an oid a batch call announced."""
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or oid not in repo.announced:
            raise HubError(403, f"No upload of {oid} was announced to the LFS batch API")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match the LFS oid {oid}")
        repo.lfs[oid] = self.body
        return 200, {"ETag": f'"{oid}"'}, b""

    def h_lfs_verify(self, repo_type, repo_id, oid):
        repo = self._repo(repo_type, repo_id)  # reading is enough: pull requests upload too
        self._require_user()
        body = self._json_body()
        if oid not in repo.lfs or body.get("oid") != oid or int(body.get("size", -1)) != len(repo.lfs[oid]):
            raise HubError(404, f"LFS object {oid} was not uploaded")
        return _json({"success": True})

    def h_commit(self, plural, repo_id, revision):
        create_pr = self._flag("create_pr")
        repo = self._repo(plural, repo_id, write=not create_pr)
        user = self._require_user()
        if revision in repo.commits:
            raise HubError(400, "Cannot commit to a commit sha: give a branch or a refs/pr/N ref")
        base = repo.resolve(revision)
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line must be the commit header")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != base.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(base.files)
        for line in lines[1:]:
            self._apply(repo, files, line["key"], line["value"])
        commit = self.hub._new_commit(repo, base, files, header.get("summary") or "Commit",
                                      header.get("description") or "", user)
        pr_url = None
        if create_pr:
            num = len(repo.discussions) + 1
            repo.discussions.append({"num": num, "title": commit.title, "author": user, "createdAt": commit.date,
                                     "isPullRequest": True, "base": revision.removeprefix("refs/heads/")})
            repo.refs[f"refs/pr/{num}"] = commit.oid
            pr_url = self._url(repo, f"/discussions/{num}")
        else:
            repo.refs[revision.removeprefix("refs/heads/")] = commit.oid
        return _json({"success": True, "commitOid": commit.oid, "commitUrl": self._url(repo, f"/commit/{commit.oid}"),
                      "hookOutput": "", "pullRequestUrl": pr_url})

    @staticmethod
    def _apply(repo: Repo, files: dict[str, Blob], key: str, value: dict) -> None:
        """Apply one NDJSON commit operation to ``files``."""
        path = value.get("path", "").strip("/")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, f"Unsupported encoding for {path}")
            files[path] = Blob(base64.b64decode(value["content"]))
        elif key == "lfsFile":
            oid = value["oid"]
            if oid not in repo.lfs:
                raise HubError(400, f"LFS object {oid} for {path} was never uploaded")
            if "size" in value and int(value["size"]) != len(repo.lfs[oid]):
                raise HubError(400, f"Size mismatch for the LFS object of {path}")
            files[path] = Blob(repo.lfs[oid], lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            gone = [p for p in files if p.startswith(path + "/")]
            if not gone:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in gone:
                del files[p]
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")

    def h_create_branch(self, plural, repo_id, branch):
        repo = self._repo(plural, repo_id, write=True)
        if branch.startswith("refs/") or not branch:
            raise HubError(400, f"Invalid branch name {branch!r}")
        if branch in repo.refs:
            raise HubError(409, f"Reference already exists: {branch}")
        repo.refs[branch] = repo.resolve(self._json_body().get("startingPoint") or "main").oid
        return _json({})

    def h_create_discussion(self, plural, repo_id):
        repo = self._repo(plural, repo_id)
        user, body = self._require_user(), self._json_body()
        num = len(repo.discussions) + 1
        is_pr = bool(body.get("pullRequest"))
        repo.discussions.append({"num": num, "title": body.get("title", ""), "author": user, "createdAt": _now(),
                                 "isPullRequest": is_pr, "base": "main"})
        if is_pr:
            repo.refs[f"refs/pr/{num}"] = repo.refs["main"]
        return _json({"num": num, "url": self._url(repo, f"/discussions/{num}")})

    def h_discussion(self, plural, repo_id, num):
        repo = self._repo(plural, repo_id)
        if not 0 < int(num) <= len(repo.discussions):
            raise HubError(404, f"Discussion {num} not found")
        d = repo.discussions[int(num) - 1]
        return _json({"num": d["num"], "title": d["title"], "author": {"name": d["author"]},
                      "createdAt": d["createdAt"], "status": "open", "isPullRequest": d["isPullRequest"],
                      "repo": {"name": repo.id, "type": repo.type}, "events": [], "filesWithConflicts": [],
                      "changes": {"base": f"refs/heads/{d['base']}"}, "diff": ""})

    # -- downloads

    def h_resolve(self, prefix, repo_id, revision, path):
        repo = self._repo((prefix or "models/").rstrip("/"), repo_id)
        commit = repo.resolve(revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{blob.etag}"', "X-Repo-Commit": commit.oid,
                   "Accept-Ranges": "bytes", "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"'}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        data, total = blob.data, len(blob.data)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match is None or match.groups() == ("", ""):
            return 200, headers, data
        start, end = match.groups()
        if start == "":  # the last N bytes
            start, end = max(total - int(end), 0), total - 1
        else:
            start, end = int(start), min(int(end) if end else total - 1, total - 1)
        if start >= total or start > end:
            raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{total}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        return 206, headers, data[start:end + 1]
