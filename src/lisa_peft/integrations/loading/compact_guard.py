"""A compact LiSA folder loads only into `LisaLlamaForCausalLM`: any other model class fails loudly.

A compact folder has no base W_q / W_k in its LiSA layers. `LlamaForCausalLM.from_pretrained(folder)` (or an
`AutoModelForCausalLM` forced to LLaMA with `config=LlamaConfig...`, or a config.json edited to `"llama"`)
would initialise them at random and ignore the LiSA tensors, with only a load report to show for it.
`install_compact_class_guard()` wraps transformers' `PreTrainedModel.from_pretrained`: for every class that is
not a `LisaLlamaForCausalLM`, it reads the folder's config.json (a local folder, or the file in the Hub cache;
nothing is downloaded) before loading, and looks at the loaded model's config after, and raises
`CompactModelClassError` when either describes a compact LiSA model. It runs after `import lisa_peft` only;
without the import no lisa-peft code runs at all (see `remote_code` for the Auto classes).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ...compact.lisa_llama.configuration_lisa_llama import LisaLlamaConfig
from ..patching import wrap_method

COMPACT_ARCHITECTURE = "LisaLlamaForCausalLM"


class CompactModelClassError(ValueError):
    """A compact LiSA checkpoint was loaded into a model class without LiSA layers."""


def compact_layers(config: Mapping[str, Any] | Any | None) -> list[int] | None:
    """The LiSA layers if `config` (a config.json dict or a config object) describes a compact LiSA model, else None.

    Recognised by any of: model_type "lisa_llama", architectures naming `LisaLlamaForCausalLM`, a non-empty
    `lisa_layers` (so a config.json whose model_type was edited to "llama" is still recognised).
    """
    if config is None:
        return None

    def get(key: str) -> Any:
        return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

    layers = get("lisa_layers")
    architectures = get("architectures") or []
    marked = (get("model_type") == LisaLlamaConfig.model_type or COMPACT_ARCHITECTURE in architectures
              or bool(layers))
    return sorted(int(i) for i in (layers or [])) if marked else None


def saved_config(source: Any, kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """config.json of `source` (a local folder, or a Hub repo already in the cache), or None if not at hand."""
    if source is None:
        return None
    subfolder = kwargs.get("subfolder") or ""
    try:
        path = Path(source, subfolder, "config.json")
        if not path.is_file():
            if os.path.exists(source):
                return None
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(
                str(source), f"{subfolder}/config.json" if subfolder else "config.json",
                cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision"),
            )
            if not isinstance(cached, str):
                return None
            path = Path(cached)
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except Exception:  # unreadable or not a repo id: transformers reports that itself
        return None
    return loaded if isinstance(loaded, dict) else None


def compact_class_error(cls: type, source: Any, layers: list[int]) -> CompactModelClassError:
    """The error for loading compact LiSA checkpoint `source` into `cls`."""
    return CompactModelClassError(
        f"{source} holds a compact LiSA model (saved by lisa-peft's merge_and_unload(), LiSA layers {layers}), "
        f"whose LiSA layers have no base q_proj / k_proj: {cls.__name__}.from_pretrained would initialise them at "
        f"random and ignore the LiSA weights. Load it with AutoModelForCausalLM.from_pretrained({str(source)!r}) or "
        "lisa_peft.LisaLlamaForCausalLM.from_pretrained(...) (no config= override). For the base model, load the base "
        "checkpoint named in its config.json (lisa_base_model)."
    )


def _guard(original: Callable) -> Callable:
    @functools.wraps(original)
    def from_pretrained(cls: type, pretrained_model_name_or_path: Any = None, *args: Any, **kwargs: Any) -> Any:
        from ...compact.lisa_llama.modeling_lisa_llama import LisaLlamaForCausalLM

        if issubclass(cls, LisaLlamaForCausalLM):
            return original(cls, pretrained_model_name_or_path, *args, **kwargs)
        layers = compact_layers(saved_config(pretrained_model_name_or_path, kwargs))
        if layers is not None:
            raise compact_class_error(cls, pretrained_model_name_or_path, layers)
        loaded = original(cls, pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        layers = compact_layers(getattr(model, "config", None))
        if layers is not None:
            raise compact_class_error(cls, pretrained_model_name_or_path, layers)
        return loaded

    return from_pretrained


def install_compact_class_guard() -> None:
    """Wrap `transformers.PreTrainedModel.from_pretrained` (idempotent)."""
    from transformers import PreTrainedModel

    wrap_method(PreTrainedModel, "from_pretrained", _guard)


__all__ = ["CompactModelClassError", "compact_class_error", "compact_layers", "install_compact_class_guard",
           "saved_config"]
