"""`install_loading_guards()`: the wrappers that make every loading path check LiSA adapters (idempotent).

* `PeftConfigMixin.from_json_file` (every PEFT / transformers path reads adapter_config.json through it):
  broken JSON -> `InvalidAdapterConfigError`; unknown keys of a LiSA config -> warning (`config_file`).
* `PeftModel.load_adapter` (behind `PeftModel.from_pretrained`, `AutoPeftModel*`, `PeftMixedModel.load_adapter`,
  `lisa_peft.from_pretrained`): for a LiSA adapter, refuse a pickle-only / weightless folder before PEFT reads
  it, and name the file in the tensor checks that `LisaModel._remap_adapter_state_dict_for_load` runs.
* transformers' `PeftAdapterMixin.load_adapter` (`base.load_adapter(...)`): for a LiSA adapter, read the
  safetensors file here (transformers would fall back to the pickle) and hand it over as `adapter_state_dict`;
  check the tensors; an adapter that fails is removed again before the error is raised.

Other adapter types pass through unchanged.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from typing import Any

from ...tuners.lisa import transformers_compat
from ...tuners.lisa.checkpoint import LisaCheckpointError, check_lisa_state_dict, checkpoint_source
from ...tuners.lisa.model import remove_lisa_adapter
from ..hub.files import invalid_json_error
from ..patching import wrap_method
from ..registration import is_lisa_config
from .config_file import drop_unknown_lisa_keys
from .weights import hub_kwargs, lisa_weights_file, peek_adapter_config


def _config_file_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def from_json_file(cls: type, path_json_file: str, **kwargs: Any) -> dict[str, Any]:
        try:
            loaded = original(cls, path_json_file, **kwargs)
        except json.JSONDecodeError as err:
            raise invalid_json_error(str(path_json_file), err) from err
        return drop_unknown_lisa_keys(str(path_json_file), loaded)

    return from_json_file


def _peft_load_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_adapter(self: Any, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        download = hub_kwargs(kwargs)
        config = self.peft_config.get(adapter_name) or peek_adapter_config(model_id, **download)
        if not is_lisa_config(config):
            return original(self, model_id, adapter_name, *args, **kwargs)
        weights = lisa_weights_file(model_id, **download)  # refuses adapter_model.bin before PEFT reads it
        is_new = adapter_name not in self.peft_config
        with checkpoint_source(weights):
            try:
                return original(self, model_id, adapter_name, *args, **kwargs)
            except LisaCheckpointError:
                if is_new and adapter_name in self.peft_config:
                    self.delete_adapter(adapter_name)
                raise

    return load_adapter


def _check_loaded(model: Any, adapter_name: str, state_dict: dict, source: str) -> None:
    """Check the tensors just loaded into a transformers model; take the adapter out again if they do not fit
    (transformers' own `delete_adapter` needs a newer PEFT)."""
    try:
        with checkpoint_source(source):
            check_lisa_state_dict(model, adapter_name, state_dict)
    except LisaCheckpointError:
        remove_lisa_adapter(model, adapter_name)
        configs = getattr(model, "peft_config", None) or {}
        configs.pop(adapter_name, None)
        if not configs and hasattr(model, "peft_config"):
            del model.peft_config
            model._hf_peft_config_loaded = False
        raise


def _transformers_load_hook(original: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_adapter(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        arguments = bound.arguments
        extra = arguments.get("kwargs") or {}
        named = {"local_files_only": arguments.get("local_files_only") or None}
        download = hub_kwargs(extra, arguments.get("adapter_kwargs"), named)
        model_id = arguments.get("peft_model_id")
        config = arguments.get("peft_config") or (peek_adapter_config(model_id, **download) if model_id else None)
        if not is_lisa_config(config):
            return original(*bound.args, **bound.kwargs)
        from safetensors.torch import load_file

        adapter_name = arguments.get("adapter_name") or "default"
        state_dict = arguments.get("adapter_state_dict")
        source = "the adapter_state_dict passed to load_adapter"
        if state_dict is None:
            source = lisa_weights_file(model_id, **download)  # refuses adapter_model.bin
            state_dict = load_file(source)
            arguments["adapter_state_dict"] = state_dict  # transformers reads no file itself
        existed = adapter_name in (getattr(self, "peft_config", None) or {})
        try:
            result = original(*bound.args, **bound.kwargs)
        except Exception:
            if not existed and adapter_name in (getattr(self, "peft_config", None) or {}):
                _check_loaded(self, adapter_name, state_dict, source)  # ours names the cause, if it is one
            raise
        _check_loaded(self, adapter_name, state_dict, source)
        return result

    return load_adapter


def install_loading_guards() -> None:
    """Wrap PEFT's and transformers' loading entry points for LiSA adapters (idempotent)."""
    from peft import PeftModel
    from peft.config import PeftConfigMixin

    wrap_method(PeftConfigMixin, "from_json_file", _config_file_hook)
    wrap_method(PeftModel, "load_adapter", _peft_load_hook)
    wrap_method(transformers_compat.peft_adapter_mixin(), "load_adapter", _transformers_load_hook)
