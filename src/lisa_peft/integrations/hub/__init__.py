"""Pushing LiSA adapters to a Hugging Face Hub and loading them back (safetensors only, no remote code).

One module per job:

* `errors`: the error classes, and the translation of Hub / PEFT errors into them;
* `files`: the files of a saved adapter (reading the config, refusing pickle weights, fetching from a Hub);
* `compatibility`: `check_adapter_compatible(config, base_model)`;
* `load`: `from_pretrained(adapter_id)`: fetch the adapter, check it, load the base model named in its config
  and return the `PeftModel`;
* `push`: `push_adapter(adapter_dir, repo_id)` (CLI `lisa-peft push`) and `push_model_to_hub` (what
  `PeftModel.push_to_hub` runs for a LiSA model);
* `hooks`: `install_hub_hooks()`, the LiSA model card in `save_pretrained` and `push_to_hub`.
"""

from .compatibility import check_adapter_compatible
from .errors import (
    UNREGISTERED_HINT,
    AdapterNotFoundError,
    BaseModelLoadError,
    HubUnreachableError,
    IncompatibleAdapterError,
    InvalidAdapterConfigError,
    LisaAdapterError,
    LisaNotRegisteredError,
    MissingAdapterFileError,
    NotALisaAdapterError,
    UnsafeAdapterFormatError,
)
from .hooks import install_hub_hooks
from .load import from_pretrained
from .push import push_adapter, push_model_to_hub

__all__ = [
    "UNREGISTERED_HINT",
    "AdapterNotFoundError",
    "BaseModelLoadError",
    "HubUnreachableError",
    "IncompatibleAdapterError",
    "InvalidAdapterConfigError",
    "LisaAdapterError",
    "LisaNotRegisteredError",
    "MissingAdapterFileError",
    "NotALisaAdapterError",
    "UnsafeAdapterFormatError",
    "check_adapter_compatible",
    "from_pretrained",
    "install_hub_hooks",
    "push_adapter",
    "push_model_to_hub",
]
