"""Continuous batching (transformers' paged KV cache) is refused for LiSA models before anything runs.

transformers' continuous batching (`generate(cache_implementation="paged")`, `generate_batch`,
`init_continuous_batching`, `transformers serve` with continuous batching) stores the keys of every
layer in one paged cache at the base model's head size and attends with its paged attention functions.
LiSA layers cache r-wide low-rank keys and compute their scores from the previous layer's logits, which
that cache and those functions do not provide. The generation loop runs in a background thread that
only logs a failing forward, so without this guard the call returned the prompt with nothing generated.

All three entry points go through the model's `init_continuous_batching`. The PEFT form gets a guard
in its instance dictionary while a LiSA adapter is injected (`install_guard` / `remove_guard`); it
refuses only while a LiSA layer is active (with the adapter disabled the base model runs as usual). The
compact model class refuses in its own method.
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from . import transformers_compat as compat

_ATTR = "init_continuous_batching"


def refusal(model_kind: str) -> ValueError:
    """The error for continuous batching on a LiSA model (`model_kind`: "PEFT" or "compact")."""
    disable = (
        " With the adapter disabled (`with model.disable_adapter():`) the base model runs continuous batching."
        if model_kind == "PEFT" else ""
    )
    return ValueError(
        "LiSA models do not support transformers' continuous batching (generate(cache_implementation='paged'), "
        "generate_batch, init_continuous_batching, `transformers serve` with continuous batching): its paged KV "
        "cache holds every layer's keys at the base model's head size and attends with paged attention "
        "functions, while LiSA layers cache r-wide low-rank keys and compute their scores from the previous "
        f"layer's logits. Use model.generate with {compat.WORKING_CACHES}; batch several prompts as one "
        f"left-padded batch (tokenizer(..., padding=True) with padding_side='left').{disable}"
    )


def lisa_layers_active(model: nn.Module) -> bool:
    """Whether a LiSA adapter's layers (LiSA or anchor) run in `model`'s forward now."""
    from .layer import LisaAttention

    return any(isinstance(m, LisaAttention) and m._active_role()[1] is not None for m in model.modules())


def _guarded_init_continuous_batching(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """transformers' `init_continuous_batching`, refused while LiSA layers are active."""
    if lisa_layers_active(self):
        raise refusal("PEFT")
    return getattr(type(self), _ATTR)(self, *args, **kwargs)


def install_guard(model: nn.Module) -> None:
    """Put the guard on `model` (a transformers model with LiSA layers injected) if it can batch continuously."""
    if hasattr(type(model), _ATTR):
        setattr(model, _ATTR, types.MethodType(_guarded_init_continuous_batching, model))


def remove_guard(model: nn.Module) -> None:
    """Take the guard off again (the adapter was unloaded or deleted)."""
    model.__dict__.pop(_ATTR, None)


__all__ = ["install_guard", "lisa_layers_active", "refusal", "remove_guard"]
