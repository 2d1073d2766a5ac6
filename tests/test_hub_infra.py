"""Uploading and downloading PEFT adapters through the real huggingface_hub client, against the offline
local test Hub on 127.0.0.1 (test infrastructure: tests/helpers/hub_server.py, tests/helpers/hub_commit_server.py,
fixtures in tests/helpers/hub_fixtures.py).

The adapter is a plain ``peft.LoraConfig`` for now; the project's own adapter type can be plugged into
``_adapter_model`` / ``_LOAD_SCRIPT`` later.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from huggingface_hub import CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import LoraConfig, PeftModel, get_peft_model

from tests.helpers.hub_fixtures import hub_client, hub_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.hub

ADAPTER_REPO = "test-org/tiny-adapter"
INPUT_IDS = [[5, 17, 3, 99, 42, 7, 64, 1, 120, 33]]
SUBPROCESS_TIMEOUT = 180


def _tiny_llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        intermediate_size=128,
        vocab_size=128,
    )


def _load_base(base_dir: Path) -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()


def _adapter_model(base_dir: Path, seed: int) -> PeftModel:
    """A LoRA adapter with random (non-identity) weights, so loading the wrong one changes the logits."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(_load_base(base_dir), config).eval()


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=torch.tensor(INPUT_IDS)).logits


# Runs in a FRESH interpreter whose environment (LocalHub.client_env) sets HF_ENDPOINT/HF_TOKEN/HF_HOME
# before huggingface_hub is imported -- the way a user's process sees the Hub.
_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, transformers
    import huggingface_hub.constants
    from peft import PeftModel

    base_dir, repo_id, out_path, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    input_ids = torch.tensor(json.loads(sys.argv[5]))
    torch.set_num_threads(threads)
    result = {"endpoint": huggingface_hub.constants.ENDPOINT}
    for name, revision in (("main", None), ("dev", "dev")):
        base = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
        model = PeftModel.from_pretrained(base, repo_id, revision=revision).eval()
        with torch.no_grad():
            result[name] = model(input_ids=input_ids).logits
    torch.save(result, out_path)
    """
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-base")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_tiny_llama_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def roundtrip(hub_server, base_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """push_to_hub (private repo, token from HF_TOKEN) to main and to branch "dev"; reload both elsewhere."""
    work = tmp_path_factory.mktemp("roundtrip")
    with pytest.MonkeyPatch.context() as mp:
        hub_server.patch_client(mp, cache_dir=work / "hf-home-push")
        log_start = len(hub_server.request_log)
        main_model = _adapter_model(base_dir, seed=1)
        main_commit = main_model.push_to_hub(ADAPTER_REPO, private=True)
        dev_model = _adapter_model(base_dir, seed=2)
        dev_commit = dev_model.push_to_hub(ADAPTER_REPO, revision="dev")
        push_log = hub_server.request_log[log_start:]
        expected = {
            "main": _logits(main_model),
            "dev": _logits(dev_model),
            "base": _logits(_load_base(base_dir)),
        }

    out_path = work / "loaded.pt"
    log_start = len(hub_server.request_log)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_SCRIPT,
            str(base_dir),
            ADAPTER_REPO,
            str(out_path),
            str(torch.get_num_threads()),
            json.dumps(INPUT_IDS),
        ],
        env=hub_server.client_env(hf_home=work / "hf-home-load"),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, f"loading in a fresh process failed:\n{proc.stderr[-6000:]}"
    return SimpleNamespace(
        expected=expected,
        loaded=torch.load(out_path),
        main_commit=main_commit,
        dev_commit=dev_commit,
        push_log=push_log,
        load_log=hub_server.request_log[log_start:],
    )


def test_push_to_hub_then_fresh_process_loads_identical_logits(roundtrip, hub_server):  # noqa: F811
    assert roundtrip.loaded["endpoint"] == hub_server.endpoint  # HF_ENDPOINT was honoured at import
    torch.testing.assert_close(roundtrip.loaded["main"], roundtrip.expected["main"], rtol=0, atol=0)
    # The adapter really changes the model (so the comparison above is meaningful).
    assert not torch.allclose(roundtrip.expected["main"], roundtrip.expected["base"])
    assert json.loads(hub_server.read_file(ADAPTER_REPO, "adapter_config.json"))["peft_type"] == "LORA"
    assert roundtrip.main_commit.oid == hub_server.store.resolve(ADAPTER_REPO, "main")


def test_revision_branch_pass_through(roundtrip, hub_server):  # noqa: F811
    torch.testing.assert_close(roundtrip.loaded["dev"], roundtrip.expected["dev"], rtol=0, atol=0)
    assert not torch.allclose(roundtrip.loaded["dev"], roundtrip.loaded["main"])
    branches = hub_server.store.branches(ADAPTER_REPO)
    assert set(branches) == {"main", "dev"}
    assert roundtrip.dev_commit.oid == branches["dev"] != branches["main"]
    dev_downloads = [e for e in roundtrip.load_log if e["path"].startswith(f"/{ADAPTER_REPO}/resolve/dev/")]
    assert dev_downloads and all(e["status"] == 200 for e in dev_downloads)


def test_push_used_hf_token_and_recorded_private_flag(roundtrip, hub_client):  # noqa: F811
    writes = [e for e in roundtrip.push_log if e["method"] == "POST" and e["path"] != "/api/validate-yaml"]
    paths = [e["path"] for e in writes]
    assert "/api/repos/create" in paths
    for action in ("preupload", "commit", "branch"):
        assert any(p.startswith(f"/api/models/{ADAPTER_REPO}/{action}/") for p in paths), (action, paths)
    assert all(e["auth"] == "valid" for e in writes)  # HF_TOKEN was sent as the bearer token
    assert hub_client.is_private(ADAPTER_REPO)
    assert HfApi().repo_info(ADAPTER_REPO).private is True
    # The fresh process could only download the private repo because it sent HF_TOKEN too.
    assert all(e["auth"] == "valid" for e in roundtrip.load_log)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(ADAPTER_REPO, "adapter_config.json", token=False)


def test_wrong_token_is_rejected_with_clear_error(hub_client, base_dir, monkeypatch, tmp_path):  # noqa: F811
    repo_id = hub_client.unique_repo_id("wrong-token")
    tip = hub_client.make_repo(repo_id, {"README.md": b"hello\n"})
    monkeypatch.setenv("HF_TOKEN", "hf_definitely_not_the_right_token")
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "weights.bin").write_bytes(b"\x01" * 64)
    with pytest.raises(HfHubHTTPError, match="Invalid credentials in Authorization header") as err:
        HfApi().upload_folder(repo_id=repo_id, folder_path=tmp_path / "up")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError, match="Invalid credentials in Authorization header"):
        _adapter_model(base_dir, seed=3).push_to_hub(repo_id)
    assert hub_client.store.resolve(repo_id, "main") == tip  # nothing was committed
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HfHubHTTPError, match="Authentication required"):
        HfApi().upload_folder(repo_id=repo_id, folder_path=tmp_path / "up")


def test_missing_repo_revision_and_file_errors(hub_client, base_dir):  # noqa: F811
    repo_id = hub_client.unique_repo_id("errors")
    hub_client.make_repo(repo_id, {"adapter_config.json": b"{}"})
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-org/does-not-exist", "adapter_config.json")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "adapter_model.safetensors")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "adapter_config.json", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().repo_info("test-org/does-not-exist")
    with pytest.raises(ValueError, match="adapter_config.json") as err:
        PeftModel.from_pretrained(_load_base(base_dir), "test-org/does-not-exist")
    # peft re-raises inside ``except`` (implicit chaining): the client's error is the context.
    assert isinstance(err.value.__cause__ or err.value.__context__, RepositoryNotFoundError)


def test_make_repo_then_download_and_snapshot(hub_client):  # noqa: F811
    repo_id = hub_client.unique_repo_id("snap")
    main_sha = hub_client.make_repo(repo_id, {"a.txt": b"main", "nested/b.bin": bytes(range(200))})
    dev_sha = hub_client.make_repo(repo_id, {"a.txt": b"dev"}, branch="dev")
    assert Path(hf_hub_download(repo_id, "a.txt")).read_bytes() == b"main"
    assert Path(hf_hub_download(repo_id, "a.txt", revision="dev")).read_bytes() == b"dev"
    snap = Path(snapshot_download(repo_id))
    assert snap.name == main_sha
    assert sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()) == [
        ".gitattributes",
        "a.txt",
        "nested/b.bin",
    ]
    assert (snap / "nested" / "b.bin").read_bytes() == bytes(range(200))
    assert Path(snapshot_download(repo_id, revision="dev")).name == dev_sha
    refs = HfApi().list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": main_sha, "dev": dev_sha}


def test_upload_folder_and_create_commit_write_real_git_commits(hub_client, tmp_path):  # noqa: F811
    repo_id = hub_client.unique_repo_id("upload")
    api = HfApi(endpoint=hub_client.endpoint)  # explicit endpoint works as well as HF_ENDPOINT
    assert api.create_repo(repo_id, private=False, exist_ok=True).repo_id == repo_id
    api.create_repo(repo_id, exist_ok=True)  # 409 -> exist_ok
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(repo_id)
    assert err.value.response.status_code == 409
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00\x01" * 300)
    (folder / "sub" / "notes.txt").write_text("notes")
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="first upload")
    assert info.oid == hub_client.store.resolve(repo_id, "main")
    assert hub_client.read_file(repo_id, "adapter_model.safetensors") == b"\x00\x01" * 300
    assert not hub_client.is_private(repo_id)

    api.create_branch(repo_id, branch="feature", exist_ok=True)
    api.create_commit(
        repo_id,
        operations=[CommitOperationDelete("sub/")],
        commit_message="drop sub",
        revision="feature",
        parent_commit=info.oid,
    )
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "sub/notes.txt", revision="feature")
    assert Path(hf_hub_download(repo_id, "sub/notes.txt")).read_text() == "notes"  # main untouched
