"""`evaluate` metric: how closely a LiSA model's attention follows its base model's, layer by layer.

Load offline from the package: ``evaluate.load(lisa_peft.evaluation.metrics.metric_path("attention_fidelity"))``.
"""

from __future__ import annotations

import datasets
import evaluate

from lisa_peft.evaluation.metrics.core import CITATION, attention_fidelity

_DESCRIPTION = """\
Per-layer Jensen-Shannon divergence (natural log, between 0 and ln 2) between the attention
distributions of the base model and of the LiSA model on the same texts, averaged over heads and real
query positions. The base attention comes from the same `PeftModel` under `disable_adapter()`, the LiSA
attention from the model with its adapter active; both are read from every layer's attention module
(eager attention and the PyTorch LiSA path are switched on for the measurement and restored after).
The comparison is end to end: layers after a LiSA layer see changed hidden states, so they can differ
from the base even when they are not LiSA layers; layers before the first LiSA layer give 0.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list[str]`): the texts.
    model: a `peft.PeftModel` with an active LiSA adapter.
    tokenizer: the model's tokenizer (needs a BOS token unless `add_start_token=False`).
    batch_size (`int`, default 1): texts per forward pass; the base attention of every layer of a batch
        is held in memory (L x B x H x T x T floats).
    max_length (`int`, optional): keep at most this many tokens of each text (BOS included).
    add_start_token (`bool`, default True): prepend the BOS token.
Returns:
    js_per_layer (`dict[int, float]`): layer index -> mean JS divergence.
    mean_js_lisa_layers (`float`): mean of js_per_layer over the LiSA layers.
    lisa_layers (`list[int]`): the layers whose attention LiSA replaces.
    num_rows (`int`): number of query positions averaged over.
Examples:
    >>> import evaluate
    >>> from lisa_peft.evaluation.metrics import metric_path
    >>> fidelity = evaluate.load(metric_path("attention_fidelity"))  # doctest: +SKIP
    >>> fidelity.compute(predictions=["some text"], model=peft_model, tokenizer=tokenizer)  # doctest: +SKIP
    {'js_per_layer': {0: 0.0, ...}, 'mean_js_lisa_layers': ..., 'lisa_layers': [...], 'num_rows': ...}
"""



@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AttentionFidelity(evaluate.Metric):
    """Per-layer JS divergence between base and LiSA attention of a LiSA PeftModel."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(
        self,
        predictions: list[str],
        model=None,
        tokenizer=None,
        batch_size: int = 1,
        max_length: int | None = None,
        add_start_token: bool = True,
    ) -> dict:
        # Non-feature keywords of `compute(...)` reach `_compute` unchanged (objects, not Arrow columns).
        if model is None or tokenizer is None:
            raise ValueError("attention_fidelity needs model=<LiSA PeftModel> and tokenizer=<its tokenizer>.")
        return attention_fidelity(model, tokenizer, predictions, batch_size, max_length, add_start_token)
