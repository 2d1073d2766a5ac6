"""Where the weights of an adapter are, for a local folder or a Hub repo (with PEFT's `subfolder`).

LiSA adapters are loaded from `adapter_model.safetensors` only: a folder or repo with only
`adapter_model.bin` is refused here, before PEFT or transformers would unpickle it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..hub.files import CONFIG_NAME, WEIGHTS_NAME, check_local_weights, download_weights


def hub_kwargs(*sources: dict[str, Any] | None) -> dict[str, Any]:
    """The `hf_hub_download` arguments (subfolder, revision, token, cache_dir, local_files_only, ...) among
    keyword-argument dicts: the same split PEFT makes, so a check looks where the loader will look."""
    import inspect

    from huggingface_hub import hf_hub_download

    names = set(inspect.signature(hf_hub_download).parameters) - {"repo_id", "filename"}
    found: dict[str, Any] = {}
    for source in sources:
        for key, value in (source or {}).items():
            if key in names and value is not None:
                found[key] = value
    return found


def _local_folder(model_id: str | os.PathLike, subfolder: str | None) -> Path | None:
    folder = Path(model_id).expanduser() / (subfolder or "")
    return folder if folder.is_dir() else None


def peek_adapter_config(model_id: str | os.PathLike, **kwargs: Any) -> dict[str, Any] | None:
    """The raw adapter_config.json of a folder / Hub repo, or None if it cannot be read (the loader then
    reports that itself)."""
    folder = _local_folder(model_id, kwargs.get("subfolder"))
    try:
        if folder is not None:
            path = folder / CONFIG_NAME
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(model_id), CONFIG_NAME, **kwargs))
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except Exception:
        return None
    return loaded if isinstance(loaded, dict) else None


def lisa_weights_file(model_id: str | os.PathLike, **kwargs: Any) -> str:
    """Path of the `adapter_model.safetensors` a loader will read; raises for a pickle-only or weightless
    adapter (`UnsafeAdapterFormatError`, `MissingAdapterFileError`)."""
    subfolder = kwargs.get("subfolder")
    folder = _local_folder(model_id, subfolder)
    if folder is not None:
        check_local_weights(folder, str(folder))
        return str(folder / WEIGHTS_NAME)
    return str(download_weights(str(model_id), **kwargs))
