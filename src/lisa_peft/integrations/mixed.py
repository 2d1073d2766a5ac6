"""LiSA next to other adapter types: PEFT's mixed models cannot host LiSA, stacking can.

`PeftMixedModel` (`get_peft_model(..., mixed=True)`) dispatches a fixed list of weight-delta tuners (LoRA,
LoHa, LoKr, AdaLoRA, OFT, SHiRA) and cannot save; LiSA replaces the attention computation instead. LiSA
and LoRA share one model by stacking: LoRA's `get_peft_model` on the model that holds the LiSA layers
(README: "LiSA with LoRA"). `install_mixed_model_guard()` makes a LiSA config in a mixed model an error
that says so, instead of PEFT's bare "not compatible with PeftMixedModel".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .patching import wrap_method
from .registration import is_lisa_config

MIXED_MODEL_ERROR = (
    "LiSA cannot be part of a PeftMixedModel (get_peft_model(..., mixed=True)): PEFT's mixed models only combine "
    "weight-delta adapters (LoRA, LoHa, LoKr, AdaLoRA, OFT, SHiRA) and cannot save them, while LiSA replaces the "
    "attention computation. To use LiSA with LoRA, stack them: lisa = get_peft_model(base, LisaConfig(...)), then "
    "model = get_peft_model(lisa.get_base_model(), LoraConfig(...)); each adapter is saved in its own folder (see "
    "the README section 'LiSA with LoRA')."
)


def _refuse_lisa(original: Callable, config_position: int) -> Callable:
    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("peft_config", args[config_position] if len(args) > config_position else None)
        if is_lisa_config(config):
            raise ValueError(MIXED_MODEL_ERROR)
        return original(self, *args, **kwargs)

    return method


def install_mixed_model_guard() -> None:
    """Wrap `PeftMixedModel.__init__(model, peft_config, ...)` and `.add_adapter(name, peft_config)` (idempotent)."""
    from peft import PeftMixedModel

    wrap_method(PeftMixedModel, "__init__", lambda original: _refuse_lisa(original, 1))
    wrap_method(PeftMixedModel, "add_adapter", lambda original: _refuse_lisa(original, 1))
