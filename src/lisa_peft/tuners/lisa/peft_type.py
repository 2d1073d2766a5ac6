"""`PeftType.LISA`: the member that names the LiSA method in PEFT's closed `PeftType` enum.

PEFT's `register_peft_method` only accepts names that already exist in `PeftType`, a `str`-valued
`enum.Enum`. We add one member, `LISA`, through the enum's own bookkeeping tables (`_member_map_`,
`_value2member_map_`, `_member_names_`), which is what `enum` itself fills when a class body defines
a member. After that `PeftType("LISA")`, `PeftType.LISA` and every PEFT lookup keyed by the enum work.
Idempotent; if a future PEFT release adds `LISA` itself, its member is used as is.

This lives in the tuner package because `LisaConfig` needs the member; registering the method with
PEFT's mappings (`lisa_peft.integrations.registration`) sits above the tuner.
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
