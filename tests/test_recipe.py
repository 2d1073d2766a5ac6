"""Recipes: YAML loading, the train command end to end on a tiny checkpoint, resume, 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lisa_peft.pipeline.recipe import load_recipe, run_recipe
from lisa_peft.pipeline.training import distillation_kl
from tests.helpers.tiny_assets import sample_text, save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("tiny-recipe")
    save_tiny_checkpoint(folder / "base")
    (folder / "train.txt").write_text(sample_text(30000))
    recipe = {
        "base_model": str(folder / "base"),
        "lisa": {"lisa_layers": "auto", "target_fraction": 0.5, "init_lisa_weights": "calibrate"},
        "calibration": {"texts": [str(folder / "train.txt")], "num_sequences": 4, "seq_len": 32,
                        "layerwise_steps": 3},
        "data": {"train": [str(folder / "train.txt")], "seq_len": 64, "max_train_sequences": 64,
                 "max_eval_sequences": 4},
        "distill_weight": 0.5,
        "training": {"output_dir": str(folder / "out"), "max_steps": 6, "per_device_train_batch_size": 4,
                     "learning_rate": 0.01, "logging_steps": 1, "save_steps": 3, "use_cpu": True},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return {"folder": folder, "recipe": recipe, "path": path}


def test_load_recipe_applies_overrides_and_rejects_mistakes(tmp_path, tiny_setup):
    recipe = load_recipe(tiny_setup["path"], ["training.max_steps=2", "lisa.share=probs"])
    assert recipe["training"]["max_steps"] == 2 and recipe["lisa"]["share"] == "probs"
    with pytest.raises(ValueError, match="section.key=value"):
        load_recipe(tiny_setup["path"], ["max_steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: x\ntrainnig: {}\n")
    with pytest.raises(ValueError, match=r"trainnig: unknown key; did you mean 'training'\?"):
        load_recipe(bad)
    with pytest.raises(FileNotFoundError, match="Recipe not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_shipped_recipes_are_valid():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe["lisa"]["init_lisa_weights"] == "calibrate", path


def test_distillation_kl_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert distillation_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_kl(logits, logits.flip(-1)).item() > 0.1


def test_run_recipe_end_to_end_and_resume(tiny_setup):
    summary = run_recipe(tiny_setup["recipe"], progress=False)
    out = Path(tiny_setup["recipe"]["training"]["output_dir"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "lisa_init" / "adapter_config.json").is_file()
    saved = json.loads((out / "summary.json").read_text())
    for key in ("base_ppl", "lisa_ppl_trained"):
        assert saved[key] > 1.0, key
    for stage in ("init", "layerwise", "trained"):
        assert saved["fidelity"][stage]["kl"] >= 0 and saved["fidelity"][stage]["ppl_ratio"] > 0, stage
    # no data.eval: the held-out part of the user's own text is evaluated and labelled in-domain
    assert saved["in_domain_eval"] and saved["heldout_text"].startswith("in-domain: last 10% of the training text")
    assert saved["train_steps"] == 6 and len(saved["lisa_layers"]) == 3
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["lisa_layers"] == saved["lisa_layers"] and "sensitivity_loss" in config["layer_scores"]
    recorded = config["layer_scores"]["fidelity"]
    assert recorded["ppl_ratio"] == round(saved["ppl_ratio_trained"], 4) and recorded["in_domain"]
    point = saved["operating_point"]  # what the adapter trades, in the summary and on the card
    assert point["lisa_layers"] == 3 and point["fraction"] == round(3 / point["num_layers"], 4)
    assert point["qk_compression"] > 1 and 0 < point["kv_cache_saving"] < 1
    assert point["fidelity"]["ppl_ratio"] == recorded["ppl_ratio"]
    seconds = saved["seconds"]  # wall time per stage, in the order they ran, and the total
    assert list(seconds) == ["load_model", "data", "conversion", "teacher", "training", "evaluation", "total"]
    assert all(v >= 0 for v in seconds.values()) and sum(seconds.values()) - seconds["total"] <= seconds["total"] + 0.5
    card = (out / "adapter" / "README.md").read_text()
    assert f"**Operating point:** 3 of {point['num_layers']} layers LiSA" in card
    assert "KL(base ‖ LiSA)" in card and "measure domain\nadaptation" in card and str(recorded["kl"]) in card
    # a second run reuses the converted adapter and resumes from the last checkpoint (step 6 = done)
    again = run_recipe({**tiny_setup["recipe"], "training": {**tiny_setup["recipe"]["training"], "max_steps": 8}},
                       progress=False)
    assert again["train_steps"] == 8 and again["lisa_layers"] == summary["lisa_layers"]


def test_a_converted_adapter_of_other_settings_is_never_reused_silently(tiny_setup, tmp_path):
    """Editing the recipe's conversion settings and running again must not train the old adapter:
    resuming raises and names the change; --no-resume (resume=False) converts afresh and replaces it."""
    recipe = {**tiny_setup["recipe"],
              "training": {**tiny_setup["recipe"]["training"], "max_steps": 2, "output_dir": str(tmp_path / "o")}}
    run_recipe(recipe, progress=False)
    out = Path(recipe["training"]["output_dir"])
    assert json.loads((out / "lisa_init" / "conversion_settings.json").read_text())["lisa"] == recipe["lisa"]
    changed = {**recipe, "lisa": {**recipe["lisa"], "r": 4}}
    with pytest.raises(ValueError, match=r"converted with other settings \(lisa: .*--no-resume"):
        run_recipe(changed, progress=False)
    summary = run_recipe(changed, progress=False, resume=False)
    assert summary["model"].peft_config["default"].r == 4
    assert json.loads((out / "lisa_init" / "adapter_config.json").read_text())["r"] == 4
    (out / "lisa_init" / "conversion_settings.json").unlink()  # saved by an older version: settings unknown
    with pytest.raises(ValueError, match="does not record the settings it was converted with"):
        run_recipe(changed, progress=False)


def test_a_stale_converted_adapter_is_refused_before_the_model_loads_and_without_a_traceback(
    tiny_setup, tmp_path, monkeypatch, capsys
):
    import lisa_peft.pipeline.base_models
    from lisa_peft.cli import main
    from lisa_peft.pipeline.recipe import CONVERSION_SETTINGS_FILE, RecipeError, conversion_settings

    out = tmp_path / "o"
    (out / "lisa_init").mkdir(parents=True)
    (out / "lisa_init" / "adapter_config.json").write_text("{}")
    recipe = {**tiny_setup["recipe"], "training": {**tiny_setup["recipe"]["training"], "output_dir": str(out)}}
    old = conversion_settings({**recipe, "lisa": {**recipe["lisa"], "r": 2}})
    (out / "lisa_init" / CONVERSION_SETTINGS_FILE).write_text(json.dumps(old))
    monkeypatch.setattr(lisa_peft.pipeline.base_models, "load_base_model",
                        lambda *a, **k: pytest.fail("loaded the model before refusing the stale adapter"))
    with pytest.raises(RecipeError, match="converted with other settings"):
        run_recipe(recipe, progress=False)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(recipe_file)]) == 2
    err = capsys.readouterr().err
    assert "--no-resume" in err and "Traceback" not in err


def test_recipe_defaults_distill_on_text_sampled_from_the_base_and_evaluate_on_another_source(
    tiny_setup, tmp_path, monkeypatch
):
    monkeypatch.setenv("LISA_PEFT_CACHE", str(tmp_path / "cache"))
    recipe = {
        "base_model": tiny_setup["recipe"]["base_model"],
        "lisa": {"lisa_layers": [3, 4], "init_lisa_weights": "calibrate"},
        "calibration": {"num_sequences": 4, "seq_len": 16, "layerwise_steps": 2},
        "data": {"sampled_sequences": 8, "seq_len": 32, "max_eval_sequences": 3},
        "zero_shot": {"file": str(tmp_path / "missing.jsonl")},  # not there: skipped with a warning
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
                     "use_cpu": True, "report_to": []},
    }
    summary = run_recipe(recipe, progress=False)
    assert summary["heldout_text"] == "Python's pydoc topics (embedded corpus)" and not summary["in_domain_eval"]
    assert list((tmp_path / "cache" / "corpora").glob("samples-*-len32-seed0.pt"))
    assert summary["eval_windows"].shape == (3, 32) and summary.get("zero_shot") is None
    stages = summary["model"].peft_config["default"].layer_scores["stages"]
    assert set(stages) == {"init", "layerwise"} and stages["init"]["kl"] > 0
    with pytest.raises(ValueError, match="training text has"):
        run_recipe({**recipe, "calibration": {"num_sequences": 99}, "training": {**recipe["training"],
                    "output_dir": str(tmp_path / "out2")}}, progress=False)


@pytest.mark.slow
def test_two_process_ddp_run_with_accelerate(tiny_setup, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "recipes/accelerate/cpu_2proc.yaml"), "-m", "lisa_peft.cli", "train", str(tiny_setup["path"]),
        "--quiet", "--set", f"training.output_dir={out}", "--set", "lisa.lisa_layers=[3, 4, 5]",
        "--set", "lisa.init_lisa_weights=identity",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["train_steps"] == 6
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "\nwall time: " in result.stdout and "\noperating point: " in result.stdout


def test_held_out_text_from_the_training_source_is_labelled_in_domain(tmp_path):
    from lisa_peft.pipeline.recipe import _same_source

    text = tmp_path / "a.txt"
    text.write_text("x")
    assert _same_source(["hf:wikitext:wikitext-103-raw-v1:train"], ["hf:wikitext:wikitext-103-raw-v1:validation"])
    assert not _same_source(["hf:wikitext:wikitext-103-raw-v1:train"], ["hf:allenai/c4:en:validation"])
    assert _same_source([str(text)], [str(tmp_path / "." / "a.txt")])
    assert not _same_source("sampled", "embedded") and _same_source(None, "embedded")
