"""Register LiSA as a PEFT method without editing PEFT's source.

PEFT's `register_peft_method` only accepts names that already exist in its closed `PeftType`
enum. `PeftType` is a `str`-valued `enum.Enum`; we add one member, `LISA`, through the enum's
own bookkeeping tables (`_member_map_`, `_value2member_map_`, `_member_names_`), which is what
`enum` itself fills when a class body defines a member. After that `PeftType("LISA")`,
`PeftType.LISA`, `"LISA" in list(PeftType)` and every PEFT lookup keyed by the enum work, and
`register_peft_method` accepts the name.

Both steps are idempotent: importing `lisa_peft` twice (or reloading it) does nothing the
second time. If a future PEFT release adds `LISA` to `PeftType` itself, the enum member is used
as is.

Model cards and `push_to_hub` (`install_hub_hooks`, called by `register_lisa`): PEFT writes README.md in
`PeftModel.save_pretrained` through `PeftModel.create_or_update_model_card(output_dir)`, a generic card.
transformers' `PushToHubMixin.push_to_hub` (which `PeftModel` inherits) then *overwrites* that README with
the repo's current card, or with a generic "transformers model" card for a new repo. We wrap both methods
once on `PeftModel`: for a model whose adapters are LiSA they write / upload the LiSA card
(`lisa_peft.model_card`, `lisa_peft.hub.push_model_to_hub`); for every other model they call PEFT's /
transformers' original unchanged. The wrappers remember the original (`__lisa_peft_original__`), so
re-importing or reloading lisa_peft re-wraps the original instead of stacking wrappers. If rendering the
LiSA card fails during `save_pretrained`, the wrapper warns and writes PEFT's card: a save never fails over
its README (PEFT writes the card before the weights).
"""

from __future__ import annotations

import enum
import functools
import warnings
from collections.abc import Callable
from typing import Any

from peft.utils import PeftType

PEFT_TYPE_NAME = "LISA"
PREFIX = "lisa_"


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add `name = value` to a str-valued Enum (no-op if present). Returns the member."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    # Class attribute first: EnumType.__setattr__ refuses names already in _member_map_.
    setattr(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def lisa_peft_type() -> PeftType:
    """The `PeftType.LISA` member (added on first call)."""
    return _add_enum_member(PeftType, PEFT_TYPE_NAME, PEFT_TYPE_NAME)


_ORIGINAL_ATTR = "__lisa_peft_original__"


def has_lisa_adapter(model: Any) -> bool:
    """True if `model` (a PeftModel) holds a LiSA adapter."""
    configs = getattr(model, "peft_config", None)
    return isinstance(configs, dict) and any(
        getattr(c, "peft_type", None) == PEFT_TYPE_NAME for c in configs.values()
    )


def _wrap_method(cls: type, name: str, make: Callable[[Callable], Callable]) -> None:
    """Set `cls.name = make(original)`; idempotent (an earlier wrapper is replaced, never stacked)."""
    current = getattr(cls, name)
    original = getattr(current, _ORIGINAL_ATTR, current)
    wrapper = make(original)
    setattr(wrapper, _ORIGINAL_ATTR, original)
    setattr(cls, name, wrapper)


def _card_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def create_or_update_model_card(self: Any, output_dir: str) -> None:
        if not has_lisa_adapter(self):
            return original(self, output_dir)
        from .model_card import write_model_card

        try:
            write_model_card(self, output_dir)
        except Exception as err:  # a save must not fail over its README
            warnings.warn(
                f"lisa-peft could not write the LiSA model card ({type(err).__name__}: {err}); "
                "PEFT's generic card was written instead.",
                stacklevel=3,
            )
            original(self, output_dir)
        return None

    return create_or_update_model_card


def _push_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def push_to_hub(self: Any, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        if not has_lisa_adapter(self):
            return original(self, repo_id, *args, **kwargs)
        from .hub import push_model_to_hub

        return push_model_to_hub(self, repo_id, *args, **kwargs)

    return push_to_hub


def install_hub_hooks() -> None:
    """Wrap `PeftModel.create_or_update_model_card` and `PeftModel.push_to_hub` for LiSA (idempotent)."""
    from peft import PeftModel

    _wrap_method(PeftModel, "create_or_update_model_card", _card_hook)
    _wrap_method(PeftModel, "push_to_hub", _push_hook)


def register_lisa() -> None:
    """Make `LISA` a registered PEFT method and install the model-card hooks (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .tuners.lisa import LisaConfig, LisaModel

    install_hub_hooks()
    peft_type = lisa_peft_type()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is LisaConfig:
        return
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING or peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        # A reload of lisa_peft created new classes: point PEFT at the current ones.
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = LisaConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = LisaModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX
        return
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=LisaConfig, model_cls=LisaModel, prefix=PREFIX)
