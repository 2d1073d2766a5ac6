"""Idempotent method wrapping, used by the hooks lisa-peft installs on PEFT and transformers classes.

A wrapper remembers the original (`__lisa_peft_original__`), so re-importing or reloading lisa_peft
re-wraps the original instead of stacking wrappers, and tests can reach the original.
"""

from __future__ import annotations

from collections.abc import Callable

ORIGINAL_ATTR = "__lisa_peft_original__"


def original_of(function: Callable) -> Callable:
    """The unwrapped function behind a lisa-peft wrapper (the function itself if it is none)."""
    return getattr(function, ORIGINAL_ATTR, function)


def wrap_method(cls: type, name: str, make: Callable[[Callable], Callable]) -> None:
    """Set `cls.name = make(original)`; an earlier lisa-peft wrapper is replaced, never stacked.

    A classmethod stays a classmethod (`make` gets and returns the plain function taking `cls`).
    """
    current = cls.__dict__.get(name, getattr(cls, name))
    if isinstance(current, classmethod):
        original = original_of(current.__func__)
        wrapper = make(original)
        setattr(wrapper, ORIGINAL_ATTR, original)
        setattr(cls, name, classmethod(wrapper))
        return
    original = original_of(current)
    wrapper = make(original)
    setattr(wrapper, ORIGINAL_ATTR, original)
    setattr(cls, name, wrapper)
