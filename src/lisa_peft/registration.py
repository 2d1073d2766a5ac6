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
"""

from __future__ import annotations

import enum

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


def register_lisa() -> None:
    """Make `LISA` a registered PEFT method (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .tuners.lisa import LisaConfig, LisaModel

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
