"""Loading a compact LiSA folder: without `import lisa_peft` (the folder's remote-code entry point, checked in a
fresh interpreter), and into a model class without LiSA layers (a loud error, never random q/k)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import get_peft_model

from lisa_peft import LisaConfig, LisaLlamaForCausalLM
from lisa_peft.compact.lisa_llama.remote_code import AUTO_MAP, REMOTE_CODE_FILE
from lisa_peft.integrations.loading import CompactModelClassError, compact_guard
from tests.helpers.tiny_models import tiny_llama

LAYERS = [2, 3, 5]
IDS = torch.tensor([[5, 17, 3, 90, 42, 7, 64, 11]])


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(IDS).logits


@pytest.fixture(scope="module")
def compact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved compact model whose LiSA weights moved away from their init; its logits in `expected.pt`."""
    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=LAYERS))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lisa_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    folder = tmp_path_factory.mktemp("compact")
    compact = model.merge_and_unload()
    compact.save_pretrained(folder)
    torch.save(_logits(compact), folder / "expected.pt")
    return folder


def test_folder_carries_auto_map_and_its_remote_code(compact_dir):
    config = json.loads((compact_dir / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "lisa_llama"
    source = (compact_dir / REMOTE_CODE_FILE).read_text()
    assert "import lisa_peft" in source and "pip install lisa-peft" in source
    assert "nn.Module" not in source  # an entry point only: the model code is the installed package


def test_trust_remote_code_after_import_uses_the_registered_classes(compact_dir):
    loaded = transformers.AutoModelForCausalLM.from_pretrained(compact_dir, trust_remote_code=True)
    assert type(loaded) is LisaLlamaForCausalLM
    torch.testing.assert_close(_logits(loaded), torch.load(compact_dir / "expected.pt"), atol=1e-5, rtol=0)


_WITHOUT_IMPORT = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

folder, report = sys.argv[1], {}

def attempt(name, block=False, **kwargs):
    if block:  # lisa-peft "not installed": `import lisa_peft` raises ModuleNotFoundError
        sys.modules["lisa_peft"] = None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        report[name] = {"loaded": [f"{c.__module__}.{c.__name__}" for c in type(model).__mro__[:2]]}
        return model
    except Exception as error:
        report[name] = {"error": type(error).__name__, "message": str(error)}
    finally:
        if block:
            del sys.modules["lisa_peft"]

attempt("plain")
attempt("trust_not_installed", block=True, trust_remote_code=True)
report["imported_before"] = "lisa_peft" in sys.modules
model = attempt("trust", trust_remote_code=True)
report["imported_after"] = "lisa_peft" in sys.modules
with torch.no_grad():
    torch.save(model(torch.load(folder + "/ids.pt")).logits, folder + "/out.pt")
try:
    LlamaForCausalLM.from_pretrained(folder)
    report["llama"] = "loaded"
except Exception as error:
    report["llama"] = type(error).__name__
with open(folder + "/report.json", "w") as file:
    json.dump(report, file)
"""


@pytest.fixture(scope="module")
def without_import(compact_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """A fresh interpreter that never runs `import lisa_peft` itself loads a copy of the folder, offline."""
    folder = tmp_path_factory.mktemp("fresh") / "compact"
    shutil.copytree(compact_dir, folder)
    torch.save(IDS, folder / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(folder.parent / "modules")}
    result = subprocess.run([sys.executable, "-c", _WITHOUT_IMPORT, str(folder)], capture_output=True, text=True,
                            timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((folder / "report.json").read_text()), folder


def test_without_import_trust_remote_code_loads_through_the_installed_package(without_import, compact_dir):
    report, folder = without_import
    assert report["imported_before"] is False and report["imported_after"] is True
    remote, parent = report["trust"]["loaded"]
    assert remote.startswith("transformers_modules.") and remote.endswith(".modeling_lisa_llama.LisaLlamaForCausalLM")
    assert parent == "lisa_peft.compact.lisa_llama.modeling_lisa_llama.LisaLlamaForCausalLM"
    torch.testing.assert_close(torch.load(folder / "out.pt"), torch.load(compact_dir / "expected.pt"), atol=1e-5,
                               rtol=0)
    assert report["llama"] == "CompactModelClassError"  # the guard is on once lisa_peft came in


def test_without_lisa_peft_installed_the_error_names_install_and_import(without_import):
    report, _ = without_import
    failure = report["trust_not_installed"]
    assert failure["error"] == "ImportError"
    assert "`pip install lisa-peft`" in failure["message"] and "`import lisa_peft`" in failure["message"]


def test_without_trust_remote_code_transformers_asks_for_it(without_import):
    """transformers' own answer for a folder with custom code (not "update Transformers"); the folder's README and
    modeling_lisa_llama.py name lisa-peft."""
    failure = without_import[0]["plain"]
    assert failure["error"] == "ValueError" and "trust_remote_code=True" in failure["message"]
    assert "does not recognize this architecture" not in failure["message"]


# ---------------------------------------------------------------------------------------------- other classes
def _forced_auto(folder: Path) -> None:
    transformers.AutoModelForCausalLM.from_pretrained(folder, config=transformers.LlamaConfig.from_pretrained(folder))


@pytest.mark.parametrize(
    "load",
    [
        transformers.LlamaForCausalLM.from_pretrained,
        transformers.LlamaForSequenceClassification.from_pretrained,
        transformers.LlamaModel.from_pretrained,
        _forced_auto,
    ],
    ids=["llama_for_causal_lm", "llama_seq_cls", "llama_model", "auto_forced_to_llama"],
)
def test_other_model_classes_refuse_a_compact_folder(compact_dir, load):
    with pytest.raises(CompactModelClassError, match=r"LiSA layers \[2, 3, 5\].*initialise them at random"):
        load(compact_dir)


def test_config_edited_to_llama_is_still_refused(compact_dir, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(compact_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompactModelClassError, match="AutoModelForCausalLM.from_pretrained"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_config_not_at_hand_before_loading_is_checked_after(compact_dir, monkeypatch):
    """A Hub repo not yet in the cache: the loaded model's config still gives the compact folder away."""
    monkeypatch.setattr(compact_guard, "saved_config", lambda source, kwargs: None)
    with pytest.raises(CompactModelClassError):
        transformers.LlamaForCausalLM.from_pretrained(compact_dir)


def test_plain_llama_folders_still_load(tmp_path):
    tiny_llama(2).save_pretrained(tmp_path)
    model, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model) is transformers.LlamaForCausalLM and not info["missing_keys"]
    torch.testing.assert_close(_logits(model), _logits(tiny_llama(2)))


def test_compact_class_itself_still_loads(compact_dir):
    loaded = LisaLlamaForCausalLM.from_pretrained(compact_dir)
    torch.testing.assert_close(_logits(loaded), torch.load(compact_dir / "expected.pt"), atol=1e-5, rtol=0)
