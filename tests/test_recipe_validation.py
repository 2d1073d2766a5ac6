"""Recipes are validated when loaded: unknown keys (with the closest valid one), wrong types and wrong values
in every section, YAML syntax errors, `--set` mistakes; all named by file and field, before any model is
loaded or anything written; the CLI prints the message without a traceback and exits with status 2."""

from __future__ import annotations

import copy
import importlib
import os
import pickle
import re
from pathlib import Path

import pytest
import yaml

from lisa_peft import cli
from lisa_peft.pipeline.recipe import RecipeError, calibration_keys, load_recipe, run_recipe

ROOT = Path(__file__).resolve().parents[1]
GPU_RECIPES = {"llama2_7b.yaml", "llama2_13b.yaml", "llama3_8b.yaml"}

# A valid recipe that uses every section (nothing here is loaded: validation reads no model and no text).
VALID = {
    "base_model": "smollm2-135m-instruct",
    "dtype": "float32",
    "lisa": {"lisa_layers": "auto", "target_fraction": 0.5, "init_lisa_weights": "calibrate", "r": 8},
    "calibration": {"texts": "sampled", "num_sequences": 4, "seq_len": 16, "layerwise_steps": 2,
                    "layerwise_lr": 0.003},
    "data": {"train": "sampled", "sampled_sequences": 8, "eval": "embedded", "seq_len": 32,
             "max_eval_sequences": None},
    "distill_weight": 1.0,
    "teacher_topk": 8,
    "time_budget_minutes": 1,
    "zero_shot": {"file": "missing.jsonl", "limit": 10},
    "training": {"output_dir": "OUT", "max_steps": 2, "learning_rate": 1, "lr_scheduler_type": "cosine",
                 "use_cpu": True},
}


def recipe_file(tmp_path: Path, changes: dict[str, object] | None = None, name: str = "recipe.yaml") -> Path:
    """VALID with dotted `changes` ("" section = top level; value None with key "-" deletes), written as YAML."""
    recipe = copy.deepcopy(VALID)
    recipe["training"]["output_dir"] = str(tmp_path / "out")
    for dotted, value in (changes or {}).items():
        *parents, leaf = dotted.split(".")
        target = recipe
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def load_error(path: Path, overrides: list[str] | None = None) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value


def test_the_valid_recipe_loads(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path))
    assert recipe["training"]["learning_rate"] == 1 and recipe["data"]["max_eval_sequences"] is None


@pytest.mark.parametrize(
    "field, suggestion",
    [
        ("distil_weight", "distill_weight"),
        ("trainnig", "training"),
        ("data.max_train_sequence", "max_train_sequences"),
        ("calibration.layerwise_step", "layerwise_steps"),
        ("lisa.target_fractoin", "target_fraction"),
        ("training.max_stpes", "max_steps"),
        ("zero_shot.limt", "limit"),
    ],
)
def test_an_unknown_key_in_any_section_is_rejected_with_the_closest_valid_one(tmp_path, field, suggestion):
    path = recipe_file(tmp_path, {field: 3})
    error = load_error(path)
    assert str(error) == f"{path}: {field}: unknown key; did you mean '{suggestion}'?"
    assert isinstance(error, ValueError) and error.where == str(path) and [f for f, _ in error.problems] == [field]


def test_an_unknown_key_without_a_close_one_lists_the_valid_keys(tmp_path):
    message = str(load_error(recipe_file(tmp_path, {"data.zebra": "blue"})))
    assert "data.zebra: unknown key; valid keys: eval, eval_seq_len, holdout," in message
    # keys that convert() takes but the recipe sets itself are not calibration keys
    internal = load_error(recipe_file(tmp_path, {"calibration.calibration_ids": 1}))
    assert "calibration.calibration_ids: unknown key" in str(internal)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("training.max_steps", "ten", "expected an integer, got 'ten'"),
        ("training.use_cpu", "sometimes", "expected true or false, got 'sometimes'"),
        ("distill_weight", "high", "expected a number, got 'high'"),
        ("training", 5, "expected a mapping or null, got 5"),
        ("data.seq_len", [256], "expected an integer, got [256]"),
        ("data.train", 3, "expected a string or a list of strings, got 3"),
        ("calibration.num_sequences", 4.5, "expected an integer, got 4.5"),
        ("lisa.r", "big", "expected an integer or a mapping or null, got 'big'"),
        ("zero_shot.required", "yes please", "expected true or false, got 'yes please'"),
    ],
)
def test_a_wrong_type_is_named_by_file_and_field(tmp_path, field, value, expected):
    path = recipe_file(tmp_path, {field: value})
    assert str(load_error(path)) == f"{path}: {field}: {expected}."


def test_a_number_that_yaml_reads_as_text_gets_the_fix(tmp_path):
    """PyYAML reads `2e-3` (no dot) as a string; transformers would take it and fail at the first step."""
    path = tmp_path / "lr.yaml"
    path.write_text(recipe_file(tmp_path).read_text().replace("learning_rate: 1", "learning_rate: 2e-3"))
    message = str(load_error(path))
    assert message.startswith(f"{path}: training.learning_rate: expected a number, got '2e-3'")
    assert message.endswith("(YAML reads 2e-3 as text: write 2.0e-3 or 0.002).")


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("training.lr_scheduler_type", "cosin", "one of 'linear', 'cosine', .* got 'cosin'; did you mean 'cosine'"),
        ("training.optim", "adamw_torhc", "got 'adamw_torhc'; did you mean 'adamw_torch'"),
        ("training.warmup_steps", -1, "warmup_steps >= 0"),  # TrainingArguments' own check
        ("training.logging_steps", 0, "requires non-zero --logging_steps"),
        ("lisa.share", "logit", "`share` must be one of 'logits', 'probs'; got 'logit'"),  # LisaConfig's own check
        ("lisa.target_fraction", 1.5, "needs `target_fraction` in \\(0, 1\\)"),
        ("lisa.r", 7, "`r` must be a positive even integer"),
        ("data.holdout", 1.0, "must be in \\(0.0, 1.0\\), got 1.0"),
        ("data.eval", "sampled", "'sampled' cannot be held-out text"),
        ("data.train", "sampeld", "'sampeld' is not a file; .* did you mean 'sampled'"),
        ("data.train", ["missing.txt"], "'missing.txt' is not a file"),
        ("calibration.select_layers_by", "kl", "must be one of 'loss', 'output_kl', got 'kl'"),
        ("calibration.layer_search", "greedyy", "one of 'single', 'greedy', got 'greedyy'; did you mean 'greedy'"),
        ("calibration.layerwise_lr", 0, "must be > 0, got 0"),
        ("distill_weight", 1.5, "must be in \\[0.0, 1.0\\], got 1.5"),
        ("dtype", "fp16", "must be one of 'float32', 'bfloat16', 'float16', got 'fp16'"),
        ("zero_shot.limit", 0, "must be >= 1, got 0"),
        ("base_model", " ", "must not be empty"),
    ],
)
def test_a_wrong_value_is_named_by_file_and_field(tmp_path, field, value, expected):
    path = recipe_file(tmp_path, {field: value})
    error = load_error(path)
    assert [f for f, _ in error.problems] == [field], str(error)
    assert str(error).startswith(f"{path}: {field}: ")
    assert re.search(expected, str(error)), str(error)


def test_missing_keys_and_impossible_combinations_are_found_at_load_time(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("dtype: float32\nlisa: {lisa_layers: [3]}\n")
    assert str(load_error(path)) == (f"{path}: base_model: required but missing (an HF id, a local folder or "
                                     "'smollm2-135m-instruct').")
    required = load_error(recipe_file(tmp_path, {"zero_shot.required": True}))
    assert "zero_shot.file: 'missing.jsonl' is not a file, and zero_shot.required is true" in str(required)
    # calibration.texts: sampled takes the first training windows: 9 of 8, or 64 tokens of 32, cannot be had
    for change in ({"calibration.num_sequences": 9}, {"calibration.seq_len": 64}):
        message = str(load_error(recipe_file(tmp_path, change)))
        assert "the training text has 8 windows of 32 tokens (data.sampled_sequences, data.seq_len)" in message


def test_every_problem_is_reported_at_once(tmp_path):
    path = recipe_file(tmp_path, {"training.max_stpes": 3, "data.seq_len": "long", "lisa.share": "logit"})
    error = load_error(path)
    assert str(error).startswith(f"{path}: 3 problems: ")
    assert [f for f, _ in error.problems] == ["data.seq_len", "lisa.share", "training.max_stpes"]
    assert pickle.loads(pickle.dumps(error)).problems == error.problems


def test_a_yaml_syntax_error_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("base_model: x\ntraining:\n  max_steps: 3\n   save_steps: 2\n")
    message = str(load_error(path))
    assert message == f"{path}: line 4, column 14: not valid YAML (mapping values are not allowed here)."
    path.write_text("base_model: x\nlisa: {lisa_layers: [3, 4}\n")
    assert str(load_error(path)).startswith(f"{path}: line 2, column 26: not valid YAML (")
    path.write_text("- base_model: x\n")
    assert str(load_error(path)) == f"{path}: a recipe is a YAML mapping of sections, got list."


def test_set_overrides_are_validated_and_named(tmp_path):
    path = recipe_file(tmp_path)
    assert load_recipe(path, ["training.max_steps=7", "data.eval=[hf:wikitext]"])["training"]["max_steps"] == 7
    assert str(load_error(path, ["data.max_train_sequence=5"])) == (
        f"{path}: data.max_train_sequence (from --set data.max_train_sequence=5): unknown key; "
        "did you mean 'max_train_sequences'?"
    )
    assert "training.max_steps (from --set training.max_steps=ten): expected an integer" in str(
        load_error(path, ["training.max_steps=ten"]))
    assert "training.max_steps is 2, not a section" in str(load_error(path, ["training.max_steps.x=1"]))
    assert "the value is not valid YAML" in str(load_error(path, ["training.max_steps=[1,"]))
    assert "must look like section.key=value" in str(load_error(path, ["max_steps"]))
    assert "must look like section.key=value" in str(load_error(path, ["training..max_steps=1"]))


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    assert load_recipe(path)["base_model"]


def test_the_shipped_recipes_include_the_gpu_ones():
    """The GPU recipes (bf16 on a CUDA machine) validate here too: nothing about the machine is checked."""
    assert GPU_RECIPES <= {p.name for p in (ROOT / "recipes").glob("*.yaml")}


def test_checking_training_arguments_sets_up_no_device_and_leaves_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("FSDP_CPU_RAM_EFFICIENT_LOADING", raising=False)
    before = dict(os.environ)
    changes = {"training.bf16": True, "training.use_cpu": False, "training.fsdp": "full_shard"}
    load_recipe(recipe_file(tmp_path, changes))  # bf16 without a GPU: left to the machine that trains
    assert dict(os.environ) == before


@pytest.fixture
def no_model_work(monkeypatch):
    """Loading a model or converting one fails the test: validation must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("model work started before the recipe was validated")

    monkeypatch.setattr(importlib.import_module("lisa_peft.pipeline.base_models"), "load_base_model", refuse)
    monkeypatch.setattr(importlib.import_module("lisa_peft.convert"), "convert", refuse)
    monkeypatch.setattr("lisa_peft.pipeline.recipe.prepare_data", refuse)


@pytest.mark.parametrize("change", [{"training.max_stpes": 10}, {"lisa.target_fraction": "half"},
                                    {"distill_weight": 2}, {"calibration.layerwise_lr": "fast"}])
def test_run_recipe_validates_before_loading_or_converting_anything(tmp_path, no_model_work, change):
    recipe = yaml.safe_load(recipe_file(tmp_path, change).read_text())
    with pytest.raises(RecipeError, match=f"^recipe: {next(iter(change))}: "):
        run_recipe(recipe, progress=False)
    assert not (tmp_path / "out").exists()


def test_train_command_prints_the_problem_without_a_traceback_and_exits_2(tmp_path, capsys, no_model_work):
    path = recipe_file(tmp_path)
    code = cli.main(["train", str(path), "--quiet", "--set", "training.max_stpes=3"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == (f"lisa-peft train: error: {path}: training.max_stpes (from --set training.max_stpes=3): "
                   "unknown key; did you mean 'max_steps'?\n")
    assert not (tmp_path / "out").exists()


def test_demo_command_prints_the_problem_without_a_traceback_and_exits_2(tmp_path, capsys, no_model_work):
    path = recipe_file(tmp_path, {"training.max_steps": "ten"})
    code = cli.main(["demo", "--recipe", str(path), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == f"lisa-peft demo: error: {path}: training.max_steps: expected an integer, got 'ten'.\n"
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_calibration_keys_are_convert_keyword_arguments():
    """`calibration:` takes what convert() takes (the schema is its signature), and `texts`."""
    import inspect

    from lisa_peft.pipeline.convert import convert

    keys = set(calibration_keys())
    params = {n for n, p in inspect.signature(convert).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert keys == {"texts"} | params - {"adapter_name", "progress", "stage_callback", "calibration_ids"}
    assert {"num_sequences", "seq_len", "layerwise_steps", "layerwise_lr", "sensitivity_fit_steps"} <= keys
