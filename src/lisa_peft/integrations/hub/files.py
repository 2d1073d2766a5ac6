"""The files of a saved LiSA adapter: names, reading the config, checking the weights, fetching from a Hub.

A LiSA adapter is `adapter_config.json` + `adapter_model.safetensors` (+ `README.md`, the model card).
Pickle weights (`adapter_model.bin`) are refused everywhere: loading them can run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..registration import PEFT_TYPE_NAME
from .errors import (
    InvalidAdapterConfigError,
    MissingAdapterFileError,
    NotALisaAdapterError,
    UnsafeAdapterFormatError,
    translate_hub_errors,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
README_NAME = "README.md"
RESAVE_HINT = (
    "Re-save the adapter with model.save_pretrained(folder) (safe_serialization=True, the default), which writes "
    f"{CONFIG_NAME}, {WEIGHTS_NAME} and {README_NAME}."
)


def read_adapter_config(folder: Path, source: str) -> dict[str, Any]:
    """The raw adapter_config.json of `folder`, checked to be a LiSA adapter."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise MissingAdapterFileError(
            f"{source} has no {CONFIG_NAME}: it is not a PEFT adapter. Save a LiSA adapter with "
            "model.save_pretrained(folder), which writes adapter_config.json, adapter_model.safetensors and README.md."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise invalid_json_error(str(path), err) from err
    peft_type = raw.get("peft_type") if isinstance(raw, dict) else None
    if peft_type is None:
        raise NotALisaAdapterError(f"{source}: {CONFIG_NAME} has no peft_type, so it is not a PEFT adapter config.")
    if str(peft_type).upper() != PEFT_TYPE_NAME:
        raise NotALisaAdapterError(
            f"{source} is a {peft_type} adapter, not a LiSA adapter (peft_type {PEFT_TYPE_NAME!r}). Load it with "
            "peft.PeftModel.from_pretrained(base, ...) instead."
        )
    return raw


def invalid_json_error(path: str, err: json.JSONDecodeError) -> InvalidAdapterConfigError:
    """The error for an adapter_config.json at `path` that does not parse."""
    return InvalidAdapterConfigError(
        f"{path} is not valid JSON ({err.msg}), so the adapter cannot be loaded. The file is damaged or is not an "
        f"adapter config: restore it from the original adapter. {RESAVE_HINT}",
        err,
    )


def pickle_only_error(source: str) -> UnsafeAdapterFormatError:
    """The refusal of an adapter whose only weights are `adapter_model.bin`."""
    return UnsafeAdapterFormatError(
        f"{source} has only {PICKLE_WEIGHTS_NAME} (pickle) and no {WEIGHTS_NAME}. lisa-peft loads and uploads "
        f"LiSA adapters as safetensors only (pickle files can run code when loaded). {RESAVE_HINT}"
    )


def check_local_weights(folder: Path, source: str) -> None:
    """Raise unless `folder` holds `adapter_model.safetensors` (a pickle-only folder gets its own error)."""
    if (folder / WEIGHTS_NAME).is_file():
        return
    if (folder / PICKLE_WEIGHTS_NAME).is_file():
        raise pickle_only_error(source)
    raise MissingAdapterFileError(f"{source} has no {WEIGHTS_NAME} (the LiSA weights). {RESAVE_HINT}")


def fetch_adapter(adapter_id: str | os.PathLike, revision: str | None, token: str | bool | None) -> Path:
    """A local folder with the adapter's config and safetensors weights (downloaded from the Hub if needed)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    local = Path(adapter_id).expanduser()
    source = str(adapter_id)
    if local.is_dir():
        read_adapter_config(local, source)
        check_local_weights(local, source)
        return local
    with translate_hub_errors(source, revision, f"the adapter {source}"):
        try:
            config_path = Path(hf_hub_download(source, CONFIG_NAME, revision=revision, token=token))
        except RemoteEntryNotFoundError as err:
            raise MissingAdapterFileError(
                f"The Hub repo {source} (revision {revision or 'main'}) has no {CONFIG_NAME}: it is not a PEFT adapter."
            ) from err
    folder = config_path.parent  # .../snapshots/<commit>: fetch the weights of exactly that commit
    read_adapter_config(folder, source)
    download_weights(source, revision=folder.name, token=token)  # the weights of exactly that commit
    return folder


def download_weights(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    subfolder: str | None = None,
    **download_kwargs: Any,
) -> Path:
    """`adapter_model.safetensors` of a Hub repo (downloaded or from the cache); pickle-only repos are refused.

    download_kwargs: further `hf_hub_download` arguments (cache_dir, local_files_only, ...)."""
    from huggingface_hub import file_exists, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    where = f"{subfolder}/" if subfolder else ""
    with translate_hub_errors(repo_id, revision, f"the weights of {repo_id}"):
        try:
            return Path(hf_hub_download(
                repo_id, WEIGHTS_NAME, subfolder=subfolder, revision=revision, token=token, **download_kwargs
            ))
        except RemoteEntryNotFoundError as err:
            pickle_name = where + PICKLE_WEIGHTS_NAME
            if file_exists(repo_id, pickle_name, revision=revision, token=token):
                label = f"The Hub repo {repo_id}" + (f" (folder {subfolder})" if subfolder else "")
                raise pickle_only_error(label) from err
            raise MissingAdapterFileError(
                f"The Hub repo {repo_id} (revision {revision or 'main'}) has {where}{CONFIG_NAME} but no "
                f"{where}{WEIGHTS_NAME} (the LiSA weights). {RESAVE_HINT}"
            ) from err
