"""Pushing LiSA adapters to a Hub: `push_adapter` (a saved folder; CLI `lisa-peft push`) and
`push_model_to_hub` (what `PeftModel.push_to_hub` runs for a LiSA model, see `hub.hooks`).

Both upload the LiSA model card as README.md, never a generic one, and safetensors weights only.
Tokens come from the usual huggingface_hub sources (`token=`, `HF_TOKEN`, the stored `hf auth login`),
the endpoint from `HF_ENDPOINT`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    AdapterNotFoundError,
    MissingAdapterFileError,
    auth_error,
    is_network_error,
    network_error,
    with_registration,
)
from .files import CONFIG_NAME, README_NAME, WEIGHTS_NAME, check_local_weights, read_adapter_config
from .load import resolve_alias
from .model_card import fill_repo_id, render_model_card, updated_card_text

if TYPE_CHECKING:
    from peft import PeftModel


def _upload(
    files: dict[str, bytes | str],
    repo_id: str,
    *,
    revision: str | None,
    private: bool | None,
    token: str | bool | None,
    commit_message: str,
    commit_description: str | None = None,
    create_pr: bool = False,
    create_repo: bool = True,
) -> Any:
    """Create the repo (and branch) if missing and commit `files` (path in repo -> bytes or local path)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    try:
        if create_repo:
            repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr") and not create_pr:
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files.items()]
        return api.create_commit(
            repo_id, operations=operations, commit_message=commit_message, commit_description=commit_description,
            token=token, revision=revision, create_pr=create_pr,
        )
    except Exception as err:
        if is_network_error(err):
            raise network_error(f"uploading to {repo_id}", err) from err
        hinted = auth_error(err)
        if hinted is not err:
            raise hinted from err
        raise


def _remote_readme(repo_id: str, revision: str | None, token: str | bool | None) -> str | None:
    """README.md of the repo at `revision` (a branch not yet created: main's), or None."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError, RevisionNotFoundError

    for rev in dict.fromkeys([revision, None]):
        try:
            return Path(hf_hub_download(repo_id, README_NAME, revision=rev, token=token)).read_text(encoding="utf-8")
        except RevisionNotFoundError:
            continue
        except RemoteEntryNotFoundError:
            return None
        except LocalEntryNotFoundError as err:
            raise network_error(f"reading the model card of {repo_id}", err) from err
    return None


def push_model_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = None,
    tags: list[str] | None = None,
) -> Any:
    """`PeftModel.push_to_hub` for LiSA models: same arguments and result (a `CommitInfo`), LiSA model card.

    The repo's README.md becomes the LiSA card (see `lisa_peft.integrations.hub.model_card.updated_card_text`:
    a hand-written card already in the repo is kept, with the LiSA tags added). Files at the root and adapter subfolders
    written by `save_pretrained` are uploaded in one commit; `revision` branches are created when missing.
    `max_shard_size` is accepted for signature compatibility (adapters are saved unsharded).
    """
    import tempfile

    from huggingface_hub import HfApi


    try:
        repo_id = HfApi().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    except Exception as err:
        if is_network_error(err):
            raise network_error(f"creating {repo_id}", err) from err
        hinted = auth_error(err)
        if hinted is not err:
            raise hinted from err
        raise
    existing = _remote_readme(repo_id, revision, token)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        card = updated_card_text(model, existing, repo_id=repo_id, tags=tags)
        Path(tmp, README_NAME).write_text(card, encoding="utf-8")
        files: dict[str, bytes | str] = {
            path.relative_to(tmp).as_posix(): str(path) for path in sorted(Path(tmp).rglob("*")) if path.is_file()
        }
        return _upload(
            files, repo_id, revision=revision, private=private, token=token,
            commit_message=commit_message or "Upload LiSA adapter", commit_description=commit_description,
            create_pr=create_pr, create_repo=False,
        )


def _card_for_folder(folder: Path, repo_id: str, token: str | bool | None) -> str:
    """The README.md to upload with the adapter in `folder` (rendered when the folder has none)."""

    path = folder / README_NAME
    if path.is_file():
        return fill_repo_id(path.read_text(encoding="utf-8"), repo_id)
    from peft import PeftConfig
    from transformers import AutoConfig

    config = with_registration(lambda: PeftConfig.from_pretrained(str(folder)))
    name = config.base_model_name_or_path
    try:
        if not name:
            raise ValueError("base_model_name_or_path is empty")
        base_config = AutoConfig.from_pretrained(resolve_alias(name), token=token, trust_remote_code=False)
    except Exception as err:
        raise MissingAdapterFileError(
            f"{folder} has no {README_NAME}, and the config of its base model {name!r} could not be loaded to write "
            f"the LiSA model card ({type(err).__name__}: {err}). Save the adapter with model.save_pretrained(folder), "
            "which writes the card, or add a README.md."
        ) from err
    return render_model_card(config, base_config, repo_id=repo_id)


def push_adapter(
    adapter_dir: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a saved LiSA adapter (config, safetensors weights, model card) to `repo_id`; return the commit URL.

    Refuses a folder that is not a LiSA adapter, or that has only pickle weights. The repo is created when
    missing (`private` applies then; an existing repo keeps its visibility), and so is the `revision` branch.
    A README.md in the folder is uploaded as it is (a lisa-peft card gets the repo id in its usage snippet);
    without one, the LiSA card is rendered from the adapter config and the base model's config.
    """
    folder = Path(adapter_dir).expanduser()
    if not folder.is_dir():
        raise AdapterNotFoundError(f"{adapter_dir} is not a folder (expected a saved LiSA adapter).")
    read_adapter_config(folder, str(adapter_dir))
    check_local_weights(folder, str(adapter_dir))
    card = _card_for_folder(folder, repo_id, token)
    files: dict[str, bytes | str] = {
        CONFIG_NAME: str(folder / CONFIG_NAME),
        WEIGHTS_NAME: str(folder / WEIGHTS_NAME),
        README_NAME: card.encode("utf-8"),
    }
    info = _upload(
        files, repo_id, revision=revision, private=private, token=token,
        commit_message=commit_message or "Upload LiSA adapter",
    )
    return str(info.commit_url)
