"""Loading a LiSA adapter together with its base model: `from_pretrained` (local folder or Hub repo).

Only safetensors weights are read (adapter and base), never pickle; no remote code runs. The adapter's
files are fetched and checked by `hub.files`, its fit to the base by `hub.compatibility`; PEFT loads the
weights (through the loading guards of `lisa_peft.integrations.loading`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ...tuners.lisa import LisaConfig
from .compatibility import check_adapter_compatible
from .errors import (
    BaseModelLoadError,
    NotALisaAdapterError,
    UnsafeAdapterFormatError,
    is_network_error,
    network_error,
    with_registration,
)
from .files import fetch_adapter

if TYPE_CHECKING:
    from peft import PeftModel


def resolve_alias(name: str) -> str:
    """`name`, or the local folder of a project alias (`lisa_peft.pipeline.base_models`, imported lazily)."""
    try:
        from ...pipeline.base_models import DEMO_MODEL, resolve_base_model
    except ImportError:  # pragma: no cover - the module comes with another issue
        return name
    if name.strip().lower() == DEMO_MODEL:
        return resolve_base_model(name)
    return name


def _load_base_model(config: Any, base_model: Any, dtype: Any, token: str | bool | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(base_model, torch.nn.Module):
        return base_model
    name = base_model or config.base_model_name_or_path
    if not name:
        raise BaseModelLoadError(
            "The adapter's config does not name its base model (base_model_name_or_path is empty): pass "
            "base_model=... (a Hub id, a local folder or a loaded model)."
        )
    name = str(name)
    kwargs: dict[str, Any] = {"token": token, "trust_remote_code": False, "use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if base_model is None and config.revision:
        kwargs["revision"] = config.revision
    try:
        path = resolve_alias(name)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as err:
        if is_network_error(err) or is_network_error(err.__cause__ or err):
            raise network_error(f"the base model {name}", err) from err
        origin = "passed as base_model" if base_model is not None else "named in adapter_config.json"
        raise BaseModelLoadError(
            f"Could not load the base model {name!r} ({origin}; safetensors weights, no remote code): "
            f"{type(err).__name__}: {err}. Pass base_model=... (a Hub id, a local folder or a loaded model)."
        ) from err
    return model.eval()


def from_pretrained(
    adapter_id: str | os.PathLike,
    *,
    revision: str | None = None,
    base_model: Any = None,
    dtype: Any = None,
    token: str | bool | None = None,
    **kwargs: Any,
) -> PeftModel:
    """Load a LiSA adapter (local folder or Hub repo) together with its base model -> `PeftModelForCausalLM`.

    base_model: None = `base_model_name_or_path` from the adapter config (the project's demo alias
        "smollm2-135m-instruct" resolves through `lisa_peft.pipeline.base_models`); or a Hub id / folder;
        or a loaded model.
    dtype: dtype of the base model (e.g. torch.float16); default: transformers' default.
    kwargs: passed to `PeftModel.from_pretrained` (adapter_name, is_trainable, ...).

    Only safetensors weights are read (adapter and base), never pickle; no remote code runs.
    """
    from peft import PeftConfig, PeftModelForCausalLM


    if kwargs.pop("trust_remote_code", False):
        raise UnsafeAdapterFormatError("lisa_peft.from_pretrained never runs remote code (trust_remote_code=True).")
    if kwargs.pop("use_safetensors", True) is False:
        raise UnsafeAdapterFormatError("lisa_peft.from_pretrained loads safetensors only (use_safetensors=False).")
    folder = fetch_adapter(adapter_id, revision, token)
    config = with_registration(lambda: PeftConfig.from_pretrained(str(folder)))
    if not isinstance(config, LisaConfig):  # pragma: no cover - peft_type was checked on the raw JSON
        raise NotALisaAdapterError(f"{adapter_id} is a {config.peft_type} adapter, not a LiSA adapter.")
    base = _load_base_model(config, base_model, dtype, token)
    check_adapter_compatible(config, base)
    return with_registration(
        lambda: PeftModelForCausalLM.from_pretrained(base, str(folder), config=config, **kwargs)
    )
