"""Task types of LiSA adapters: the `PeftModel` class PEFT picks from `LisaConfig.task_type`, and a clear error
when the model cannot be one.

LiSA replaces self-attention inside the decoder stack, so it works under every LLaMA head; the task type only
picks PEFT's wrapper, as for LoRA:

* `CAUSAL_LM` (the default, `None` becomes it): `LlamaForCausalLM` -> `PeftModelForCausalLM`;
* `SEQ_CLS`: `LlamaForSequenceClassification` -> `PeftModelForSequenceClassification`, which trains and saves the
  `score` head through `modules_to_save`; `TOKEN_CLS` (`LlamaForTokenClassification`) and `QUESTION_ANS`
  (`LlamaForQuestionAnswering`, head `qa_outputs`) likewise;
* `FEATURE_EXTRACTION`: a bare `LlamaModel` -> `PeftModelForFeatureExtraction`.

`PeftModelForCausalLM` reads the model's `prepare_inputs_for_generation`, which a classifier or a bare
`LlamaModel` does not have (PEFT's bare `AttributeError`). `install_task_type_guard()` wraps its `__init__`: for a
LiSA config on such a model it raises a `ValueError` naming the task type to set instead. Other adapter types
pass through unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .patching import wrap_method
from .registration import is_lisa_config

# class-name suffix of a transformers head -> the PEFT task type that wraps it
TASK_TYPE_BY_HEAD = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def suggested_task_type(model: Any) -> str:
    """The PEFT task type for a model that cannot generate: from its head's class name, else FEATURE_EXTRACTION."""
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPE_BY_HEAD if name.endswith(suffix)), "FEATURE_EXTRACTION")


def causal_lm_task_error(model: Any) -> ValueError:
    """The error for a LiSA config with task_type CAUSAL_LM on a model without `prepare_inputs_for_generation`."""
    name, task = type(model).__name__, suggested_task_type(model)
    return ValueError(
        f"This LiSA config has task_type='CAUSAL_LM' (also what the default None becomes), which wraps the model in "
        f"PeftModelForCausalLM, but {name} is not a causal language model (it cannot generate). Set the task type "
        f"of the model: LisaConfig(..., task_type={task!r}) (SEQ_CLS for *ForSequenceClassification, TOKEN_CLS for "
        "*ForTokenClassification, QUESTION_ANS for *ForQuestionAnswering, FEATURE_EXTRACTION for a bare LlamaModel); "
        "the classification task types also train and save the head (modules_to_save). A saved adapter loads onto "
        "the model class it was trained with."
    )


def _check_causal_lm(original: Callable) -> Callable:
    @functools.wraps(original)
    def __init__(self: Any, model: Any, peft_config: Any, *args: Any, **kwargs: Any) -> None:
        if is_lisa_config(peft_config) and not callable(getattr(model, "prepare_inputs_for_generation", None)):
            raise causal_lm_task_error(model)
        original(self, model, peft_config, *args, **kwargs)

    return __init__


def install_task_type_guard() -> None:
    """Wrap `PeftModelForCausalLM.__init__(model, peft_config, ...)` (idempotent)."""
    from peft import PeftModelForCausalLM

    wrap_method(PeftModelForCausalLM, "__init__", _check_causal_lm)


__all__ = ["TASK_TYPE_BY_HEAD", "causal_lm_task_error", "install_task_type_guard", "suggested_task_type"]
