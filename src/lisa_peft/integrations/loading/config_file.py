"""Reading adapter_config.json: warnings for keys a LiSA config does not know (broken JSON: `hub.files`)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from ...tuners.lisa import LisaConfig
from ..registration import is_lisa_config

# Keys PEFT itself writes next to the config fields (or reads and drops) when saving / loading.
_PEFT_EXTRA_KEYS = frozenset({"runtime_config"})


def lisa_config_keys() -> frozenset[str]:
    """Every key a LiSA adapter_config.json may hold."""
    return frozenset(field.name for field in dataclasses.fields(LisaConfig)) | _PEFT_EXTRA_KEYS


def drop_unknown_lisa_keys(path: str, loaded: dict[str, Any]) -> dict[str, Any]:
    """For a LiSA config: warn about (naming them) and remove keys that LisaConfig does not know."""
    if not isinstance(loaded, dict) or not is_lisa_config(loaded):
        return loaded
    unknown = sorted(set(loaded) - lisa_config_keys())
    if unknown:
        warnings.warn(
            f"{path} holds keys that a LiSA config does not know; they were ignored: {unknown}. If the adapter was "
            "saved by a newer lisa-peft, upgrade lisa-peft; otherwise remove the keys (a typo does not configure "
            "anything).",
            UserWarning,
            stacklevel=4,
        )
        loaded = {key: value for key, value in loaded.items() if key not in unknown}
    return loaded
