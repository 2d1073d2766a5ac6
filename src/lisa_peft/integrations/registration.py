"""Register LiSA as a PEFT method without editing PEFT's source.

`register_lisa()` adds the `LISA` member to PEFT's `PeftType` (`tuners.lisa.peft_type`) and registers
`LisaConfig` / `LisaModel` with `register_peft_method`. Idempotent: importing `lisa_peft` twice (or
reloading it) does nothing the second time, and a reload that created new classes points PEFT at them.

This module sits right above the tuner package and below everything that hooks into PEFT, transformers
or the Hub (`lisa_peft.integrations.hub.hooks`, `lisa_peft.integrations.loading.hooks`,
`lisa_peft.integrations.mixed`), which
`lisa_peft/__init__.py` installs.
"""

from __future__ import annotations

from typing import Any

from ..tuners.lisa import LisaConfig, LisaModel
from ..tuners.lisa.peft_type import PEFT_TYPE_NAME, PREFIX, lisa_peft_type

__all__ = ["PEFT_TYPE_NAME", "PREFIX", "has_lisa_adapter", "is_lisa_config", "lisa_peft_type", "register_lisa"]


def is_lisa_config(config: Any) -> bool:
    """True if `config` (a PeftConfig or the dict of an adapter_config.json) is a LiSA adapter's."""
    peft_type = config.get("peft_type") if isinstance(config, dict) else getattr(config, "peft_type", None)
    return peft_type is not None and str(getattr(peft_type, "value", peft_type)).upper() == PEFT_TYPE_NAME


def has_lisa_adapter(model: Any) -> bool:
    """True if `model` (a PeftModel, or a transformers model with adapters) holds a LiSA adapter."""
    configs = getattr(model, "peft_config", None)
    return isinstance(configs, dict) and any(is_lisa_config(c) for c in configs.values())


def register_lisa() -> None:
    """Make `LISA` a registered PEFT method (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    peft_type = lisa_peft_type()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is LisaConfig:
        return
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING or peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        # A reload of lisa_peft created new classes: point PEFT at the current ones.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = LisaConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = LisaModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX
        return
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=LisaConfig, model_cls=LisaModel, prefix=PREFIX)
