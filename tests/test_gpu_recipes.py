"""The GPU recipes (LLaMA-2-7B/13B, LLaMA-3-8B) end to end on CPU, on tiny random models of their families.

scripts/recipe_dry_run.py runs each recipe with only its scale overridden (base model -> a tiny stand-in, few
steps, short windows): its own dtype, bf16, gradient checkpointing, batch size and accumulation, LiSA,
calibration and text-source settings, under one process, DDP (accelerate, 2 CPU processes over gloo) and FSDP
(accelerate's FSDP config on 2 CPU processes); then reloads the adapter, builds, saves and loads the compact
model and compares logits. The fast tests here check the method, the stand-ins and the overrides; the slow
ones run the dry runs (one to a few minutes each on 2 CPU cores).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lisa_peft.pipeline.recipe import EMBEDDED, SAMPLED, _same_source, load_recipe
from lisa_peft.pipeline.recipe_files import accelerate_config, bundled_recipes

ROOT = Path(__file__).resolve().parents[1]


def _load_dry_run():
    spec = importlib.util.spec_from_file_location("recipe_dry_run", ROOT / "scripts" / "recipe_dry_run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


dry_run = _load_dry_run()
GPU_RECIPES = dry_run.GPU_RECIPES


def _flatten(recipe: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in recipe.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipes_follow_the_projects_method_at_their_own_scale(name):
    """Distillation and calibration on text sampled from the base model, fidelity on held-out text of another
    source; bf16 weights and training, gradient checkpointing and 2048-token windows as before."""
    recipe = load_recipe(bundled_recipes()[name])
    assert recipe["calibration"]["texts"] == SAMPLED and recipe["data"]["train"] == SAMPLED
    held_out = recipe["data"]["eval"]
    assert held_out not in (None, SAMPLED) and not _same_source(SAMPLED, held_out)
    assert held_out == EMBEDDED or all(source.startswith("hf:") for source in held_out)
    assert recipe["distill_weight"] == 1.0 and recipe["lisa"]["init_lisa_weights"] == "calibrate"
    assert recipe["dtype"] == "bfloat16" and recipe["data"]["seq_len"] == 2048
    training = recipe["training"]
    assert training["bf16"] is True and training["gradient_checkpointing"] is True and training["max_steps"] == 2000
    # the calibration windows are the first training windows: there are enough of them, long enough
    assert recipe["data"]["sampled_sequences"] >= recipe["calibration"]["num_sequences"]
    assert recipe["data"]["seq_len"] >= recipe["calibration"]["seq_len"]


def test_the_stand_in_family_comes_from_the_base_model_name():
    families = {name: dry_run.recipe_family(load_recipe(bundled_recipes()[name])["base_model"])
                for name in GPU_RECIPES}
    assert families == {"llama2_7b": "llama2", "llama2_13b": "llama2", "llama3_8b": "llama3"}
    assert dry_run.recipe_family("meta-llama/Llama-3.1-8B-Instruct") == "llama3"
    with pytest.raises(ValueError, match="'smollm2-135m-instruct' is neither a LLaMA-2 nor a LLaMA-3"):
        dry_run.recipe_family("smollm2-135m-instruct")


def test_stand_ins_have_their_familys_attention_and_rope():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama2 = dry_run.stand_in_config("llama2", 99, 1, 2)
    assert llama2.num_key_value_heads == llama2.num_attention_heads  # MHA
    assert llama2.rope_parameters["rope_type"] == "default"
    llama3 = dry_run.stand_in_config("llama3", 99, 1, 2)
    assert llama3.num_attention_heads // llama3.num_key_value_heads == 4 and llama3.num_key_value_heads > 1  # GQA
    assert llama3.rope_parameters["rope_type"] == "llama3"
    # the scaling reaches some but not all of the tiny head's frequencies (head_dim 16): it is exercised
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](llama3, "cpu")
    plain = 1.0 / llama3.rope_parameters["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16)
    changed = ~torch.isclose(scaled, plain)
    assert 0 < int(changed.sum()) < len(plain), (scaled, plain)


def test_a_dry_run_overrides_only_the_scale(tmp_path):
    """Everything but the base model, the output folder, the scale keys and (without a GPU) use_cpu runs as the
    recipe says; the overrides are real recipe keys (load_recipe validates them)."""
    allowed = {"base_model", "training.output_dir", *dry_run.SCALE, *dry_run.machine_overrides()}
    assert set(dry_run.machine_overrides()) <= {"training.use_cpu"}
    assert not allowed & {"dtype", "training.bf16", "training.gradient_checkpointing", "data.train", "data.eval",
                          "calibration.texts", "training.per_device_train_batch_size"}
    for name in GPU_RECIPES:
        path = bundled_recipes()[name]
        original = _flatten(load_recipe(path))
        scaled = _flatten(load_recipe(path, dry_run.scale_overrides(tmp_path / "base", tmp_path / "out")))
        changed = {key for key in original.keys() | scaled.keys() if original.get(key) != scaled.get(key)}
        assert changed <= allowed and {"base_model", "training.max_steps", "data.seq_len"} <= changed, changed


def test_the_fsdp_dry_run_config_is_the_bundled_one_on_two_processes(tmp_path):
    bundled = yaml.safe_load(accelerate_config("fsdp").read_text())
    adapted = yaml.safe_load(dry_run.fsdp_cpu_config(tmp_path / "fsdp.yaml").read_text())
    assert adapted == {**bundled, "num_processes": 2}


def test_error_line_finds_the_exception_of_a_failed_run():
    stderr = "Traceback (most recent call last):\n  File x\nRuntimeError: boom\n[rank0]: note\nW0101 exit\n"
    assert dry_run.error_line(stderr) == "RuntimeError: boom"
    assert dry_run.error_line("lisa-peft train: error: recipe.yaml: x: unknown key\n").startswith("lisa-peft train")
    assert dry_run.error_line("") == "(no output)"


def test_run_recipe_samples_and_converts_on_the_trainers_device(tmp_path, monkeypatch):
    """On a GPU machine the base model must be on the GPU for sampling, conversion and the teacher's top-k, not
    on the CPU it loads to (a 7B model sampling 2048 windows of 2048 tokens on CPU would not finish). Here the
    Trainer's device is faked as "meta"; sampling, the first step that needs the model, records the device."""
    import transformers

    from lisa_peft.pipeline.recipe import run_recipe

    class Stop(Exception):
        pass

    seen = {}

    def sampled_windows(model, *args, **kwargs):
        seen["device"] = next(model.parameters()).device
        raise Stop

    monkeypatch.setattr("lisa_peft.pipeline.sampled_corpus.sampled_windows", sampled_windows)
    monkeypatch.setattr(transformers.TrainingArguments, "device", property(lambda self: torch.device("meta")))
    base = dry_run.save_stand_in("llama3", tmp_path / "base")
    recipe = load_recipe(bundled_recipes()["llama3_8b"], dry_run.scale_overrides(base, tmp_path / "out"))
    with pytest.raises(Stop):
        run_recipe(recipe, progress=False)
    assert seen["device"] == torch.device("meta")


@pytest.mark.slow
@pytest.mark.parametrize("launch", dry_run.LAUNCHES)
@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipe_dry_run(name, launch, tmp_path):
    result = dry_run.run_one(name, launch, tmp_path)
    outcome = f"skipped: {result.skipped}" if result.skipped else result.error or "ok"
    print(f"{name} {launch}: train {result.train_s} s, check {result.check_s} s, {outcome}")
    reason = dry_run.cannot_run_on_cpu(result)
    if reason:
        pytest.skip(reason)
    assert result.ok, f"{result.error}\n{result.stderr_tail[-3000:]}"
    summary, checks = result.summary, result.checks
    assert summary["world_size"] == (1 if launch == "single" else 2)
    assert summary["train_steps"] == dry_run.SCALE["training.max_steps"]
    assert summary["heldout_text"] == "Python's pydoc topics (embedded corpus)" and not summary["in_domain_eval"]
    assert set(summary["fidelity"]) == {"init", "layerwise", "trained"}
    assert checks["compact_class"] == "LisaLlamaForCausalLM" and checks["loaded_dtype"] == "torch.bfloat16"
    family = dry_run.recipe_family(load_recipe(bundled_recipes()[name])["base_model"])
    assert checks["rope_type"] == ("llama3" if family == "llama3" else "default")
    assert checks["kv_heads"] == (2 if family == "llama3" else 8)
    assert len(checks["lisa_layers"]) >= 2
