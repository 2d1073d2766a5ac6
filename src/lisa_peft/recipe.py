"""Training recipes: one YAML file from base model to a trained, saved LiSA adapter.

A recipe has these sections (see `recipes/*.yaml`; every key is optional except `base_model`):

```yaml
base_model: smollm2-135m-instruct   # HF id, local folder, or the demo alias
dtype: float32                      # base model dtype (float32 | bfloat16 | float16)
lisa:        {...}                  # LisaConfig fields, e.g. lisa_layers: auto, target_fraction: 0.4
calibration: {texts: [...], num_sequences: 16, seq_len: 256, layerwise_steps: 200, layerwise_lr: 2e-3}
data:        {train: [...], eval: [...], holdout: 0.1, seq_len: 256, max_train_sequences: 2000}
distill_weight: 0.5                 # self-distillation weight (0 = plain causal-LM loss)
time_budget_minutes: 10             # stop training after this much wall-clock time (optional)
training:    {...}                  # transformers.TrainingArguments fields (output_dir, max_steps, ...)
```

Texts are local `.txt` paths, `hf:NAME[:CONFIG][:SPLIT]` datasets, or nothing (the embedded
corpus). Without `data.eval`, the last `holdout` fraction of the training text is held out.
Multi-GPU / multi-node runs go through `accelerate launch` (see `recipes/accelerate/`): the
`Trainer` handles DDP, FSDP and DeepSpeed; nothing here is distributed by hand.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from peft import PeftModel

from .data import load_texts, split_texts, token_windows
from .tuners.lisa import LisaConfig

logger = logging.getLogger(__name__)
SECTIONS = {"base_model", "dtype", "lisa", "calibration", "data", "distill_weight", "time_budget_minutes", "training"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INIT_ADAPTER_DIR = "lisa_init"
FINAL_ADAPTER_DIR = "adapter"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a recipe YAML and apply `section.key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Recipe not found: {path}. See recipes/ for examples.")
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping, got {type(recipe).__name__}.")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Override {item!r} must look like section.key=value, e.g. training.max_steps=10.")
        target = recipe
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(value)
    validate_recipe(recipe, str(path))
    return recipe


def validate_recipe(recipe: dict[str, Any], where: str = "recipe") -> None:
    """Clear errors for unknown sections and a missing base model."""
    unknown = sorted(set(recipe) - SECTIONS)
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; known: {sorted(SECTIONS)}.")
    if not recipe.get("base_model"):
        raise ValueError(f"{where}: `base_model` is required (HF id, local folder or 'smollm2-135m-instruct').")
    if recipe.get("dtype", "float32") not in _DTYPES:
        raise ValueError(f"{where}: dtype must be one of {sorted(_DTYPES)}, got {recipe['dtype']!r}.")


def prepare_data(tokenizer, recipe: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(train windows [N, T], eval windows [M, T]) from the recipe's `data` section."""
    data = recipe.get("data", {})
    seq_len = int(data.get("seq_len", 256))
    texts = load_texts(data.get("train"))
    if data.get("eval"):
        eval_texts = load_texts(data["eval"])
    else:
        texts, eval_texts = split_texts(texts, float(data.get("holdout", 0.1)))
    train = token_windows(tokenizer, texts, seq_len, data.get("max_train_sequences"))
    eval_len = int(data.get("eval_seq_len", seq_len))
    evaluation = token_windows(tokenizer, eval_texts, eval_len, data.get("max_eval_sequences"))
    return train, evaluation


def build_lisa_model(
    model, tokenizer, recipe: dict[str, Any], output_dir: Path, progress: bool = True, stage_callback=None
) -> PeftModel:
    """Convert (calibrate) the base model, or reload the converted adapter saved by an earlier run.

    stage_callback: passed to `lisa_peft.convert` (runs after the init and the layer-wise stage)."""
    from .convert import convert

    init_dir = output_dir / INIT_ADAPTER_DIR
    if (init_dir / "adapter_config.json").is_file():
        logger.info("Reusing the converted adapter in %s", init_dir)
        return PeftModel.from_pretrained(model, init_dir, is_trainable=True)
    calibration = dict(recipe.get("calibration", {}))
    config = LisaConfig(**recipe.get("lisa", {}))
    peft_model = convert(
        model,
        tokenizer,
        config,
        calibration.pop("texts", None),
        progress=progress,
        stage_callback=stage_callback,
        **calibration,
    )
    if _is_main_process():
        peft_model.save_pretrained(init_dir)
    return peft_model


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_recipe(recipe: dict[str, Any], progress: bool = True, resume: bool | str = True) -> dict[str, Any]:
    """Run a recipe end to end.

    Returns the numbers (also written to OUTPUT_DIR/summary.json: perplexities per stage, steps,
    layers) plus, for callers in the same process, the trained `model`, the `eval_windows` and
    the `tokenizer` (not written to the JSON)."""
    from .base_models import load_base_model
    from .training import LisaTrainer, TimeBudgetCallback, TokenWindowDataset, perplexity

    recipe = copy.deepcopy(recipe)
    validate_recipe(recipe)
    training = dict(recipe.get("training", {}))
    output_dir = Path(training.setdefault("output_dir", "runs/lisa"))
    training.setdefault("report_to", [])
    training.setdefault("save_strategy", "steps")
    training.setdefault("disable_tqdm", not progress)
    model, tokenizer = load_base_model(recipe["base_model"], dtype=_DTYPES[recipe.get("dtype", "float32")])
    train, evaluation = prepare_data(tokenizer, recipe)
    summary: dict[str, Any] = {"base_ppl": perplexity(model, evaluation, progress=progress, desc="base ppl")}

    def stage_ppl(stage: str, lisa_model) -> float:
        return perplexity(lisa_model, evaluation, progress=progress, desc=f"LiSA ppl ({stage})")

    peft_model = build_lisa_model(model, tokenizer, recipe, output_dir, progress, stage_ppl)
    stages = (peft_model.peft_config["default"].layer_scores or {}).get("stages", {})
    summary.update({f"lisa_ppl_{stage}": value for stage, value in stages.items()})
    callbacks = []
    if recipe.get("time_budget_minutes"):
        callbacks.append(TimeBudgetCallback(60.0 * float(recipe["time_budget_minutes"])))
    trainer = LisaTrainer(
        model=peft_model,
        args=transformers.TrainingArguments(**training),
        train_dataset=TokenWindowDataset(train),
        distill_weight=float(recipe.get("distill_weight", 0.0)),
        callbacks=callbacks,
    )
    checkpoint = resume if isinstance(resume, str) else (_last_checkpoint(output_dir) if resume else None)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    summary["train_loss"] = result.training_loss
    summary["train_steps"] = trainer.state.global_step
    summary["world_size"] = trainer.args.world_size
    summary["lisa_ppl_trained"] = perplexity(peft_model, evaluation, progress=progress, desc="LiSA ppl")
    summary["lisa_layers"] = peft_model.peft_config["default"].lisa_layers
    summary["num_layers"] = peft_model.get_base_model().config.num_hidden_layers
    summary["adapter_dir"] = str(output_dir / FINAL_ADAPTER_DIR)
    if trainer.is_world_process_zero():
        peft_model.save_pretrained(output_dir / FINAL_ADAPTER_DIR)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["model"] = peft_model
    summary["eval_windows"] = evaluation
    summary["tokenizer"] = tokenizer
    return summary


def _last_checkpoint(output_dir: Path) -> str | None:
    if not output_dir.is_dir():
        return None
    return transformers.trainer_utils.get_last_checkpoint(str(output_dir))
