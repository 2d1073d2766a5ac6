"""Checks of a LiSA checkpoint (an adapter state dict) against the LiSA layers it is loaded into.

Loading must never silently change the model: PEFT and transformers load adapter weights with
`strict=False`, so a missing LiSA tensor would leave that layer at its init weights, an integer tensor
would be cast silently, and NaN/inf would turn every logit into NaN. `check_lisa_state_dict` refuses
all of these with an error that names the file (`checkpoint_source`), the tensors and the fix, and
warns about tensors that no LiSA layer of the adapter uses. The adapter's `modules_to_save` copies (a
classification head, `task_type="SEQ_CLS"`) must be in the checkpoint too: left out, the head would keep its
random init.

Keys are compared in checkpoint form: the module path without PEFT's `base_model.model.` prefix and
without the adapter name, e.g. `model.layers.3.self_attn.lisa_ffn_up.weight`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .layer import LisaAttention

PEFT_PREFIX = "base_model.model."
_SOURCE: ContextVar[str] = ContextVar("lisa_checkpoint_source", default="the LiSA adapter weights")
_SHOWN = 8  # tensors named per problem in a message


class LisaCheckpointError(ValueError):
    """A LiSA checkpoint does not fit the LiSA layers it is loaded into (missing/wrong tensors)."""


@contextmanager
def checkpoint_source(label: str) -> Iterator[None]:
    """Name the file being loaded (e.g. its path) in the errors and warnings raised inside the block."""
    token = _SOURCE.set(label)
    try:
        yield
    finally:
        _SOURCE.reset(token)


def checkpoint_key(key: str) -> str:
    """`key` without PEFT's `base_model.model.` prefix (a PeftModel has it, a base model with adapters not)."""
    return key.removeprefix(PEFT_PREFIX)


def expected_lisa_tensors(model: nn.Module, adapter_name: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of every LiSA weight of `adapter_name` in `model` (a PeftModel or a base model)."""
    expected = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, LisaAttention):
            continue
        for container_name in module.adapter_layer_names:
            container = getattr(module, container_name)
            if adapter_name not in container:
                continue
            for param_name, param in container[adapter_name].named_parameters():
                expected[checkpoint_key(f"{module_name}.{container_name}.{param_name}")] = tuple(param.shape)
    return expected


def expected_auxiliary_tensors(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """Saved checkpoint key -> the key PEFT loads it under, for the tensors of the modules that the LiSA config
    `adapter_name` lists in `modules_to_save`; a state dict holds either form, depending on the loader. (Wrappers
    of another adapter stacked on the same model, e.g. LoRA's, are not this adapter's.)"""
    configs = getattr(model, "peft_config", None)
    config = configs.get(adapter_name) if isinstance(configs, dict) else None
    names = list(getattr(config, "modules_to_save", None) or [])
    keys = {}
    for module_name, module in model.named_modules():
        short = checkpoint_key(module_name)
        if isinstance(module, AuxiliaryTrainingWrapper) and any(short == n or short.endswith(f".{n}") for n in names):
            for saved, loaded in module.adapter_state_dict_load_map(adapter_name).items():
                keys[checkpoint_key(f"{module_name}.{saved}")] = checkpoint_key(f"{module_name}.{loaded}")
    return keys


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def check_lisa_state_dict(model: nn.Module, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise `LisaCheckpointError` unless `state_dict` holds every LiSA tensor of `adapter_name`, each with the
    model's shape, a floating dtype and finite values; warn (naming them) about tensors the adapter does not use.

    state_dict: checkpoint keys (with or without `base_model.model.`), as saved by `save_pretrained`.
    """
    source = _SOURCE.get()
    expected = expected_lisa_tensors(model, adapter_name)
    found = {checkpoint_key(key): tensor for key, tensor in state_dict.items()}
    problems = []
    missing = sorted(set(expected) - set(found))
    if missing:
        problems.append(f"{len(missing)} LiSA tensor(s) are missing: {_listed(missing)}")
    auxiliary = expected_auxiliary_tensors(model, adapter_name)
    missing_auxiliary = sorted(k for k, loaded in auxiliary.items() if k not in found and loaded not in found)
    if missing_auxiliary:
        problems.append(f"{len(missing_auxiliary)} tensor(s) of `modules_to_save` are missing (they would keep their "
                        f"init): {_listed(missing_auxiliary)}")
    shapes = [f"{k} has shape {list(found[k].shape)}, the model needs {list(expected[k])}"
              for k in sorted(expected) if k in found and tuple(found[k].shape) != expected[k]]
    if shapes:
        problems.append("wrong shape: " + _listed(shapes))
    dtypes = [f"{k} is {found[k].dtype}" for k in sorted(expected) if k in found and not found[k].is_floating_point()]
    if dtypes:
        problems.append("not a floating-point tensor: " + _listed(dtypes))
    nonfinite = [k for k in sorted(expected) if k in found and found[k].is_floating_point()
                 and found[k].device.type != "meta" and not bool(torch.isfinite(found[k]).all())]
    if nonfinite:
        problems.append("NaN or inf values in " + _listed(nonfinite))
    if problems:
        raise LisaCheckpointError(
            f"{source} does not fit the LiSA adapter {adapter_name!r} and was not loaded: " + "; ".join(problems)
            + ". A layer left without its weights would silently run its init weights. The file is damaged, "
            "truncated or from another adapter: load the adapter it was saved with (its adapter_config.json), or "
            "re-save it from the trained model with model.save_pretrained(folder)."
        )
    unknown = sorted(set(found) - set(expected) - set(auxiliary) - set(auxiliary.values()))
    if unknown:
        warnings.warn(
            f"{source} holds {len(unknown)} tensor(s) that the LiSA adapter {adapter_name!r} does not use; they "
            f"were ignored: {_listed(unknown)}. Check that the file belongs to this adapter_config.json.",
            UserWarning,
            stacklevel=2,
        )
