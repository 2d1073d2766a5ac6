"""Optional dependencies: which `pip install 'lisa-peft[EXTRA]'` brings a feature's packages.

The core install (`pip install lisa-peft`) covers the PEFT method itself: config, tuner, save/load, Hub,
compact model and generation. Features that need more import their packages through `require`, so a
missing one raises an error that names the extra to install instead of a bare `ModuleNotFoundError`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Extra -> the packages it installs (kept in step with setup.cfg's [options.extras_require]; a test checks).
EXTRAS: dict[str, tuple[str, ...]] = {
    "demo": ("gguf",),
    "plot": ("matplotlib",),
    "data": ("datasets",),
    "eval": ("evaluate", "lm_eval", "datasets"),
    "triton": ("triton",),
}


class MissingExtraError(ImportError):
    """A feature's optional package is not installed; the message names the extra that brings it."""


def install_hint(extra: str) -> str:
    """The pip command that installs `extra`."""
    if extra not in EXTRAS:
        raise ValueError(f"Unknown extra {extra!r}; known extras: {', '.join(EXTRAS)}.")
    return f"pip install 'lisa-peft[{extra}]'"


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module` for `feature`, or raise `MissingExtraError` naming `extra` (the fix)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{feature} needs the `{module.split('.')[0]}` package, which is not installed. "
            f"Install it with: {install_hint(extra)}"
        ) from err
