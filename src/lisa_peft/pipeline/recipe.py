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
  (`lisa_peft.pipeline.sampled_corpus`, cached once): data-free distillation, no domain to over-fit to;
  `calibration.texts: sampled` uses the first `num_sequences` training windows, cut to `seq_len`;
* `embedded`: English prose shipped with Python (its pydoc topics, `lisa_peft.pipeline.data.embedded_corpus`);
* a list of local `.txt` paths and/or `hf:NAME[:CONFIG][:SPLIT]` datasets.

Fidelity is measured on `data.eval` (default `embedded`), which must be text of another source than the
training text: per-token KL(base || LiSA) and the perplexity ratio LiSA/base, after every stage
(`lisa_peft.evaluation.fidelity`), named in the summary. When `data.eval` is not given and the model trains on
user text, the last `holdout` fraction of that text is evaluated instead and the summary labels the
figures "in-domain" (they then measure domain adaptation, not fidelity).
Multi-GPU / multi-node runs go through `accelerate launch` (see `recipes/accelerate/`): the
`Trainer` handles DDP, FSDP and DeepSpeed; nothing here is distributed by hand.

A recipe is validated when it is loaded, before any model is loaded or anything written (`validate_recipe`):
an unknown key in any section (with the closest valid one suggested), a wrong type or a wrong value raises a
`RecipeError` naming the file and the field. The valid keys come from the code that reads them: `RECIPE_KEYS`
(top level), `DATA_KEYS` (read by `prepare_data`), `calibration_keys()` (`texts` and the keyword arguments of
`lisa_peft.pipeline.convert.convert`), `ZERO_SHOT_KEYS`, LisaConfig's fields and transformers.TrainingArguments' fields.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import inspect
import json
import logging
import os
import re
import time
import types
import typing
import warnings
from collections import abc
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from peft import PeftModel

from ..tuners.lisa import LisaConfig
from .data import load_texts, split_texts, spread_windows, token_windows
from .recipe_files import closest

logger = logging.getLogger(__name__)
SAMPLED, EMBEDDED = "sampled", "embedded"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INIT_ADAPTER_DIR = "lisa_init"
CONVERSION_SETTINGS_FILE = "conversion_settings.json"  # beside the converted adapter in OUTPUT_DIR/lisa_init
CONVERSION_KEYS = ("base_model", "dtype", "lisa", "calibration", "data")
FINAL_ADAPTER_DIR = "adapter"
# calibration.texts: sampled calibrates on the first `num_sequences` training windows, cut to `seq_len` tokens
SAMPLED_CALIBRATION = {"num_sequences": 16, "seq_len": 128}


class RecipeError(ValueError):
    """A mistake in a recipe (a key, a type, a value, the YAML itself), found when the recipe is loaded:
    before any model is loaded or anything is written.

    `where`: the file (or "recipe"); `problems`: (field, what is wrong and how to fix it) pairs, the field
    dotted (`training.max_steps`), "" for the file as a whole. `str(error)` is one paragraph naming them all;
    `lisa-peft train` / `demo` print it without a traceback and exit with status 2."""

    def __init__(self, where: str, problems: list[tuple[str, str]]) -> None:
        self.where, self.problems = where, list(problems)
        parts = [f"{field}: {text.rstrip('.')}" if field else text.rstrip(".") for field, text in self.problems]
        count = f"{len(parts)} problems: " if len(parts) > 1 else ""
        message = f"{where}: {count}{'; '.join(parts)}"
        super().__init__(message if message.endswith("?") else message + ".")

    def __reduce__(self):
        return type(self), (self.where, self.problems)


@dataclass(frozen=True)
class Setting:
    """One recipe key: the values it takes (a type annotation such as `int`, `float | None`, `str | list[str]`),
    the default the code reading it uses when the key is absent, a check of the value (run once the type fits,
    not on null) that returns what is wrong or None, whether it must be given, and what it is (for messages)."""

    type: Any
    default: Any = None
    check: Callable[[Any], str | None] | None = None
    required: bool = False
    help: str = ""


def setting(values: Mapping[str, Any], schema: Mapping[str, Setting], key: str) -> Any:
    """`values[key]`, else the key's default in `schema` (a KeyError for a key the schema does not declare,
    so that every key the code reads is one that validation knows)."""
    default = schema[key].default
    return values.get(key, default) if values else default


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda value: None if value >= low else f"must be >= {low}, got {value!r}"


def _between(low: float, high: float, closed: bool = True) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        inside = low <= value <= high if closed else low < value < high
        brackets = "[]" if closed else "()"
        return None if inside else f"must be in {brackets[0]}{low}, {high}{brackets[1]}, got {value!r}"

    return check


def _one_of(choices: Collection[str]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value in choices:
            return None
        return f"must be one of {', '.join(map(repr, choices))}, got {value!r}{_did_you_mean(value, choices)}"

    return check


def _did_you_mean(value: Any, choices: Collection[str]) -> str:
    close = closest(value, list(choices))
    return f"; did you mean {close!r}?" if close else ""


def _text_source_check(allow_sampled: bool) -> Callable[[Any], str | None]:
    """The check of a text-source setting (`data.train`, `data.eval`, `calibration.texts`): 'sampled' (where
    allowed), 'embedded', or .txt files that exist and / or `hf:NAME[:CONFIG][:SPLIT]` datasets."""
    def check(value: Any) -> str | None:
        if value == SAMPLED and not allow_sampled:
            return ("'sampled' cannot be held-out text (fidelity is measured on text of another source than the "
                    "training text): use 'embedded', .txt paths or hf:NAME datasets")
        if value in (SAMPLED, EMBEDDED):
            return None
        for source in [value] if isinstance(value, str) else value:
            if source.startswith("hf:"):
                if not source[3:].split(":")[0]:
                    return f"{source!r} names no dataset: write hf:NAME[:CONFIG][:SPLIT]"
            elif not Path(source).expanduser().is_file():
                choices = (SAMPLED, EMBEDDED) if allow_sampled else (EMBEDDED,)
                return (f"{source!r} is not a file; a text source is {' or '.join(map(repr, choices))}, or a list of "
                        f".txt paths and / or hf:NAME[:CONFIG][:SPLIT] datasets{_did_you_mean(source, choices)}")
        return None

    return check


def _accepts(value: Any, annotation: Any) -> bool:
    """Whether `value` (as read from YAML) has the type `annotation` describes. Literal values and Enum
    members are checked by `_enum_problem` or by the code that reads them; forms not handled here pass."""
    if annotation is Any or isinstance(annotation, (str, typing.ForwardRef)):
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, arm) for arm in args)
    if origin is typing.Literal:
        return any(_accepts(value, type(arm)) for arm in args)
    if annotation in (list, tuple, set) or origin in (list, tuple, set, abc.Sequence):
        return isinstance(value, list) and (not args or all(_accepts(item, args[0]) for item in value))
    if annotation is dict or origin in (dict, abc.Mapping):
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or value in {member.value for member in annotation}
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _describe(annotation: Any) -> str:
    """`annotation` in words: "an integer or null", "a list of strings"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        words = list(dict.fromkeys(_describe(arm) for arm in args if arm is not type(None)))
        return " or ".join(words + (["null"] if type(None) in args else []))
    if origin is typing.Literal:
        return " or ".join(dict.fromkeys(_describe(type(arm)) for arm in args))
    if annotation in (list, tuple, set) or origin in (list, tuple, set, abc.Sequence):
        item = {int: " of integers", float: " of numbers", str: " of strings"}.get(args[0] if args else None, "")
        return f"a list{item}"
    if annotation is dict or origin in (dict, abc.Mapping):
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if annotation in names:
        return names[annotation]
    return f"a {getattr(annotation, '__name__', annotation)}"


def _type_problem(value: Any, annotation: Any) -> str | None:
    """What is wrong with the type of `value`, or None: "expected an integer, got 'ten'"."""
    if _accepts(value, annotation):
        return _enum_problem(value, annotation)
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    problem = f"expected {_describe(annotation)}, got {shown}"
    if isinstance(value, str) and _accepts(1.5, annotation) and re.fullmatch(r"[+-]?\d+[eE][+-]?\d+", value.strip()):
        # PyYAML (YAML 1.1) reads a number in exponent notation without a dot as a string
        dotted = re.sub(r"(\d)([eE])", r"\1.0\2", value.strip(), count=1)
        problem += f" (YAML reads {value} as text: write {dotted} or {float(value)!r})"
    return problem


def _enum_problem(value: Any, annotation: Any) -> str | None:
    """For a string given where `annotation` names an Enum (`SchedulerType | str`): a value that is none of
    its members, with the closest member suggested."""
    arms = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    enums = [arm for arm in arms if isinstance(arm, type) and issubclass(arm, enum.Enum)]
    if not enums or not isinstance(value, str):
        return None
    members = [str(member.value) for arm in enums for member in arm]
    if value in members:
        return None
    listed = (f"one of {', '.join(map(repr, members))}" if len(members) <= 15
              else f"one of the values of transformers' {enums[0].__name__}")
    return f"must be {listed}, got {value!r}{_did_you_mean(value, members)}"


def _check_section(
    values: Mapping[str, Any], schema: Mapping[str, Setting], prefix: str, what: str
) -> list[tuple[str, str]]:
    """(field, problem) for every unknown key (the closest valid one suggested), wrong type, wrong value and
    missing required key of one recipe section. `what`: where the valid keys are listed, for an unknown key
    without a close match in a section too large to list."""
    problems = []
    for key, value in values.items():
        field = f"{prefix}{key}"
        if key not in schema:
            hint = _did_you_mean(key, schema)
            if not hint:
                hint = f"; valid keys: {', '.join(sorted(schema))}" if len(schema) <= 15 else f"; see {what}"
            problems.append((field, f"unknown key{hint}"))
            continue
        problem = _type_problem(value, schema[key].type)
        if problem is None and value is not None and schema[key].check is not None:
            problem = schema[key].check(value)
        if problem:
            problems.append((field, problem))
    problems += [(f"{prefix}{key}", f"required but missing ({s.help})" if s.help else "required but missing")
                 for key, s in schema.items() if s.required and key not in values]
    return problems


def _field_in_message(message: str, section: str, fields: Collection[str], given: Collection[str]) -> str:
    """The dotted field a constructor's error message is about: a `backticked` field name, else the given key
    the message mentions first, else the section itself."""
    for name in re.findall(r"`(\w+)`", message):
        if name in fields:
            return f"{section}.{name}"
    found = [(match.start(), name) for name in given
             if (match := re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message))]
    return f"{section}.{min(found)[1]}" if found else section


RECIPE_KEYS: dict[str, Setting] = {
    "base_model": Setting(str, None, lambda value: None if value.strip() else "must not be empty", required=True,
                          help="an HF id, a local folder or 'smollm2-135m-instruct'"),
    "dtype": Setting(str, "float32", _one_of(tuple(_DTYPES))),
    "lisa": Setting(dict | None),  # keys: `lisa_keys()`
    "calibration": Setting(dict | None),  # keys: `calibration_keys()`
    "data": Setting(dict | None),  # keys: `DATA_KEYS`
    "distill_weight": Setting(float, 1.0, _between(0.0, 1.0)),
    "teacher_topk": Setting(int, 64, _at_least(0)),
    "time_budget_minutes": Setting(float | None, None, _at_least(0)),
    "training": Setting(dict | None),  # keys: `training_keys()`
    "zero_shot": Setting(dict | None),  # keys: `ZERO_SHOT_KEYS`
}
SECTIONS = set(RECIPE_KEYS)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a recipe YAML, apply `section.key=value` overrides (values parsed as YAML) and validate it
    (`validate_recipe`). A RecipeError names the file, the line of a YAML syntax error, and every wrong field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Recipe not found: {path}. See recipes/ for examples.")
    where = str(path)
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise RecipeError(where, [("", _yaml_problem(error))]) from error
    except UnicodeDecodeError as error:
        raise RecipeError(where, [("", f"not UTF-8 text ({error.reason} at byte {error.start})")]) from error
    recipe = {} if recipe is None else recipe
    if not isinstance(recipe, dict):
        raise RecipeError(where, [("", f"a recipe is a YAML mapping of sections, got {type(recipe).__name__}")])
    for item in overrides or []:
        _apply_override(recipe, item, where)
    validate_recipe(recipe, where, overrides=overrides or ())
    return recipe


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML syntax error as "line L, column C: not valid YAML (what)", counted from 1 as editors do."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    what = " ".join(str(part) for part in (getattr(error, "context", None), getattr(error, "problem", None)) if part)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}not valid YAML ({what or error})"


def _apply_override(recipe: dict[str, Any], item: str, where: str) -> None:
    """Set one `--set section.key=value` item (the value parsed as YAML) in `recipe`."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise RecipeError(where, [("", f"--set {item!r} must look like section.key=value, e.g. training.max_steps=10")])
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as error:
        what = " ".join(str(part) for part in (getattr(error, "context", None), getattr(error, "problem", None))
                        if part)
        raise RecipeError(where, [(key, f"--set {item!r}: the value is not valid YAML ({what or error})")]) from error
    target = recipe
    for depth, parent in enumerate(parts[:-1]):
        if target.get(parent) is None:
            target[parent] = {}
        if not isinstance(target[parent], dict):
            section = ".".join(parts[: depth + 1])
            raise RecipeError(where, [(section, f"--set {item!r}: {section} is {target[parent]!r}, not a section "
                                                f"with keys")])
        target = target[parent]
    target[parts[-1]] = parsed


def validate_recipe(recipe: Mapping[str, Any], where: str = "recipe", overrides: Sequence[str] = ()) -> None:
    """Check a whole recipe against the code that reads it; raise one RecipeError naming every problem
    (where, dotted field, what is wrong), with the closest valid name for an unknown key.

    Nothing is loaded or written. The keys: top level `RECIPE_KEYS`, `data:` `DATA_KEYS`, `calibration:`
    `calibration_keys()` (`lisa_peft.pipeline.convert.convert`'s keyword arguments), `zero_shot:` `ZERO_SHOT_KEYS`,
    `lisa:` LisaConfig's fields and `training:` transformers.TrainingArguments' fields; the values of these
    two are checked by constructing them (TrainingArguments without any device or distributed set-up).
    overrides: the `--set` items applied to the file, named next to the fields they set."""
    if not isinstance(recipe, Mapping):
        raise RecipeError(where, [("", f"a recipe is a YAML mapping of sections, got {type(recipe).__name__}")])
    problems = _check_section(recipe, RECIPE_KEYS, "", "the sections listed in lisa_peft.pipeline.recipe's docstring")

    def section(name: str) -> Mapping[str, Any] | None:
        value = recipe.get(name)
        return None if value is not None and not isinstance(value, Mapping) else (value or {})

    for name, schema, what in (
        ("data", DATA_KEYS, "lisa_peft.pipeline.recipe.DATA_KEYS"),
        ("calibration", calibration_keys(), "lisa_peft.pipeline.convert.convert"),
        ("zero_shot", ZERO_SHOT_KEYS, "lisa_peft.pipeline.recipe.ZERO_SHOT_KEYS"),
    ):
        values = section(name)
        if values is not None and (values or name != "zero_shot"):  # an empty zero_shot is off
            problems += _check_section(values, schema, f"{name}.", what)
    zero_shot = section("zero_shot")
    if zero_shot and setting(zero_shot, ZERO_SHOT_KEYS, "required") is True and isinstance(zero_shot.get("file"), str):
        if not Path(zero_shot["file"]).expanduser().is_file():
            problems.append(("zero_shot.file", f"{zero_shot['file']!r} is not a file, and zero_shot.required is true "
                                               "(false skips the zero-shot accuracy when the file is missing)"))
    lisa = section("lisa")
    if lisa is not None:
        found = _check_section(lisa, lisa_keys(), "lisa.", "the fields of LisaConfig")
        problems += found or _lisa_config_problems(lisa)
    if section("training") is not None:
        training = training_settings(recipe)
        found = _check_section(training, training_keys(), "training.", "the fields of transformers.TrainingArguments")
        problems += found or _training_arguments_problems(training)
    if not problems:
        problems = _calibration_fits(recipe)
    if problems:
        origins = {item.partition("=")[0].strip(): item for item in overrides}

        def named(field: str) -> str:
            item = next((item for key, item in origins.items() if field == key or field.startswith(key + ".")), None)
            return f"{field} (from --set {item})" if item else field

        raise RecipeError(where, [(named(field), text) for field, text in problems])


@functools.cache
def _dataclass_keys(cls: type) -> dict[str, Setting]:
    """A dataclass's constructor fields as recipe keys, typed by its annotations."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation this Python cannot resolve: that field's type is not checked
        hints = {}
    return {f.name: Setting(hints.get(f.name, f.type)) for f in dataclasses.fields(cls) if f.init}


def lisa_keys() -> dict[str, Setting]:
    """The keys of `lisa:`: LisaConfig's fields (its own checks run when the recipe is validated)."""
    return _dataclass_keys(LisaConfig)


def training_keys() -> dict[str, Setting]:
    """The keys of `training:`: transformers.TrainingArguments' fields."""
    return _dataclass_keys(transformers.TrainingArguments)


def training_settings(recipe: Mapping[str, Any], progress: bool = True) -> dict[str, Any]:
    """The recipe's `training:` section with this module's defaults: the TrainingArguments keyword arguments."""
    training = dict(recipe.get("training") or {})
    training.setdefault("output_dir", "runs/lisa")
    training.setdefault("report_to", [])
    training.setdefault("save_strategy", "steps")
    training.setdefault("disable_tqdm", not progress)
    return training


def _lisa_config_problems(lisa: Mapping[str, Any]) -> list[tuple[str, str]]:
    try:
        LisaConfig(**lisa)
    except (ValueError, TypeError) as error:
        return [(_field_in_message(str(error), "lisa", lisa_keys(), lisa), str(error))]
    return []


@functools.cache
def _value_checking_training_arguments() -> type:
    class ValueCheckingTrainingArguments(transformers.TrainingArguments):
        """TrainingArguments whose construction only checks the values: no device, no distributed process
        group is set up (that happens once, when the recipe runs)."""

        @functools.cached_property
        def _setup_devices(self) -> torch.device:
            return torch.device("cpu")

    return ValueCheckingTrainingArguments


def _training_arguments_problems(training: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Construct TrainingArguments from `training` to check its values, on any machine and with no lasting
    effect: what depends on the machine that trains (bf16/tf32 support, the DeepSpeed config's contents) is
    left to the run, and environment variables it sets are put back."""
    if training["output_dir"] is None:
        return [("training.output_dir", "must be a folder, got null")]
    deepspeed = training.get("deepspeed")
    if isinstance(deepspeed, str) and not deepspeed.lstrip().startswith("{") and not Path(deepspeed).is_file():
        return [("training.deepspeed", f"{deepspeed!r} is not a file (a DeepSpeed JSON config)")]
    environ = dict(os.environ)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _value_checking_training_arguments()(**{**training, "use_cpu": True, "tf32": None, "deepspeed": None})
    except (ValueError, TypeError, KeyError, NotImplementedError, ImportError, OSError) as error:
        return [(_field_in_message(str(error), "training", training_keys(), training), str(error))]
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update({key: value for key, value in environ.items() if os.environ.get(key) != value})
    return []


def _calibration_fits(recipe: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`calibration.texts: sampled` takes the first training windows: there must be enough of them, long enough
    (known before any text is sampled when the training text is sampled or capped by max_train_sequences)."""
    calibration, data = recipe.get("calibration") or {}, recipe.get("data") or {}
    if setting(calibration, calibration_keys(), "texts") != SAMPLED:
        return []
    n = calibration.get("num_sequences", SAMPLED_CALIBRATION["num_sequences"])
    t = calibration.get("seq_len", SAMPLED_CALIBRATION["seq_len"])
    seq_len = setting(data, DATA_KEYS, "seq_len")
    count_key = "sampled_sequences" if setting(data, DATA_KEYS, "train") == SAMPLED else "max_train_sequences"
    windows = setting(data, DATA_KEYS, count_key)
    if t <= seq_len and (windows is None or windows >= n):
        return []
    has = f"{windows} windows" if windows is not None else "windows"
    return [("calibration", f"texts: sampled calibrates on the first {n} training windows cut to {t} tokens, but "
                            f"the training text has {has} of {seq_len} tokens (data.{count_key}, data.seq_len): lower "
                            f"calibration.num_sequences / seq_len or raise data.{count_key} / seq_len")]


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


DATA_KEYS: dict[str, Setting] = {  # the keys of `data:`, read by `prepare_data`
    "train": Setting(str | list[str], SAMPLED, _text_source_check(allow_sampled=True)),
    "eval": Setting(str | list[str] | None, None, _text_source_check(allow_sampled=False)),
    "seq_len": Setting(int, 256, _at_least(2)),
    "sampled_sequences": Setting(int, 192, _at_least(1)),
    "sample_seed": Setting(int, 0),
    "holdout": Setting(float, 0.1, _between(0.0, 1.0, closed=False)),
    "max_train_sequences": Setting(int | None, None, _at_least(1)),
    "eval_seq_len": Setting(int | None, None, _at_least(2)),  # None: seq_len
    "max_eval_sequences": Setting(int | None, None, _at_least(1)),
}


def prepare_data(tokenizer, recipe: dict[str, Any], model=None, progress: bool = True) -> dict[str, Any]:
    """The recipe's token windows: {"train": [N, T], "eval": [M, T'], "eval_name": str, "in_domain": bool}.

    `model` (the base model) is needed when the training text is `sampled`."""
    get = functools.partial(setting, recipe.get("data") or {}, DATA_KEYS)
    seq_len = int(get("seq_len"))
    train_sources, eval_sources = _sources(get("train")), _sources(get("eval"))
    in_domain = False
    if train_sources == SAMPLED:
        if model is None:
            raise ValueError("data.train: sampled needs the base model to sample from.")
        from .sampled_corpus import sampled_windows

        n = int(get("sampled_sequences"))
        train = sampled_windows(model, tokenizer, n, seq_len, seed=int(get("sample_seed")), progress=progress)
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
            texts, eval_texts = split_texts(texts, float(get("holdout")))
            in_domain = True
            eval_name = (f"in-domain: last {float(get('holdout')):.0%} of the training text "
                         f"({describe_sources(train_sources)}); measures domain adaptation, not fidelity")
        train = token_windows(tokenizer, texts, seq_len, get("max_train_sequences"))
    eval_len = int(get("eval_seq_len") or seq_len)
    limit = get("max_eval_sequences")
    evaluation = spread_windows(token_windows(tokenizer, eval_texts, eval_len), None if limit is None else int(limit))
    return {"train": train, "eval": evaluation, "eval_name": eval_name, "in_domain": in_domain}


_CONVERT_ARGUMENTS_SET_HERE = ("adapter_name", "progress", "stage_callback", "calibration_ids")


@functools.cache
def calibration_keys() -> dict[str, Setting]:
    """The keys of `calibration:`: `texts`, and the keyword arguments of `lisa_peft.pipeline.convert.convert` that
    `build_lisa_model` passes on (types and defaults from its signature), minus those it sets itself."""
    from .convert import LAYER_SEARCH, SELECT_LAYERS_BY, convert

    checks = {
        "num_sequences": _at_least(1), "seq_len": _at_least(2), "layerwise_steps": _at_least(0),
        "layerwise_lr": lambda lr: None if lr > 0 else f"must be > 0, got {lr!r}", "batch_size": _at_least(1),
        "sensitivity_sequences": _at_least(1), "sensitivity_fit_steps": _at_least(0),
        "select_layers_by": _one_of(SELECT_LAYERS_BY), "layer_search": _one_of(LAYER_SEARCH),
    }
    try:
        hints = typing.get_type_hints(convert)
    except Exception:  # an annotation this Python cannot resolve: that argument's type is not checked
        hints = {}
    keys = {"texts": Setting(str | list[str], SAMPLED, _text_source_check(allow_sampled=True))}
    for name, parameter in inspect.signature(convert).parameters.items():
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in _CONVERT_ARGUMENTS_SET_HERE:
            keys[name] = Setting(hints.get(name, parameter.annotation), parameter.default, checks.pop(name, None))
    if checks:
        raise AssertionError(f"checks of calibration keys that convert() no longer takes: {sorted(checks)}")
    return keys


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
    calibration = dict(recipe.get("calibration") or {})
    config = LisaConfig(**(recipe.get("lisa") or {}))
    sources = _sources(calibration.pop("texts", SAMPLED))
    if sources == SAMPLED:
        if train_windows is None:
            raise ValueError("calibration.texts: sampled calibrates on the training windows; none were given.")
        n = int(calibration.pop("num_sequences", SAMPLED_CALIBRATION["num_sequences"]))
        t = int(calibration.pop("seq_len", SAMPLED_CALIBRATION["seq_len"]))
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
    """Raise a `RecipeError` if the adapter in init_dir was converted with other settings (or with unknown
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
    raise RecipeError(str(init_dir), [("", (
        f"{what}, so it does not belong to this recipe. Run again with --no-resume (Python: "
        f"run_recipe(recipe, resume=False)) to convert afresh and replace it, or set training.output_dir "
        "to another folder"
    ))])


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class StageClock:
    """Wall-clock seconds per stage of a run: `lap(name)` records the time since the previous lap, `finish()`
    the total."""

    def __init__(self) -> None:
        self.start = self._last = time.monotonic()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = round(now - self._last, 1)
        self._last = now

    def finish(self) -> None:
        self.seconds["total"] = round(time.monotonic() - self.start, 1)


def run_recipe(recipe: dict[str, Any], progress: bool = True, resume: bool | str = True) -> dict[str, Any]:
    """Run a recipe end to end.

    Returns the numbers (also written to OUTPUT_DIR/summary.json: perplexities per stage, steps,
    layers) plus, for callers in the same process, the trained `model`, the `eval_windows` and
    the `tokenizer` (not written to the JSON)."""
    from ..evaluation.fidelity import measure_fidelity
    from ..evaluation.operating_point import model_operating_point
    from .base_models import load_base_model
    from .training import LisaTrainer, TimeBudgetCallback, TokenWindowDataset, cache_teacher_topk

    recipe = copy.deepcopy(recipe)
    validate_recipe(recipe)
    clock = StageClock()
    training = training_settings(recipe, progress)
    output_dir = Path(training["output_dir"])
    init_dir = output_dir / INIT_ADAPTER_DIR
    if resume and (init_dir / "adapter_config.json").is_file():  # before the model loads: a stale adapter
        check_same_conversion(init_dir, conversion_settings(recipe))
    model, tokenizer = load_base_model(recipe["base_model"], dtype=_DTYPES[setting(recipe, RECIPE_KEYS, "dtype")])
    # On the Trainer's device (this process's GPU) from here on: sampling, conversion, the teacher's top-k and the
    # fidelity figures run there, not on the CPU the weights load to. Set up after the load: with a process group
    # up, an FSDP launch (cpu_ram_efficient_loading) would give every rank but the first empty weights.
    args = transformers.TrainingArguments(**training)
    model.to(args.device)
    clock.lap("load_model")
    data = prepare_data(tokenizer, recipe, model=model, progress=progress)
    clock.lap("data")
    train, evaluation, eval_name = data["train"], data["eval"], data["eval_name"]
    summary: dict[str, Any] = {"heldout_text": eval_name, "in_domain_eval": data["in_domain"], "fidelity": {},
                               "seconds": clock.seconds}

    def stage_fidelity(stage: str, lisa_model) -> dict[str, Any]:
        report = measure_fidelity(lisa_model, evaluation, eval_name, progress=progress).as_dict()
        summary["fidelity"][stage] = report
        return {k: report[k] for k in ("kl", "ppl_ratio", "lisa_ppl")}

    peft_model = build_lisa_model(model, tokenizer, recipe, output_dir, progress, stage_fidelity, train,
                                  reuse=bool(resume))
    clock.lap("conversion")
    stages = (peft_model.peft_config["default"].layer_scores or {}).get("stages", {})
    for stage, figures in stages.items():  # a reused converted adapter: its recorded figures
        summary["fidelity"].setdefault(stage, {"text": eval_name, **figures})
    callbacks = []
    if setting(recipe, RECIPE_KEYS, "time_budget_minutes"):
        anneal = training.get("lr_scheduler_type") in ("constant", "constant_with_warmup")
        callbacks.append(TimeBudgetCallback(60.0 * float(recipe["time_budget_minutes"]), anneal=anneal))
    distill_weight = float(setting(recipe, RECIPE_KEYS, "distill_weight"))
    topk = int(setting(recipe, RECIPE_KEYS, "teacher_topk"))
    teacher = None
    if topk > 0 and distill_weight > 0:
        teacher = cache_teacher_topk(peft_model, train, k=topk, progress=progress)
    clock.lap("teacher")
    trainer = LisaTrainer(
        model=peft_model,
        args=args,
        train_dataset=TokenWindowDataset(train, teacher),
        distill_weight=distill_weight,
        callbacks=callbacks,
    )
    checkpoint = resume if isinstance(resume, str) else (_last_checkpoint(output_dir) if resume else None)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    clock.lap("training")
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
    summary["operating_point"] = model_operating_point(peft_model).as_dict()
    clock.lap("evaluation")
    clock.finish()
    if trainer.is_world_process_zero():
        peft_model.save_pretrained(output_dir / FINAL_ADAPTER_DIR)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["model"] = peft_model
    summary["eval_windows"] = evaluation
    summary["tokenizer"] = tokenizer
    return summary


ZERO_SHOT_KEYS: dict[str, Setting] = {  # the keys of `zero_shot:`, read by `measure_zero_shot`
    "file": Setting(str, required=True, help="ARC-style JSON lines"),
    "name": Setting(str | None),  # None: the file's stem
    "limit": Setting(int | None, None, _at_least(1)),
    "required": Setting(bool, False),
}


def measure_zero_shot(
    peft_model: PeftModel, tokenizer, settings: dict[str, Any], progress: bool
) -> dict[str, Any] | None:
    """Zero-shot accuracy, base vs LiSA, on the recipe's `zero_shot.file` (ARC-style JSON lines; evaluation
    only). A missing file is skipped with a warning when `zero_shot.required` is false (the default), so a
    recipe that names a development file still runs on a machine without it."""
    from ..evaluation.zero_shot import compare_zero_shot, load_multiple_choice_jsonl

    if not isinstance(settings, dict) or "file" not in settings:
        raise ValueError(f"zero_shot must be a mapping with a `file` (ARC-style JSON lines), got {settings!r}.")
    path = Path(settings["file"]).expanduser()
    if not path.is_file():
        if setting(settings, ZERO_SHOT_KEYS, "required"):
            raise FileNotFoundError(f"zero_shot.file not found: {path}")
        logger.warning("zero_shot.file %s not found: zero-shot accuracy is skipped.", path)
        return None
    questions = load_multiple_choice_jsonl(path, setting(settings, ZERO_SHOT_KEYS, "limit"))
    results = compare_zero_shot(peft_model, tokenizer, questions, progress=progress)
    return {
        "task": setting(settings, ZERO_SHOT_KEYS, "name") or path.stem, "questions": len(questions),
        "base_acc": results["base"].acc, "lisa_acc": results["lisa"].acc,
        "base_acc_norm": results["base"].acc_norm, "lisa_acc_norm": results["lisa"].acc_norm,
    }


def record_fidelity(peft_model: PeftModel, summary: dict[str, Any], adapter_name: str = "default") -> None:
    """Store the held-out figures in the adapter config (`layer_scores["fidelity"]`), so that
    `adapter_config.json` and the model card (`lisa_peft.integrations.hub.model_card`) carry them wherever the
    adapter goes."""
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
