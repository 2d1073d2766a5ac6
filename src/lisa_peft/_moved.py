"""Module paths from before the sub-packages, kept for code that imports them (`from lisa_peft.fidelity import ...`).

`install()` (run by `import lisa_peft`) adds an import hook that answers an old name with the module at its new
place: the very same module object (``lisa_peft.fidelity is lisa_peft.evaluation.fidelity``), imported only when
the old name is asked for, so an optional dependency of a moved module is still needed only by its users.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

# old module (or package: its submodules follow) -> new module, relative to lisa_peft
MOVED = {
    "base_models": "pipeline.base_models",
    "calibration": "pipeline.calibration",
    "convert": "pipeline.convert",
    "data": "pipeline.data",
    "recipe": "pipeline.recipe",
    "recipe_files": "pipeline.recipe_files",
    "sampled_corpus": "pipeline.sampled_corpus",
    "training": "pipeline.training",
    "analysis": "evaluation.analysis",
    "fidelity": "evaluation.fidelity",
    "generation_check": "evaluation.generation_check",
    "lm_eval_model": "evaluation.lm_eval_model",
    "memory": "evaluation.memory",
    "metrics": "evaluation.metrics",
    "zero_shot": "evaluation.zero_shot",
    "hub": "integrations.hub",
    "model_card": "integrations.hub.model_card",
    "transformers_compat": "tuners.lisa.transformers_compat",
    "growing_cache": "tuners.lisa.growing_cache",
    "models": "compact",
    "models.lisa_llama": "compact.lisa_llama",
}


def new_name(fullname: str, package: str = __package__) -> str | None:
    """The current name of the old module `fullname` ("lisa_peft.x.y"), or None when it did not move."""
    prefix = package + "."
    if not fullname.startswith(prefix):
        return None
    old = fullname[len(prefix):]
    for moved in sorted(MOVED, key=len, reverse=True):
        if old == moved or old.startswith(moved + "."):
            return prefix + MOVED[moved] + old[len(moved):]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.spec  # the import machinery set the old name's spec: the module keeps its own


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None or importlib.util.find_spec(new) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the finder on `sys.meta_path` once (idempotent)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
