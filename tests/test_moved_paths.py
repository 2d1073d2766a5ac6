"""Module paths from before the sub-packages still import, as the very same modules (`lisa_peft._moved`)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import lisa_peft
from lisa_peft._moved import MOVED, new_name


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module(old):
    assert importlib.import_module(f"lisa_peft.{old}") is importlib.import_module(f"lisa_peft.{MOVED[old]}")


def test_old_deep_paths_and_from_imports():
    from lisa_peft.fidelity import measure_fidelity
    from lisa_peft.hub.push import push_model_to_hub
    from lisa_peft.models.lisa_llama.sizes import compact_sizes

    assert measure_fidelity is lisa_peft.evaluation.fidelity.measure_fidelity
    assert push_model_to_hub is importlib.import_module("lisa_peft.integrations.hub.push").push_model_to_hub
    assert compact_sizes is importlib.import_module("lisa_peft.compact.lisa_llama.sizes").compact_sizes
    assert importlib.import_module("lisa_peft.hub.push").__spec__.name == "lisa_peft.integrations.hub.push"


def test_lisa_peft_convert_stays_the_function():
    from lisa_peft.convert import layer_sensitivity  # the old module path

    assert callable(layer_sensitivity)
    assert lisa_peft.convert is importlib.import_module("lisa_peft.pipeline.convert").convert


def test_unknown_names_are_not_aliased():
    assert new_name("lisa_peft.tuners.lisa.model") is None
    assert new_name("lisa_peft.no_such_module") is None
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("lisa_peft.no_such_module")


def test_settings_are_exported_from_the_package():
    from lisa_peft.tuners.lisa.chunked import set_prefill_chunk_size
    from lisa_peft.tuners.lisa.model import set_kernel_mode

    assert lisa_peft.set_kernel_mode is set_kernel_mode
    assert lisa_peft.set_prefill_chunk_size is set_prefill_chunk_size


def test_import_lisa_peft_imports_no_optional_module():
    """The aliases are lazy: `import lisa_peft` does not import what needs an extra (lm-eval, matplotlib)."""
    code = ("import sys, lisa_peft; "
            "print(sorted(m for m in ('lisa_peft.evaluation.lm_eval_model', 'lisa_peft.evaluation.metrics.core', "
            "'lm_eval', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
