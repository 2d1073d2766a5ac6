"""TEST INFRASTRUCTURE ONLY -- the write side of the local, offline Hugging Face Hub used by the tests.

Nothing in here is shipped with ``lisa_peft``; it only exists so tests can drive the *real*
``huggingface_hub`` client (``HfApi.create_repo``/``create_branch``/``create_commit``/``upload_folder``,
``push_to_hub``, ``hf_hub_download``, ``snapshot_download``, ``PeftModel.from_pretrained``) against
127.0.0.1 instead of huggingface.co.

``olah`` (see ``tests/helpers/hub_server.py``) serves *downloads* from local git repositories but has no upload API,
and the client talks to exactly one endpoint (``HF_ENDPOINT``).  :class:`HubFrontServer` is therefore
the single endpoint the client sees.  It is a small ``http.server.ThreadingHTTPServer`` that

* implements the handful of Hub *write* endpoints that ``huggingface_hub`` 2.4 uses for uploads and
  turns every commit into a real git commit in the bare repositories that olah serves, and
* reverse-proxies every read (GET/HEAD, plus ``paths-info``) to olah after checking the bearer token,
  private-repo visibility, revision and file existence itself, so that the client gets the same
  ``X-Error-Code`` answers as from the real Hub (``RepoNotFound``/``RevisionNotFound``/``EntryNotFound``;
  olah's offline local-mirror mode answers 401 ``RepoNotFound`` for all three).

Implemented endpoints (``{type}`` is ``models`` or ``datasets``; repo ids must be ``org/name``):

=========  ===========================================  =============================================
method     path                                         behaviour
=========  ===========================================  =============================================
POST       ``/api/repos/create``                        create a bare git repo (+ initial commit with
                                                        ``.gitattributes``), records ``private``;
                                                        409 if it exists (``exist_ok`` handles it)
POST       ``/api/{type}/{org}/{name}/branch/{branch}``  create a branch (``startingPoint`` or main);
                                                        409 if it exists
POST       ``/api/{type}/{org}/{name}/preupload/{rev}``  answers ``uploadMode: "regular"`` for every
                                                        file (so no LFS/Xet upload is ever attempted)
                                                        and the existing git blob id as ``oid``
POST       ``/api/{type}/{org}/{name}/commit/{rev}``     NDJSON commit: ``header``, ``file`` (base64),
                                                        ``deletedFile``, ``deletedFolder`` -> one git
                                                        commit on branch ``rev`` (``parentCommit``
                                                        checked, 412 if stale)
POST       ``/api/validate-yaml``                       accepts everything (model card upload)
GET        ``/api/whoami-v2``                           the fake user ``test-user`` (org ``test-org``)
GET        ``/api/agent-harnesses``                     an empty registry (the client asks for it)
GET/HEAD   ``/api/{type}/{org}/{name}``                 rewritten to ``.../revision/main`` (olah's
                                                        offline mode only resolves explicit revisions)
GET/HEAD   ``/api/{type}/{org}/{name}/revision/{rev}``   proxied; ``private`` patched from our record
GET        ``/api/{type}/{org}/{name}/tree/{rev}[/p]``   proxied (trailing ``/`` added for the root)
GET/HEAD   ``/[datasets/]{org}/{name}/resolve/{rev}/p``  checked here, then proxied to olah
anything   else                                         proxied to olah unchanged
=========  ===========================================  =============================================

Authentication mimics the Hub: every write needs ``Authorization: Bearer <expected token>``; a
present-but-wrong token is rejected on every route with 401 ``Invalid credentials in Authorization
header`` (the exact message ``huggingface_hub`` special-cases); private repos answer 401
``RepoNotFound`` to requests without the valid token.

Limitations (deliberate, keep it small): no LFS/Xet uploads (``lfsFile`` operations are rejected),
no pull requests (``create_pr``), no ``gitIgnore`` handling, no spaces, branch names must not contain
``/``, response bodies are buffered in memory (fine for test-sized files).
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:  # pragma: no cover - typing only; avoids an import cycle with hub_server
    from tests.helpers.hub_server import GitRepoStore

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
TEST_USER = "test-user"
TEST_ORGS = ("test-org",)

# URL segment after /api/ -> repo type understood by GitRepoStore.
_API_TYPES = {"models": "model", "datasets": "dataset"}
_URL_PREFIX = {"model": "", "dataset": "datasets/"}
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
_MAX_BODY = 512 * 1024 * 1024
_LOG_LIMIT = 10_000


class HubError(Exception):
    """An error answered to the client the way the Hub does: status + ``X-Error-Code``/``X-Error-Message``."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def repo_not_found() -> HubError:
    return HubError(401, "Repository not found", "RepoNotFound")


def revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def entry_not_found(path: str, revision: str) -> HubError:
    return HubError(404, f'{path} does not exist on "{revision}"', "EntryNotFound")


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return cls(
            status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()
        )

    @classmethod
    def from_error(cls, err: HubError) -> Response:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        return cls.json({"error": err.message}, status=err.status, headers=headers)


@dataclass(frozen=True)
class _RepoRoute:
    repo_type: str  # "model" | "dataset"
    repo_id: str  # "org/name"
    action: str | None  # "revision", "tree", "commit", "resolve", ... or None for the repo root
    revision: str | None  # unquoted
    rest: list[str]  # raw (still quoted) remaining segments


class HubFrontServer:
    """The single ``HF_ENDPOINT`` of the local test Hub (writes handled here, reads proxied to olah).

    ``store`` is a :class:`hub_server.GitRepoStore`; ``token`` is the only accepted bearer token.
    Call :meth:`start` (binds 127.0.0.1 on a free port, serves from a daemon thread) and
    :meth:`set_upstream` with olah's base URL; :meth:`stop` always shuts it down within a bounded time.
    """

    def __init__(self, store: GitRepoStore, token: str, *, upstream_timeout: float = 30.0) -> None:
        self.store = store
        self.token = token
        self.upstream_timeout = upstream_timeout
        self.upstream: tuple[str, int] | None = None
        self.endpoint = ""
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._log: list[dict[str, Any]] = []
        self._log_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.front = self  # type: ignore[attr-defined]
        self._httpd = httpd
        host, port = httpd.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="local-hub-front", daemon=True
        )
        self._thread.start()
        return self.endpoint

    def set_upstream(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must look like http://host:port, got {url!r}")
        self.upstream = (parts.hostname, parts.port)

    def stop(self, timeout: float = 10.0) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        # shutdown() blocks until serve_forever() returns; run it with a bound so a wedged server can't hang.
        stopper = threading.Thread(target=httpd.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ request log (for assertions)
    @property
    def request_log(self) -> list[dict[str, Any]]:
        with self._log_lock:
            return list(self._log)

    def _record(self, method: str, path: str, status: int, auth: str) -> None:
        with self._log_lock:
            if len(self._log) < _LOG_LIMIT:
                self._log.append({"method": method, "path": path, "status": status, "auth": auth})

    # ------------------------------------------------------------------ auth helpers
    def auth_state(self, headers: Any) -> str:
        """'none', 'valid' or 'invalid' for the request's Authorization header."""
        value = headers.get("Authorization")
        if not value:
            return "none"
        scheme, _, token = value.partition(" ")
        return "valid" if scheme.lower() == "bearer" and token.strip() == self.token else "invalid"

    @staticmethod
    def _require_write(auth: str) -> None:
        if auth == "invalid":
            raise HubError(401, INVALID_CREDENTIALS)
        if auth != "valid":
            raise HubError(401, "Authentication required: pass a valid token (HF_TOKEN) to write to the Hub")

    def _require_read(self, route: _RepoRoute, auth: str) -> None:
        if auth == "invalid":
            raise HubError(401, INVALID_CREDENTIALS)
        if not self.store.exists(route.repo_id, route.repo_type):
            raise repo_not_found()
        if self.store.is_private(route.repo_id, route.repo_type) and auth != "valid":
            raise repo_not_found()

    def _require_revision(self, route: _RepoRoute) -> str:
        assert route.revision is not None
        sha = self.store.resolve(route.repo_id, route.revision, route.repo_type)
        if sha is None:
            raise revision_not_found(route.revision)
        return sha

    # ------------------------------------------------------------------ dispatch
    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> Response:
        auth = self.auth_state(headers)
        try:
            response = self._route(method, raw_path, headers, body, auth)
        except HubError as err:
            response = Response.from_error(err)
        except Exception as exc:  # noqa: BLE001 - a test server must answer, not die
            traceback.print_exc()
            response = Response.json({"error": f"local test hub crashed: {exc!r}"}, status=500)
        self._record(method, raw_path, response.status, auth)
        return response

    def _route(self, method: str, raw_path: str, headers: Any, body: bytes, auth: str) -> Response:
        path, _, query = raw_path.partition("?")
        segs = path.split("/")[1:]

        if segs == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(body, auth)
        if segs == ["api", "validate-yaml"] and method == "POST":
            return Response.json({"errors": [], "warnings": []})
        if segs == ["api", "whoami-v2"] and method in ("GET", "HEAD"):
            return self._whoami(auth)
        if segs == ["api", "agent-harnesses"] and method == "GET":
            # huggingface_hub fetches this registry for its user agent; olah would mistake it for a CDN file.
            return Response.json({"standardEnvVars": [], "harnesses": {}})

        route = _parse_repo_route(segs)
        if route is None:
            return self._forward(method, raw_path, headers, body)

        if route.action in ("branch", "preupload", "commit") and method == "POST":
            self._require_write(auth)
            if not self.store.exists(route.repo_id, route.repo_type):
                raise repo_not_found()
            if route.action == "branch":
                return self._create_branch(route, body)
            if route.action == "preupload":
                return self._preupload(route, body)
            return self._commit(route, body, parse_qs(query))

        self._require_read(route, auth)
        if route.action is None and method in ("GET", "HEAD"):
            # olah (offline) cannot answer the bare repo-info route for local mirrors: ask for main.
            prefix = "/api/" + ("datasets" if route.repo_type == "dataset" else "models")
            new_path = f"{prefix}/{route.repo_id}/revision/main" + (f"?{query}" if query else "")
            route = _RepoRoute(route.repo_type, route.repo_id, "revision", "main", [])
            self._require_revision(route)
            return self._patch_private(route, self._forward(method, new_path, headers, body))
        if route.action in ("revision", "tree", "commits", "paths-info", "resolve") and route.revision:
            self._require_revision(route)
        if route.action == "revision":
            return self._patch_private(route, self._forward(method, raw_path, headers, body))
        if route.action == "tree" and not route.rest:
            path = path.rstrip("/") + "/"
            return self._forward(method, path + (f"?{query}" if query else ""), headers, body)
        if route.action == "resolve":
            file_path = unquote("/".join(route.rest))
            sha = self._require_revision(route)
            if (
                not file_path
                or self.store.object_type(route.repo_id, sha, file_path, route.repo_type) != "blob"
            ):
                raise entry_not_found(file_path, route.revision or "")
        return self._forward(method, raw_path, headers, body)

    # ------------------------------------------------------------------ write endpoints
    def _whoami(self, auth: str) -> Response:
        self._require_write(auth)
        orgs = [{"name": org, "type": "org", "roleInOrg": "admin"} for org in TEST_ORGS]
        return Response.json(
            {
                "type": "user",
                "name": TEST_USER,
                "fullname": "Local Test Hub User",
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _create_repo(self, body: bytes, auth: str) -> Response:
        self._require_write(auth)
        payload = _json_body(body)
        name = payload.get("name")
        org = payload.get("organization") or TEST_USER
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"repo type {repo_type!r} is not supported by the local test hub")
        if not isinstance(name, str) or not name:
            raise HubError(400, "missing repo name")
        repo_id = f"{org}/{name}"
        visibility = payload.get("visibility")
        private = visibility in ("private", "protected") or bool(payload.get("private"))
        url = f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"
        if not self.store.create_repo(repo_id, repo_type=repo_type, private=private):
            return Response.json(
                {"error": "You already created this model repo", "url": url},
                status=409,
                headers={"X-Error-Message": "You already created this model repo"},
            )
        return Response.json({"url": url, "name": repo_id, "id": repo_id})

    def _create_branch(self, route: _RepoRoute, body: bytes) -> Response:
        branch = route.revision or ""
        starting_point = _json_body(body).get("startingPoint") if body else None
        if not self.store.create_branch(route.repo_id, branch, starting_point, repo_type=route.repo_type):
            raise HubError(409, "Reference already exists")
        return Response.json({})

    def _preupload(self, route: _RepoRoute, body: bytes) -> Response:
        sha = self._require_revision(route)
        files = _json_body(body).get("files")
        if not isinstance(files, list):
            raise HubError(400, "preupload payload must contain a 'files' list")
        answer = []
        for item in files:
            path = item.get("path") if isinstance(item, dict) else None
            if not isinstance(path, str):
                raise HubError(400, "every preupload entry needs a 'path'")
            answer.append(
                {
                    "path": path,
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": self.store.blob_oid(route.repo_id, sha, path, route.repo_type),
                }
            )
        return Response.json({"files": answer, "commitOid": sha})

    def _commit(self, route: _RepoRoute, body: bytes, params: dict[str, list[str]]) -> Response:
        if params.get("create_pr", ["0"])[0] not in ("", "0", "false", "False"):
            raise HubError(400, "create_pr is not supported by the local test hub")
        lines = [line for line in body.split(b"\n") if line.strip()]
        if not lines:
            raise HubError(400, "empty commit payload")
        items = []
        for line in lines:
            try:
                items.append(json.loads(line))
            except ValueError as exc:
                raise HubError(400, f"invalid NDJSON line in commit payload: {exc}") from exc
        header = items[0]
        if header.get("key") != "header":
            raise HubError(400, "first commit payload line must be the header")
        summary = header["value"].get("summary") or ""
        if not summary:
            raise HubError(400, "commit summary must not be empty")
        additions: dict[str, bytes] = {}
        deleted_files: list[str] = []
        deleted_folders: list[str] = []
        for item in items[1:]:
            key, value = item.get("key"), item.get("value") or {}
            path = value.get("path")
            if not isinstance(path, str):
                raise HubError(400, f"operation {key!r} has no path")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "only base64 file content is supported")
                additions[path] = base64.b64decode(value.get("content", ""), validate=True)
            elif key == "deletedFile":
                deleted_files.append(path)
            elif key == "deletedFolder":
                deleted_folders.append(path)
            elif key == "lfsFile":
                raise HubError(
                    400, "LFS files are not supported by the local test hub (preupload says 'regular')"
                )
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        sha = self.store.commit(
            route.repo_id,
            route.revision or "main",
            add=additions,
            delete_files=deleted_files,
            delete_folders=deleted_folders,
            message=summary,
            description=header["value"].get("description") or "",
            parent_commit=header["value"].get("parentCommit"),
            repo_type=route.repo_type,
        )
        commit_url = f"{self.endpoint}/{_URL_PREFIX[route.repo_type]}{route.repo_id}/commit/{sha}"
        return Response.json({"success": True, "commitOid": sha, "commitUrl": commit_url, "hookOutput": ""})

    # ------------------------------------------------------------------ read side
    def _patch_private(self, route: _RepoRoute, response: Response) -> Response:
        if response.status != 200 or not response.body:
            return response
        try:
            data = json.loads(response.body)
        except ValueError:
            return response
        if isinstance(data, dict):
            data["private"] = self.store.is_private(route.repo_id, route.repo_type)
            response.body = json.dumps(data).encode()
        return response

    def _forward(self, method: str, raw_path: str, headers: Any, body: bytes) -> Response:
        if self.upstream is None:
            return Response.json({"error": "local test hub: download server not started"}, status=502)
        conn = http.client.HTTPConnection(*self.upstream, timeout=self.upstream_timeout)
        try:
            out_headers = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            out_headers["Host"] = f"{self.upstream[0]}:{self.upstream[1]}"
            out_headers["Accept-Encoding"] = "identity"
            if body or method in ("POST", "PUT"):
                out_headers["Content-Length"] = str(len(body))
            conn.request(method, raw_path, body=body or None, headers=out_headers)
            upstream = conn.getresponse()
            data = upstream.read()
            resp_headers = {k: v for k, v in upstream.getheaders() if k.lower() not in _HOP_BY_HOP}
            if method == "HEAD" and upstream.getheader("Content-Length") is not None:
                resp_headers["Content-Length"] = upstream.getheader("Content-Length")
            return Response(upstream.status, resp_headers, data)
        except (OSError, http.client.HTTPException) as exc:
            return Response.json(
                {"error": f"local test hub: download server unreachable: {exc!r}"}, status=502
            )
        finally:
            conn.close()


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"{}")
    except ValueError as exc:
        raise HubError(400, f"invalid JSON body: {exc}") from exc
    if not isinstance(data, dict):
        raise HubError(400, "JSON body must be an object")
    return data


def _parse_repo_route(segs: list[str]) -> _RepoRoute | None:
    """Parse ``/api/{type}/{org}/{name}[/{action}[/{rev}[/..]]]`` and ``/[datasets/]{org}/{name}/resolve``."""
    if len(segs) >= 4 and segs[0] == "api" and segs[1] in _API_TYPES:
        repo_type = _API_TYPES[segs[1]]
        repo_id = f"{unquote(segs[2])}/{unquote(segs[3])}"
        action = segs[4] if len(segs) > 4 and segs[4] else None
        revision = unquote(segs[5]) if len(segs) > 5 and segs[5] else None
        return _RepoRoute(repo_type, repo_id, action, revision, [s for s in segs[6:] if s])
    repo_type = "model"
    if segs and segs[0] == "datasets":
        repo_type, segs = "dataset", segs[1:]
    if len(segs) >= 5 and segs[2] == "resolve":
        repo_id = f"{unquote(segs[0])}/{unquote(segs[1])}"
        return _RepoRoute(repo_type, repo_id, "resolve", unquote(segs[3]), segs[4:])
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # socket timeout per connection: a stuck client cannot pin a thread forever
    server_version = "lisa-peft-local-test-hub/1"

    def _serve(self, method: str) -> None:
        try:
            body = self._read_body()
        except ValueError as exc:
            response = Response.json({"error": str(exc)}, status=400)
        else:
            response = self.server.front.handle(method, self.path, self.headers, body)  # type: ignore[attr-defined]
        self.send_response(response.status)
        for key, value in response.headers.items():
            if key.lower() != "content-length":
                self.send_header(key, value)
        if method == "HEAD":
            self.send_header(
                "Content-Length", response.headers.get("Content-Length", str(len(response.body)))
            )
        else:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if method != "HEAD" and response.body:
            self.wfile.write(response.body)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > _MAX_BODY:
                    raise ValueError("request body too large for the local test hub")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            raise ValueError("request body too large for the local test hub")
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._serve("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._serve("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # requests are recorded in HubFrontServer.request_log instead of spamming stderr
