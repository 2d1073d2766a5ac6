"""From a LiSA `PeftModel` to the compact model: what `merge_and_unload()` returns.

`merge_lisa_adapter` builds a `LisaLlamaForCausalLM` (lisa_peft.compact.lisa_llama) from one LiSA adapter:
the base model's tensors, minus the base W_q / W_k of the LiSA layers, plus that adapter's LiSA weights. The
compact model is built on the meta device and takes the PEFT model's tensors as they are (no copy), so
merging costs no extra memory; the `PeftModel` itself is left unchanged (it still switches back to the base
model) and shares those tensors. Drop the `PeftModel` to free the unused base Q/K.

`CompactSizes` / `compact_sizes` measure parameter bytes: base, adapter form (base + LiSA weights) and
compact form, and the Q/K compression factor head_dim / r of the LiSA layers.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..tuners.lisa.config import LisaConfig
from ..tuners.lisa.layer import LisaAttention
from ..tuners.lisa.model import register_compact_builder
from .lisa_llama import LisaLlamaConfig, LisaLlamaForCausalLM
from .lisa_llama.configuration_lisa_llama import LISA_MODULE_NAMES
from .lisa_llama.sizes import CompactSizes, compact_sizes, dropped_qk_bytes, parameter_bytes

_ATTN_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.(?P<idx>\d+)\.self_attn\.)(?P<rest>.*)$")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def resolve_adapter(tuner: Any, adapter_names: list[str] | str | None) -> str:
    """The one LiSA adapter to merge: the only one, or the one named; a clear error otherwise."""
    names = list(tuner.peft_config)
    active = list(getattr(tuner, "active_adapters", None) or names)
    if adapter_names is None:
        if len(names) == 1:
            return names[0]
        raise ValueError(
            f"This model holds {len(names)} LiSA adapters {names} (active: {active}); the compact model realises "
            f"exactly one. Name it: merge_and_unload(adapter_names=[{active[0]!r}])."
        )
    requested = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if len(requested) != 1:
        raise ValueError(
            f"merge_and_unload(adapter_names={requested}): LiSA replaces attention, so exactly one LiSA adapter can "
            f"be merged into a compact model. Pick one of {names}, e.g. adapter_names=[{names[0]!r}]."
        )
    if requested[0] not in tuner.peft_config:
        raise ValueError(f"No adapter named {requested[0]!r} in this model; its adapters are {names}.")
    if not isinstance(tuner.peft_config[requested[0]], LisaConfig):
        raise ValueError(f"Adapter {requested[0]!r} is not a LiSA adapter.")
    return requested[0]


def check_only_lisa(model: nn.Module) -> None:
    """Refuse a model that also holds layers of another PEFT method (e.g. LoRA under the LiSA adapter)."""
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and not isinstance(module, LisaAttention):
            adapters = list(getattr(module, "active_adapters", []) or [])
            raise ValueError(
                f"The model also holds layers of another PEFT method ({type(module).__name__} at {name!r}, adapters "
                f"{adapters}). merge_and_unload() builds the compact LiSA model from one LiSA adapter on a plain base "
                "model: first merge the other adapter into the base (its own merge_and_unload()) or unload it, then "
                "apply and merge the LiSA adapter."
            )


def compact_config(base_config: Any, lisa: LisaConfig, lisa_dtype: torch.dtype, base_dtype: torch.dtype,
                   base_name: str | None) -> LisaLlamaConfig:
    """The `LisaLlamaConfig` of the compact model: the base config plus the adapter's LiSA fields."""
    values = base_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        values.pop(key, None)
    config = LisaLlamaConfig.from_dict({
        **values,
        "lisa_layers": list(lisa.lisa_layers),
        "lisa_r": lisa.r,
        "lisa_layer_ranks": dict(lisa.layer_ranks) if lisa.layer_ranks else None,
        "lisa_ffn_hidden": lisa.ffn_hidden,
        "lisa_share": lisa.share,
        "lisa_kernel": lisa.kernel,
        "lisa_rotary_planes": {str(k): v for k, v in lisa.rotary_planes.items() if int(k) in lisa.lisa_layers},
        "lisa_dtype": _DTYPE_NAMES[lisa_dtype] if lisa_dtype != base_dtype else None,
        "lisa_base_model": base_name,
    })
    config.architectures = [LisaLlamaForCausalLM.__name__]
    config._attn_implementation = getattr(base_config, "_attn_implementation", None)
    return config


def check_causal_lm(model: nn.Module, lisa: LisaConfig) -> None:
    """Refuse a base model that is not a causal LM: the compact model is a `LisaLlamaForCausalLM`."""
    if callable(getattr(model, "prepare_inputs_for_generation", None)) and hasattr(model, "lm_head"):
        return
    task = getattr(lisa.task_type, "value", lisa.task_type)
    raise ValueError(
        f"merge_and_unload() builds the compact causal LM (LisaLlamaForCausalLM), but this LiSA adapter sits on a "
        f"{type(model).__name__} (task_type={task!r}), which has no compact form. Keep the PeftModel and save the "
        "adapter with model.save_pretrained(folder) (it holds the LiSA weights and the trained head), or get the base "
        "model back with model.unload()."
    )


def compact_key(key: str, adapter: str, lisa_layers: set[int]) -> str | None:
    """Name in the compact model of a PEFT-model tensor (None: not part of it). A `modules_to_save` module
    becomes the adapter's trained copy."""
    owner, found, rest = key.partition(".modules_to_save.")
    if found:  # keep this adapter's trained copy, drop other adapters' copies
        if not rest.startswith(f"{adapter}."):
            return None
        return compact_key(f"{owner}.{rest[len(adapter) + 1:]}", adapter, lisa_layers)
    if ".original_module." in key:
        return None  # the untrained original of a modules_to_save module
    match = _ATTN_KEY.match(key)
    if match is None:
        return key
    prefix, rest, idx = match["prefix"], match["rest"], int(match["idx"])
    if rest.startswith("base_layer."):
        rest = rest[len("base_layer."):]
        if idx in lisa_layers and rest.split(".")[0] in ("q_proj", "k_proj"):
            return None  # the base W_q / W_k a LiSA layer never reads
        return prefix + rest
    for name in (*LISA_MODULE_NAMES, "lisa_rotary"):
        if rest.startswith(f"{name}.{adapter}."):
            leaf = rest[len(name) + len(adapter) + 2:]
            return prefix + (f"{name}.{leaf}" if name != "lisa_rotary" else "lisa_rotary_index")
    if rest.startswith("lisa_"):
        return None  # another adapter's LiSA weights
    return prefix + rest


@torch.no_grad()
def merge_lisa_adapter(
    tuner: Any, adapter_names: list[str] | str | None = None, safe_merge: bool = False
) -> LisaLlamaForCausalLM:
    """The compact model of one LiSA adapter of `tuner` (a `LisaModel`) -> `LisaLlamaForCausalLM`.

    safe_merge: also check that the LiSA weights are finite (raises ValueError on NaN/inf).
    """
    adapter = resolve_adapter(tuner, adapter_names)
    model = tuner.model
    check_only_lisa(model)
    lisa = tuner.peft_config[adapter]
    check_causal_lm(model, lisa)
    layers = set(lisa.lisa_layers)
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        name = compact_key(key, adapter, layers)
        if name is not None:
            tensors[name] = tensor.detach()
    if safe_merge:
        bad = [k for k, t in tensors.items()
               if ".lisa_" in k and t.is_floating_point() and not bool(t.isfinite().all())]
        if bad:
            raise ValueError(f"safe_merge: the LiSA weights of adapter {adapter!r} hold NaN/inf values: {bad[:8]}.")
    probe = next(k for k in tensors if ".lisa_q_proj." in k)
    base_dtype = tensors[probe.replace("lisa_q_proj", "v_proj")].dtype
    base_name = lisa.base_model_name_or_path or getattr(model.config, "_name_or_path", None) or None
    config = compact_config(model.config, lisa, tensors[probe].dtype, base_dtype, base_name)
    with torch.device("meta"):
        compact = LisaLlamaForCausalLM(config)
    expected = {k for k, _ in compact.named_parameters(remove_duplicate=False)}
    expected |= {k for k, _ in compact.named_buffers(remove_duplicate=False)}
    missing, extra = expected - set(tensors), set(tensors) - expected
    if missing or extra:  # pragma: no cover - a programming error, not a user error
        raise RuntimeError(f"Compact model layout mismatch: missing {sorted(missing)}, unexpected {sorted(extra)}.")
    for name, tensor in tensors.items():
        _assign(compact, name, tensor)
    compact.tie_weights()
    retied = sorted(name for name, tensor in tensors.items()
                    if _tensor_at(compact, name).data_ptr() != tensor.data_ptr())
    if retied:
        raise ValueError(
            f"The compact model ties {retied} to other weights (tie_word_embeddings=True), which would drop the "
            f"adapter's trained copies (modules_to_save={lisa.modules_to_save}). Train the head untied, or keep the "
            "PeftModel."
        )
    compact.generation_config = copy.deepcopy(model.generation_config)
    return compact.eval()


def _tensor_at(model: nn.Module, name: str) -> torch.Tensor:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    found = owner._parameters.get(leaf)
    return found if found is not None else owner._buffers[leaf]


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` (shared, not copied) at parameter / buffer `name` of `model`."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


# ---------------------------------------------------------------------------------------------- sizes
__all__ = [
    "CompactSizes",
    "check_causal_lm",
    "check_only_lisa",
    "compact_config",
    "compact_key",
    "compact_sizes",
    "dropped_qk_bytes",
    "merge_lisa_adapter",
    "parameter_bytes",
    "resolve_adapter",
]


register_compact_builder(merge_lisa_adapter)
