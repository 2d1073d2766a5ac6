"""TEST INFRASTRUCTURE: pytest fixtures for the offline local Hugging Face Hub (see ``tests/helpers/hub_server.py``).

Fixtures
--------
``hub_server`` (session scope)
    A running :class:`hub_server.LocalHub` on 127.0.0.1: ``.endpoint`` (use as ``HF_ENDPOINT``),
    ``.token`` (the only accepted token), ``.make_repo(repo_id, files: dict[str, bytes], branch="main")``,
    ``.client_env()`` (environment for a fresh subprocess), ``.patch_client(monkeypatch)`` (in-process),
    ``.is_private(repo_id)``, ``.read_file(...)``, ``.request_log``.  Skipped when ``olah`` or ``git``
    is missing.
``hub_client`` (function scope)
    ``hub_server`` with the already-imported ``huggingface_hub``/``transformers`` of this process pointed
    at it (``HF_ENDPOINT``, ``HF_TOKEN`` = the valid token, a per-test ``HF_HOME`` cache); undone after
    the test.

Use them from a test module with ``from tests.helpers.hub_fixtures import hub_client, hub_server  # noqa: F401``, or
make them available everywhere by adding the same line to ``tests/conftest.py``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator

import pytest

from tests.helpers.hub_server import LocalHub, local_hub


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    missing = []
    if importlib.util.find_spec("olah") is None:
        missing.append("olah (pip install 'olah==0.5.4', part of lisa-peft[dev])")
    if shutil.which("git") is None:
        missing.append("the git executable")
    if missing:
        message = "the local test hub needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message + " -- CI installs it; a skip here would hide the Hub tests")
        pytest.skip(message)
    with local_hub(tmp_path_factory.mktemp("local-hub")) as hub:
        yield hub


@pytest.fixture
def hub_client(hub_server: LocalHub, monkeypatch: pytest.MonkeyPatch, tmp_path) -> LocalHub:
    hub_server.patch_client(monkeypatch, cache_dir=tmp_path / "hf-home")
    return hub_server
