"""`evaluate` metrics for LiSA models, shipped inside the package (no Hub needed).

Each metric is an `evaluate` module script in its own folder here; load it with

>>> import evaluate
>>> from lisa_peft.evaluation.metrics import metric_path
>>> perplexity = evaluate.load(metric_path("lisa_perplexity"))  # doctest: +SKIP

* ``lisa_perplexity``: per-text perplexity of a model *object* (a `PreTrainedModel` or a `PeftModel`,
  LiSA adapters included). The Hub's ``perplexity`` metric takes a model id and loads it itself, so it
  cannot see an adapter and needs the Hub; this one takes the loaded model and works offline.
* ``attention_fidelity``: per-layer Jensen-Shannon divergence between the base model's attention
  (adapter disabled) and the LiSA model's attention, for a LiSA `PeftModel`.

The computations live in `lisa_peft.evaluation.metrics.core` (usable without `evaluate`); the scripts wrap them.
"""

from __future__ import annotations

from pathlib import Path

from .core import attention_fidelity, text_perplexities

METRICS: tuple[str, ...] = ("lisa_perplexity", "attention_fidelity")

__all__ = ["METRICS", "attention_fidelity", "metric_path", "text_perplexities"]


def metric_path(name: str) -> str:
    """The folder of metric `name` (one of `METRICS`), to pass to `evaluate.load`."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; available: {', '.join(METRICS)}.")
    return str(Path(__file__).resolve().parent / name)
