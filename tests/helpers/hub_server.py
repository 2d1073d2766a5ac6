"""TEST INFRASTRUCTURE ONLY -- an offline, local stand-in for the Hugging Face Hub on 127.0.0.1.

Nothing in here is part of ``lisa_peft``. It lets tests run the *real* ``huggingface_hub`` client code
paths (uploads and downloads, ``push_to_hub``, ``PeftModel.from_pretrained(base, "org/name")``)
without network access:

* **Downloads** are served by `olah <https://pypi.org/project/olah/>`_ (0.5.4), a Hub-compatible
  mirror, run in a subprocess in *offline* mode with *local git mirrors*.  What we learned from its
  source (``olah/configs.py``, ``olah/server_mirror.py``, ``olah/mirror/repos.py``):

  - config TOML ``[basic] mirrors-path = [<dir>]``: a repo ``org/name`` of type ``models`` is the git
    repository ``<dir>/models/org/name`` (``datasets/...`` for datasets); bare repos work because
    olah opens them with GitPython and reads blobs from the object store (``.git/lfs`` is only
    consulted for LFS pointer files, which we never write);
  - ``[accessibility] offline = true``: never contacts upstream (``hf-netloc`` is pointed at a dead
    local port anyway); ``repos-path`` is its cache dir, ``--log-path`` its log dir (both under our
    temp root; ``cwd`` is the temp root too so nothing leaks into the checkout);
  - served from local git: ``HEAD/GET /{org}/{name}/resolve/{rev}/{path}`` (with ``x-repo-commit``,
    ``etag`` = git blob id, ``content-length``), ``/api/models/{org}/{name}/revision/{rev}``,
    ``.../tree/{rev}/{path}``, ``.../refs``, ``.../commits/{rev}``, ``.../paths-info/{rev}``;
  - NOT served offline from local git: ``/api/models/{org}/{name}`` without a revision and every
    error case (missing repo, revision or file all come back as 401 ``RepoNotFound``).  The front
    server in ``tests/helpers/hub_commit_server.py`` papers over exactly these.

* **Uploads**: olah has no upload API, so :class:`hub_commit_server.HubFrontServer` implements the
  few Hub write endpoints and commits into the same bare git repos olah serves.  It is also the one
  and only ``HF_ENDPOINT`` (the client uses a single endpoint): reads are proxied to olah.

Pointing ``huggingface_hub`` at the local endpoint -- what we found in huggingface_hub 2.4:

* ``HF_ENDPOINT`` is read once, at import, into ``huggingface_hub.constants.ENDPOINT`` and
  ``HUGGINGFACE_CO_URL_TEMPLATE`` (``hf_hub_download`` builds URLs from the template).  Objects built
  at import keep the old value: the module-level default ``huggingface_hub.hf_api.api`` (behind the
  functions ``file_exists``, ``create_repo``, ``upload_folder`` ... that peft calls) and transformers'
  cached ``transformers.utils.hub._hf_api`` (used by ``push_to_hub``).  ``ModelCard.validate`` posts to
  ``constants.ENDPOINT`` directly.  ``HF_TOKEN`` and the cache dir (``constants.HF_HUB_CACHE``) are
  read at call time / from a constant respectively.
* Most robust: run client code in a **fresh Python subprocess** whose environment has ``HF_ENDPOINT``
  (and ``HF_TOKEN``, ``HF_HOME``) set before import -> :meth:`LocalHub.client_env`.
* In-process (what most tests need for speed): :meth:`LocalHub.patch_client` monkeypatches
  ``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``, ``constants.HF_HUB_CACHE``,
  ``huggingface_hub.hf_api.api.endpoint`` and resets ``transformers.utils.hub._hf_api``, and sets the
  env vars.  ``HfApi(endpoint=hub.endpoint)`` alone is NOT enough for ``hf_hub_download``/peft/
  transformers code paths.
* ``HF_HUB_OFFLINE`` is never set (these tests go over HTTP); ``NO_PROXY`` covers 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.hub_commit_server import (
    HubError,
    HubFrontServer,
    entry_not_found,
    repo_not_found,
    revision_not_found,
)

DEFAULT_TEST_TOKEN = "hf_lisapeft_local_test_hub_token"
OLAH_STARTUP_TIMEOUT = 45.0
GIT_TIMEOUT = 30.0

_TYPE_DIRS = {"model": "models", "dataset": "datasets"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SIDECAR = "lisa-test-hub.json"  # per-repo metadata (private flag) stored inside the bare repo dir
_INITIAL_GITATTRIBUTES = b"# repository created by the lisa-peft local test hub (tests/helpers/hub_server.py)\n"
_AUTHOR = b"lisa-peft test hub <test-hub@localhost>"


# ====================================================================== git repositories
def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_TERMINAL_PROMPT="0",
        GIT_AUTHOR_NAME="lisa-peft test hub",
        GIT_AUTHOR_EMAIL="test-hub@localhost",
        GIT_COMMITTER_NAME="lisa-peft test hub",
        GIT_COMMITTER_EMAIL="test-hub@localhost",
    )
    return env


def run_git(git_dir: Path | None, *args: str, input: bytes | None = None, check: bool = True) -> bytes:
    """Run ``git [--git-dir=<git_dir>] <args>`` (bounded time, isolated from user/system git config)."""
    proc = subprocess.run(
        ["git", *([f"--git-dir={git_dir}"] if git_dir is not None else []), *args],
        input=input,
        capture_output=True,
        env=_git_env(),
        timeout=GIT_TIMEOUT,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"git {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace').strip()}"
        )
    return proc.stdout


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HubError(400, f"invalid path in repo: {path!r}")
    if any(c in path for c in "\n\r\0"):
        raise HubError(400, f"invalid character in path: {path!r}")
    return path


def _fi_path(path: str) -> bytes:
    """A path for git fast-import, always C-style quoted."""
    return b'"' + path.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'


def _fi_data(data: bytes) -> bytes:
    return b"data %d\n" % len(data) + data + b"\n"


class GitRepoStore:
    """Bare git repositories laid out as olah's ``mirrors-path`` expects: ``<root>/models/<org>/<name>``.

    Thread-safe (one lock for all writes).  Commits are made with ``git fast-import`` (one process per
    commit); reads use ``git rev-parse``/``git ls-tree``.  The private flag lives in a small JSON
    sidecar inside the bare repo dir (ignored by git and olah).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.RLock()
        for d in _TYPE_DIRS.values():
            (self.root / d).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ paths / metadata
    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        if repo_type not in _TYPE_DIRS:
            raise HubError(400, f"unsupported repo type {repo_type!r}")
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(_NAME_RE.match(p) for p in parts) or parts[1].endswith(".git"):
            raise HubError(400, f"invalid repo id {repo_id!r} (expected 'org/name')")
        return self.root / _TYPE_DIRS[repo_type] / parts[0] / parts[1]

    def exists(self, repo_id: str, repo_type: str = "model") -> bool:
        try:
            return (self.repo_dir(repo_id, repo_type) / "HEAD").is_file()
        except HubError:
            return False

    def _require(self, repo_id: str, repo_type: str) -> Path:
        if not self.exists(repo_id, repo_type):
            raise repo_not_found()
        return self.repo_dir(repo_id, repo_type)

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        try:
            sidecar = self.repo_dir(repo_id, repo_type) / _SIDECAR
            return bool(json.loads(sidecar.read_text())["private"]) if sidecar.is_file() else False
        except (HubError, ValueError, KeyError):
            return False

    def set_private(self, repo_id: str, private: bool, repo_type: str = "model") -> None:
        sidecar = self._require(repo_id, repo_type) / _SIDECAR
        sidecar.write_text(json.dumps({"private": bool(private)}))

    # ------------------------------------------------------------------ reads
    def resolve(self, repo_id: str, revision: str, repo_type: str = "model") -> str | None:
        """Commit sha for a branch / tag / (full or short) sha, or None."""
        if not self.exists(repo_id, repo_type) or not revision or revision.startswith("-"):
            return None
        out = run_git(
            self.repo_dir(repo_id, repo_type),
            "rev-parse",
            "--verify",
            "--quiet",
            f"{revision}^{{commit}}",
            check=False,
        )
        sha = out.decode().strip()
        return sha or None

    def _ls_entry(self, git_dir: Path, commit: str, path: str) -> tuple[str, str] | None:
        out = run_git(git_dir, "ls-tree", "-z", commit, "--", path, check=False)
        for entry in out.split(b"\0"):
            if not entry:
                continue
            meta, _, name = entry.partition(b"\t")
            if name.decode() == path:
                _mode, obj_type, sha = meta.decode().split()
                return obj_type, sha
        return None

    def object_type(self, repo_id: str, commit: str, path: str, repo_type: str = "model") -> str | None:
        """'blob', 'tree' or None for ``path`` in ``commit``."""
        entry = self._ls_entry(self.repo_dir(repo_id, repo_type), commit, path.strip("/"))
        return entry[0] if entry else None

    def blob_oid(self, repo_id: str, revision: str, path: str, repo_type: str = "model") -> str | None:
        """Git blob id of ``path`` at ``revision`` (what the client compares with its local sha1)."""
        sha = self.resolve(repo_id, revision, repo_type)
        entry = self._ls_entry(self.repo_dir(repo_id, repo_type), sha, path) if sha else None
        return entry[1] if entry and entry[0] == "blob" else None

    def read_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        git_dir = self._require(repo_id, repo_type)
        sha = self.resolve(repo_id, revision, repo_type)
        if sha is None:
            raise revision_not_found(revision)
        if self.object_type(repo_id, sha, path, repo_type) != "blob":
            raise entry_not_found(path, revision)
        return run_git(git_dir, "cat-file", "blob", f"{sha}:{path}")

    def branches(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        out = run_git(
            self._require(repo_id, repo_type),
            "for-each-ref",
            "--format=%(refname:short) %(objectname)",
            "refs/heads/",
        )
        return dict(line.split(" ", 1) for line in out.decode().splitlines() if line)

    # ------------------------------------------------------------------ writes
    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> bool:
        """Create ``repo_id`` (bare, branch main with one initial commit). False if it already existed."""
        git_dir = self.repo_dir(repo_id, repo_type)
        with self._lock:
            if self.exists(repo_id, repo_type):
                return False
            git_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp_dir = git_dir.with_name(f".{git_dir.name}.{uuid.uuid4().hex}.tmp")
            try:
                run_git(None, "init", "--quiet", "--bare", "--initial-branch=main", str(tmp_dir))
                self._fast_import(
                    tmp_dir, "main", None, {".gitattributes": _INITIAL_GITATTRIBUTES}, [], "initial commit"
                )
                (tmp_dir / _SIDECAR).write_text(json.dumps({"private": bool(private)}))
                tmp_dir.rename(git_dir)  # atomic: readers never see a half-initialised repo
            finally:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            return True

    def create_branch(
        self, repo_id: str, branch: str, starting_point: str | None = None, repo_type: str = "model"
    ) -> bool:
        """Create ``branch`` at ``starting_point`` (default: main). False if the branch already exists."""
        git_dir = self._require(repo_id, repo_type)
        self._check_branch_name(git_dir, branch)
        with self._lock:
            if self.resolve(repo_id, f"refs/heads/{branch}", repo_type):
                return False
            start = self.resolve(repo_id, starting_point or "main", repo_type)
            if start is None:
                raise revision_not_found(starting_point or "main")
            # Empty old-value: only succeeds if the ref does not exist yet.
            run_git(git_dir, "update-ref", f"refs/heads/{branch}", start, "")
            return True

    def commit(
        self,
        repo_id: str,
        branch: str = "main",
        *,
        add: Mapping[str, bytes] | None = None,
        delete_files: list[str] | tuple[str, ...] = (),
        delete_folders: list[str] | tuple[str, ...] = (),
        message: str = "Upload files",
        description: str = "",
        parent_commit: str | None = None,
        repo_type: str = "model",
    ) -> str:
        """Commit additions/deletions on an existing branch and return the new commit sha."""
        git_dir = self._require(repo_id, repo_type)
        add = {_check_path(p): bytes(c) for p, c in (add or {}).items()}
        with self._lock:
            tip = self.resolve(repo_id, f"refs/heads/{branch}", repo_type)
            if tip is None:
                raise revision_not_found(branch)
            if parent_commit and parent_commit != tip:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            deletions = []
            for path, kind in [(p.strip("/"), "blob") for p in delete_files] + [
                (p.strip("/"), "tree") for p in delete_folders
            ]:
                if self.object_type(repo_id, tip, _check_path(path), repo_type) != kind:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                deletions.append(path)
            msg = message if not description else f"{message}\n\n{description}"
            return self._fast_import(git_dir, branch, tip, add, deletions, msg)

    def _fast_import(
        self,
        git_dir: Path,
        branch: str,
        parent: str | None,
        add: Mapping[str, bytes],
        deletions: list[str],
        message: str,
    ) -> str:
        now = b"%d +0000" % int(time.time())
        stream = [b"commit refs/heads/" + branch.encode() + b"\n"]
        stream.append(b"author " + _AUTHOR + b" " + now + b"\n")
        stream.append(b"committer " + _AUTHOR + b" " + now + b"\n")
        stream.append(_fi_data(message.encode()))
        if parent:
            stream.append(b"from " + parent.encode() + b"\n")
        for path in deletions:
            stream.append(b"D " + _fi_path(path) + b"\n")
        for path, content in add.items():
            stream.append(b"M 100644 inline " + _fi_path(path) + b"\n" + _fi_data(content))
        stream.append(b"done\n")
        run_git(git_dir, "fast-import", "--quiet", "--date-format=raw", "--done", input=b"".join(stream))
        sha = run_git(git_dir, "rev-parse", "--verify", f"refs/heads/{branch}").decode().strip()
        return sha

    @staticmethod
    def _check_branch_name(git_dir: Path, branch: str) -> None:
        if not branch or "/" in branch or branch.startswith("-"):
            raise HubError(
                400, f"invalid branch name {branch!r} (the local test hub rejects '/' in branches)"
            )
        if (
            subprocess.run(
                ["git", "check-ref-format", f"refs/heads/{branch}"],
                env=_git_env(),
                timeout=GIT_TIMEOUT,
                capture_output=True,
                check=False,
            ).returncode
            != 0
        ):
            raise HubError(400, f"invalid branch name {branch!r}")

    def make_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        branch: str = "main",
        *,
        private: bool = False,
        repo_type: str = "model",
        message: str = "Add files",
    ) -> str:
        """Create ``repo_id`` if needed, create ``branch`` from main if needed, commit ``files`` to it."""
        self.create_repo(repo_id, repo_type=repo_type, private=private)
        if self.resolve(repo_id, f"refs/heads/{branch}", repo_type) is None:
            git_dir = self.repo_dir(repo_id, repo_type)
            self._check_branch_name(git_dir, branch)
            self.create_branch(repo_id, branch, "main", repo_type=repo_type)
        return self.commit(repo_id, branch, add=files, message=message, repo_type=repo_type)


def create_git_repo(
    mirrors_root: Path,
    repo_id: str,
    files: Mapping[str, bytes],
    branch: str = "main",
    *,
    private: bool = False,
    repo_type: str = "model",
) -> str:
    """Create (or extend) the bare git repo ``<mirrors_root>/models/<org>/<name>`` that olah serves.

    ``files`` are committed on ``branch`` (created from main when missing); returns the commit sha.
    """
    return GitRepoStore(mirrors_root).make_repo(repo_id, files, branch, private=private, repo_type=repo_type)


# ====================================================================== olah (download server)
def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the child if the test process dies without cleaning up (e.g. killed by a CI timeout)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 == PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (a race with other processes is handled by retrying)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _no_proxy_env(env: dict[str, str]) -> dict[str, str]:
    for key in ("NO_PROXY", "no_proxy"):
        current = [v for v in env.get(key, "").split(",") if v]
        env[key] = ",".join(dict.fromkeys([*current, "127.0.0.1", "localhost"]))
    return env


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "<no log>"


@dataclass
class OlahProcess:
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def write_olah_config(
    path: Path, *, port: int, mirrors_path: Path, cache_path: Path, mirror_netloc: str
) -> None:
    """The olah config for an offline server of local git mirrors (strings are JSON-escaped == TOML basic)."""
    q = json.dumps
    path.write_text(
        "[basic]\n"
        f"host = {q('127.0.0.1')}\n"
        f"port = {port}\n"
        f"repos-path = {q(str(cache_path))}\n"
        f"mirrors-path = [{q(str(mirrors_path))}]\n"
        # Upstream is never contacted in offline mode; point it at a dead local port all the same.
        f"hf-scheme = {q('http')}\n"
        f"hf-netloc = {q('127.0.0.1:9')}\n"
        f"hf-lfs-netloc = {q('127.0.0.1:9')}\n"
        f"mirror-scheme = {q('http')}\n"
        f"mirror-netloc = {q(mirror_netloc)}\n"
        f"mirror-lfs-netloc = {q(mirror_netloc)}\n"
        "metadata-cache-ttl = 0\n"
        "\n[accessibility]\n"
        "offline = true\n"
    )


def _wait_http(url: str, process: subprocess.Popen, deadline: float) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with opener.open(url, timeout=1.0):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means the server is up
        except (OSError, ValueError):
            time.sleep(0.1)
    return False


@contextlib.contextmanager
def olah_server(
    work_dir: Path,
    mirrors_path: Path,
    *,
    mirror_netloc: str | None = None,
    startup_timeout: float = OLAH_STARTUP_TIMEOUT,
    attempts: int = 3,
) -> Iterator[OlahProcess]:
    """Start ``python -m olah.server`` (offline, local mirrors) on a free port; always stop it afterwards."""
    work_dir.mkdir(parents=True, exist_ok=True)
    proc: OlahProcess | None = None
    errors = []
    try:
        for attempt in range(attempts):
            port = free_port()
            cfg = work_dir / "olah.toml"
            write_olah_config(
                cfg,
                port=port,
                mirrors_path=mirrors_path,
                cache_path=work_dir / "olah-cache",
                mirror_netloc=mirror_netloc or f"127.0.0.1:{port}",
            )
            log_path = work_dir / f"olah-{attempt}.log"
            env = _no_proxy_env({k: v for k, v in os.environ.items() if not k.startswith("HF_")})
            env["PYTHONUNBUFFERED"] = "1"
            with open(log_path, "wb") as log:
                popen = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "olah.server",
                        "--config",
                        str(cfg),
                        "--log-path",
                        str(work_dir / "olah-logs"),
                    ],
                    cwd=work_dir,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
            proc = OlahProcess(f"http://127.0.0.1:{port}", port, popen, log_path)
            # A cheap route that answers 401 RepoNotFound without touching disk ("/" renders a template).
            health_url = proc.url + "/api/models/lisa-healthcheck/none/revision/main"
            if _wait_http(health_url, popen, time.monotonic() + startup_timeout):
                break
            proc.stop()
            errors.append(f"attempt {attempt}: exit={popen.poll()} log tail:\n{_tail(log_path)}")
            proc = None
        if proc is None:
            raise RuntimeError("olah did not become healthy:\n" + "\n".join(errors))
        yield proc
    finally:
        if proc is not None:
            proc.stop()


# ====================================================================== the whole local hub
class LocalHub:
    """A running local Hub: ``endpoint`` (set as HF_ENDPOINT), ``token`` (the only valid token), repos.

    Built by :func:`local_hub`; the pytest fixture ``hub_server`` (``tests/helpers/hub_fixtures.py``) yields one.
    """

    def __init__(self, root: Path, store: GitRepoStore, front: HubFrontServer, olah: OlahProcess) -> None:
        self.root = root
        self.store = store
        self.front = front
        self.olah = olah
        self.endpoint = front.endpoint
        self.token = front.token

    # -------------------------------------------------------------- repos
    def make_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        branch: str = "main",
        *,
        private: bool = False,
        repo_type: str = "model",
    ) -> str:
        """Create/extend ``repo_id`` with ``files`` committed on ``branch``; returns the commit sha."""
        return self.store.make_repo(repo_id, files, branch, private=private, repo_type=repo_type)

    def unique_repo_id(self, prefix: str = "repo", org: str = "test-org") -> str:
        return f"{org}/{prefix}-{uuid.uuid4().hex[:10]}"

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        return self.store.is_private(repo_id, repo_type)

    def read_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        """Read a file straight from git (bypassing HTTP), e.g. to check what an upload committed."""
        return self.store.read_file(repo_id, path, revision, repo_type)

    @property
    def request_log(self) -> list[dict[str, Any]]:
        """Requests answered so far: ``{"method", "path", "status", "auth"}``, auth in none/valid/invalid."""
        return self.front.request_log

    # -------------------------------------------------------------- pointing clients at it
    def client_env(
        self, base: Mapping[str, str] | None = None, *, token: str | None = None, hf_home: Path | None = None
    ) -> dict[str, str]:
        """Env for a fresh subprocess: HF_ENDPOINT/HF_TOKEN/HF_HOME set before huggingface_hub is imported.

        ``token=None`` uses the valid test token; pass ``token=""`` for an anonymous client.
        """
        env = dict(os.environ if base is None else base)
        for key in (
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
            "HF_TOKEN_PATH",
            "HUGGING_FACE_HUB_TOKEN",
            "HUGGINGFACE_CO_STAGING",
            "HF_HUB_ENABLE_HF_TRANSFER",
        ):
            env.pop(key, None)
        env["HF_ENDPOINT"] = self.endpoint
        env["HF_HOME"] = str(hf_home or (self.root / f"hf-home-{uuid.uuid4().hex[:8]}"))
        env["HF_HUB_DISABLE_TELEMETRY"] = "1"
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        env["HF_HUB_DISABLE_XET"] = "1"
        tok = self.token if token is None else token
        if tok:
            env["HF_TOKEN"] = tok
        else:
            env.pop("HF_TOKEN", None)
        return _no_proxy_env(env)

    def patch_client(
        self, monkeypatch: Any, *, token: str | None = None, cache_dir: Path | None = None
    ) -> None:
        """Point the already-imported huggingface_hub (and transformers' cached HfApi) at this hub.

        ``monkeypatch`` is pytest's fixture, so everything is undone after the test.  ``token=None`` sets
        HF_TOKEN to the valid test token, ``token=""`` removes it (anonymous).
        """
        import huggingface_hub.constants as constants
        import huggingface_hub.hf_api as hf_api

        env = self.client_env(token=token, hf_home=cache_dir)
        for key in set(os.environ) - set(env):
            monkeypatch.delenv(key)  # HF_HUB_OFFLINE, HF_TOKEN for anonymous clients, ...
        for key, value in env.items():
            if os.environ.get(key) != value:
                monkeypatch.setenv(key, value)
        home = Path(os.environ["HF_HOME"])
        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            self.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_api.api, "endpoint", self.endpoint)
        try:
            import transformers.utils.hub as tf_hub
        except ImportError:  # transformers is optional for pure-hub tests
            return
        if hasattr(tf_hub, "_hf_api"):
            monkeypatch.setattr(tf_hub, "_hf_api", None)  # re-created lazily with the patched ENDPOINT


@contextlib.contextmanager
def local_hub(root: Path | None = None, *, token: str = DEFAULT_TEST_TOKEN) -> Iterator[LocalHub]:
    """Start the local test Hub (front/commit server in a thread + olah subprocess); always tear it down."""
    if shutil.which("git") is None:
        raise RuntimeError("the local test hub needs the `git` executable")
    own_root = root is None
    root = Path(tempfile.mkdtemp(prefix="lisa-local-hub-")) if root is None else Path(root)
    store = GitRepoStore(root / "mirrors")
    front = HubFrontServer(store, token)
    try:
        front.start()
        netloc = front.endpoint.removeprefix("http://")
        with olah_server(root / "olah", store.root, mirror_netloc=netloc) as olah:
            front.set_upstream(olah.url)
            yield LocalHub(root, store, front, olah)
    finally:
        front.stop()
        if own_root:
            shutil.rmtree(root, ignore_errors=True)
