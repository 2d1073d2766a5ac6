"""Training recipes: one YAML file from base model to a trained, saved LiSA adapter.

A recipe has these sections (see `recipes/*.yaml`; every key is optional except `base_model`):

```yaml
base_model: smollm2-135m-instruct   # HF id, local folder, or the demo alias
dtype: float32                      # base model dtype (float32 | bfloat16 | float16)
lisa:        {...}                  # LisaConfig fields, e.g. lisa_layers: auto, target_fraction: 0.4
calibration: {texts: sampled, num_sequences: 16, seq_len: 128, layerwise_steps: 200, layerwise_lr: 2e-3}
data:        {train: sampled, sampled_sequences: 192, eval: embedded, seq_len: 256, max_eval_sequences: 16}
distill_weight: 1.0                 # 1 = imitate the base model (default); < 1 mixes in causal-LM loss
teacher_topk: 64                    # cache the base model's top-k log-probs once (0 = teacher forward per step)
zero_shot:   {file: arc.jsonl, limit: 500}  # optional: zero-shot acc, base vs LiSA (ARC-style JSON lines)
time_budget_minutes: 10             # stop training after this much wall-clock time (optional); with
                                    # lr_scheduler_type constant(_with_warmup) the rate follows a cosine over it
training:    {...}                  # transformers.TrainingArguments fields (output_dir, max_steps, ...)
```

Text sources (`data.train`, `data.eval`, `calibration.texts`):

* `sampled` (the default for training and calibration): text sampled from the base model itself
  (`lisa_peft.sampled_corpus`, cached once): data-free distillation, no domain to over-fit to;
  `calibration.texts: sampled` uses the first `num_sequences` training windows, cut to `seq_len`;
* `embedded`: English prose shipped with Python (its pydoc topics, `lisa_peft.data.embedded_corpus`);
* a list of local `.txt` paths and/or `hf:NAME[:CONFIG][:SPLIT]` datasets.

Fidelity is measured on `data.eval` (default `embedded`), which must be text of another source than the
training text: per-token KL(base || LiSA) and the perplexity ratio LiSA/base, after every stage
(`lisa_peft.fidelity`), named in the summary. When `data.eval` is not given and the model trains on
user text, the last `holdout` fraction of that text is evaluated instead and the summary labels the
figures "in-domain" (they then measure domain adaptation, not fidelity).
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

from .data import load_texts, split_texts, spread_windows, token_windows
from .tuners.lisa import LisaConfig

logger = logging.getLogger(__name__)
SECTIONS = {
    "base_model", "dtype", "lisa", "calibration", "data", "distill_weight", "teacher_topk", "time_budget_minutes",
    "training", "zero_shot",
}
SAMPLED, EMBEDDED = "sampled", "embedded"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INIT_ADAPTER_DIR = "lisa_init"
CONVERSION_SETTINGS_FILE = "conversion_settings.json"  # beside the converted adapter in OUTPUT_DIR/lisa_init
CONVERSION_KEYS = ("base_model", "dtype", "lisa", "calibration", "data")
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


def _sources(value: Any) -> list[str] | str | None:
    """A text-source setting as given: None, "sampled", "embedded", or a list of paths / hf: specs."""
    if value is None or value in (SAMPLED, EMBEDDED):
        return value
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError(f"A text source is 'sampled', 'embedded' or a list of .txt paths / hf:NAME specs; got {value!r}.")


def _same_source(train: list[str] | str | None, evaluation: list[str] | str | None) -> bool:
    """Whether the held-out text comes from a source the training text also comes from (same file, same
    Hub dataset and config, or both the embedded corpus): then its figures are in-domain."""
    def keys(sources: list[str] | str | None) -> set[str]:
        if sources in (None, EMBEDDED):
            return {EMBEDDED}
        if sources == SAMPLED:
            return {SAMPLED}
        return {":".join(s.split(":")[:3]) if s.startswith("hf:") else str(Path(s).expanduser().resolve())
                for s in sources}

    return bool(keys(train) & keys(evaluation))


def describe_sources(sources: list[str] | str | None) -> str:
    """A human-readable name of text sources (shown next to every figure measured on them)."""
    if sources in (None, EMBEDDED):
        return "Python's pydoc topics (embedded corpus)"
    if sources == SAMPLED:
        return "text sampled from the base model"
    return ", ".join(Path(s).name if not s.startswith("hf:") else s[3:] for s in sources)


def prepare_data(tokenizer, recipe: dict[str, Any], model=None, progress: bool = True) -> dict[str, Any]:
    """The recipe's token windows: {"train": [N, T], "eval": [M, T'], "eval_name": str, "in_domain": bool}.

    `model` (the base model) is needed when the training text is `sampled`."""
    data = recipe.get("data", {})
    seq_len = int(data.get("seq_len", 256))
    train_sources, eval_sources = _sources(data.get("train", SAMPLED)), _sources(data.get("eval"))
    in_domain = False
    if train_sources == SAMPLED:
        if model is None:
            raise ValueError("data.train: sampled needs the base model to sample from.")
        from .sampled_corpus import sampled_windows

        n = int(data.get("sampled_sequences", 192))
        train = sampled_windows(model, tokenizer, n, seq_len, seed=int(data.get("sample_seed", 0)), progress=progress)
        eval_texts = load_texts(None if eval_sources in (None, EMBEDDED) else eval_sources)
        eval_name = describe_sources(eval_sources or EMBEDDED)
    else:
        texts = load_texts(None if train_sources == EMBEDDED else train_sources)
        if eval_sources:
            eval_texts = load_texts(None if eval_sources == EMBEDDED else eval_sources)
            eval_name = describe_sources(eval_sources)
            if _same_source(train_sources, eval_sources):
                in_domain = True
                eval_name = (f"in-domain: {eval_name} (the training text's source); "
                             "measures domain adaptation, not fidelity")
        else:
            texts, eval_texts = split_texts(texts, float(data.get("holdout", 0.1)))
            in_domain = True
            eval_name = (f"in-domain: last {float(data.get('holdout', 0.1)):.0%} of the training text "
                         f"({describe_sources(train_sources)}); measures domain adaptation, not fidelity")
        train = token_windows(tokenizer, texts, seq_len, data.get("max_train_sequences"))
    eval_len = int(data.get("eval_seq_len", seq_len))
    limit = data.get("max_eval_sequences")
    evaluation = spread_windows(token_windows(tokenizer, eval_texts, eval_len), None if limit is None else int(limit))
    return {"train": train, "eval": evaluation, "eval_name": eval_name, "in_domain": in_domain}


def build_lisa_model(
    model,
    tokenizer,
    recipe: dict[str, Any],
    output_dir: Path,
    progress: bool = True,
    stage_callback=None,
    train_windows: torch.Tensor | None = None,
    reuse: bool = True,
) -> PeftModel:
    """Convert (calibrate) the base model, or reload the converted adapter saved by an earlier run.

    stage_callback: passed to `lisa_peft.convert` (runs after the init and the layer-wise stage).
    train_windows [N, T]: the training windows; `calibration.texts: sampled` (the default) calibrates
    on the first `num_sequences` of them, cut to `seq_len` tokens.
    reuse: reload OUTPUT_DIR/lisa_init when it exists. It is reloaded only if it was converted with the
    same conversion settings (`conversion_settings`, saved beside it); otherwise a ValueError names the
    settings that differ. reuse=False converts afresh and replaces it."""
    from .convert import convert

    init_dir = output_dir / INIT_ADAPTER_DIR
    settings = conversion_settings(recipe)
    if reuse and (init_dir / "adapter_config.json").is_file():
        check_same_conversion(init_dir, settings)
        logger.info("Reusing the converted adapter in %s", init_dir)
        return PeftModel.from_pretrained(model, init_dir, is_trainable=True)
    calibration = dict(recipe.get("calibration", {}))
    config = LisaConfig(**recipe.get("lisa", {}))
    sources = _sources(calibration.pop("texts", SAMPLED))
    if sources == SAMPLED:
        if train_windows is None:
            raise ValueError("calibration.texts: sampled calibrates on the training windows; none were given.")
        n = int(calibration.pop("num_sequences", 16))
        t = int(calibration.pop("seq_len", 128))
        if train_windows.shape[0] < n or train_windows.shape[1] < t:
            raise ValueError(
                f"calibration wants {n} windows of {t} tokens; the training text has {tuple(train_windows.shape)}: "
                "lower calibration.num_sequences / seq_len or raise data.sampled_sequences / seq_len."
            )
        calibration["calibration_ids"] = train_windows[:n, :t]
        sources = None
    peft_model = convert(
        model,
        tokenizer,
        config,
        None if sources == EMBEDDED else sources,
        progress=progress,
        stage_callback=stage_callback,
        **calibration,
    )
    if _is_main_process():
        peft_model.save_pretrained(init_dir)
        (init_dir / CONVERSION_SETTINGS_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True))
    return peft_model


def conversion_settings(recipe: dict[str, Any]) -> dict[str, Any]:
    """What decides the converted adapter: base model, dtype and the `lisa`, `calibration` and `data` sections."""
    return json.loads(json.dumps({key: recipe.get(key) for key in CONVERSION_KEYS}, default=str))


def check_same_conversion(init_dir: Path, settings: dict[str, Any]) -> None:
    """Raise a ValueError if the adapter in init_dir was converted with other settings (or with unknown
    ones: saved by a version that did not record them)."""
    saved_file = init_dir / CONVERSION_SETTINGS_FILE
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else None
    if saved == settings:
        return
    if saved is None:
        what = f"{init_dir} does not record the settings it was converted with"
    else:
        changed = sorted(k for k in settings if saved.get(k) != settings[k])
        what = "; ".join(f"{k}: {saved.get(k)} -> {settings[k]}" for k in changed)
        what = f"{init_dir} was converted with other settings ({what})"
    raise ValueError(
        f"{what}, so it does not belong to this recipe. Run again with --no-resume (Python: "
        f"run_recipe(recipe, resume=False)) to convert afresh and replace it, or set training.output_dir "
        "to another folder."
    )


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_recipe(recipe: dict[str, Any], progress: bool = True, resume: bool | str = True) -> dict[str, Any]:
    """Run a recipe end to end.

    Returns the numbers (also written to OUTPUT_DIR/summary.json: perplexities per stage, steps,
    layers) plus, for callers in the same process, the trained `model`, the `eval_windows` and
    the `tokenizer` (not written to the JSON)."""
    from .base_models import load_base_model
    from .fidelity import measure_fidelity
    from .training import LisaTrainer, TimeBudgetCallback, TokenWindowDataset, cache_teacher_topk

    recipe = copy.deepcopy(recipe)
    validate_recipe(recipe)
    training = dict(recipe.get("training", {}))
    output_dir = Path(training.setdefault("output_dir", "runs/lisa"))
    training.setdefault("report_to", [])
    training.setdefault("save_strategy", "steps")
    training.setdefault("disable_tqdm", not progress)
    model, tokenizer = load_base_model(recipe["base_model"], dtype=_DTYPES[recipe.get("dtype", "float32")])
    data = prepare_data(tokenizer, recipe, model=model, progress=progress)
    train, evaluation, eval_name = data["train"], data["eval"], data["eval_name"]
    summary: dict[str, Any] = {"heldout_text": eval_name, "in_domain_eval": data["in_domain"], "fidelity": {}}

    def stage_fidelity(stage: str, lisa_model) -> dict[str, Any]:
        report = measure_fidelity(lisa_model, evaluation, eval_name, progress=progress).as_dict()
        summary["fidelity"][stage] = report
        return {k: report[k] for k in ("kl", "ppl_ratio", "lisa_ppl")}

    peft_model = build_lisa_model(model, tokenizer, recipe, output_dir, progress, stage_fidelity, train,
                                  reuse=bool(resume))
    stages = (peft_model.peft_config["default"].layer_scores or {}).get("stages", {})
    for stage, figures in stages.items():  # a reused converted adapter: its recorded figures
        summary["fidelity"].setdefault(stage, {"text": eval_name, **figures})
    callbacks = []
    if recipe.get("time_budget_minutes"):
        anneal = training.get("lr_scheduler_type") in ("constant", "constant_with_warmup")
        callbacks.append(TimeBudgetCallback(60.0 * float(recipe["time_budget_minutes"]), anneal=anneal))
    distill_weight = float(recipe.get("distill_weight", 1.0))
    topk = int(recipe.get("teacher_topk", 64))
    teacher = None
    if topk > 0 and distill_weight > 0:
        teacher = cache_teacher_topk(peft_model, train, k=topk, progress=progress)
    trainer = LisaTrainer(
        model=peft_model,
        args=transformers.TrainingArguments(**training),
        train_dataset=TokenWindowDataset(train, teacher),
        distill_weight=distill_weight,
        callbacks=callbacks,
    )
    checkpoint = resume if isinstance(resume, str) else (_last_checkpoint(output_dir) if resume else None)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    summary["train_loss"] = result.training_loss
    summary["train_steps"] = trainer.state.global_step
    summary["world_size"] = trainer.args.world_size
    final = measure_fidelity(peft_model, evaluation, eval_name, progress=progress)
    summary["fidelity"]["trained"] = final.as_dict()
    summary["base_ppl"], summary["lisa_ppl_trained"] = final.base_ppl, final.lisa_ppl
    summary["kl_trained"], summary["ppl_ratio_trained"] = final.kl, final.ppl_ratio
    summary["lisa_layers"] = peft_model.peft_config["default"].lisa_layers
    summary["num_layers"] = peft_model.get_base_model().config.num_hidden_layers
    summary["adapter_dir"] = str(output_dir / FINAL_ADAPTER_DIR)
    zero_shot = recipe.get("zero_shot")
    if zero_shot:
        summary["zero_shot"] = measure_zero_shot(peft_model, tokenizer, zero_shot, progress)
    record_fidelity(peft_model, summary)
    if trainer.is_world_process_zero():
        peft_model.save_pretrained(output_dir / FINAL_ADAPTER_DIR)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["model"] = peft_model
    summary["eval_windows"] = evaluation
    summary["tokenizer"] = tokenizer
    return summary


def measure_zero_shot(
    peft_model: PeftModel, tokenizer, settings: dict[str, Any], progress: bool
) -> dict[str, Any] | None:
    """Zero-shot accuracy, base vs LiSA, on the recipe's `zero_shot.file` (ARC-style JSON lines; evaluation
    only). A missing file is skipped with a warning when `zero_shot.required` is false (the default), so a
    recipe that names a development file still runs on a machine without it."""
    from .zero_shot import compare_zero_shot, load_multiple_choice_jsonl

    if not isinstance(settings, dict) or "file" not in settings:
        raise ValueError(f"zero_shot must be a mapping with a `file` (ARC-style JSON lines), got {settings!r}.")
    path = Path(settings["file"]).expanduser()
    if not path.is_file():
        if settings.get("required", False):
            raise FileNotFoundError(f"zero_shot.file not found: {path}")
        logger.warning("zero_shot.file %s not found: zero-shot accuracy is skipped.", path)
        return None
    questions = load_multiple_choice_jsonl(path, settings.get("limit"))
    results = compare_zero_shot(peft_model, tokenizer, questions, progress=progress)
    return {
        "task": settings.get("name", path.stem), "questions": len(questions),
        "base_acc": results["base"].acc, "lisa_acc": results["lisa"].acc,
        "base_acc_norm": results["base"].acc_norm, "lisa_acc_norm": results["lisa"].acc_norm,
    }


def record_fidelity(peft_model: PeftModel, summary: dict[str, Any], adapter_name: str = "default") -> None:
    """Store the held-out figures in the adapter config (`layer_scores["fidelity"]`), so that
    `adapter_config.json` and the model card (`lisa_peft.model_card`) carry them wherever the adapter goes."""
    config = peft_model.peft_config[adapter_name]
    scores = dict(config.layer_scores or {})
    final = summary["fidelity"]["trained"]
    scores["fidelity"] = {
        "text": summary["heldout_text"], "in_domain": summary["in_domain_eval"], "tokens": final["tokens"],
        "kl": round(final["kl"], 5), "ppl_ratio": round(final["ppl_ratio"], 4),
        "base_ppl": round(final["base_ppl"], 3), "lisa_ppl": round(final["lisa_ppl"], 3),
        "train_steps": summary["train_steps"],
    }
    if summary.get("zero_shot"):
        scores["fidelity"]["zero_shot"] = {k: (round(v, 4) if isinstance(v, float) else v)
                                           for k, v in summary["zero_shot"].items()}
    config.layer_scores = scores


def _last_checkpoint(output_dir: Path) -> str | None:
    if not output_dir.is_dir():
        return None
    return transformers.trainer_utils.get_last_checkpoint(str(output_dir))
