"""`evaluate` metric: perplexity of a loaded (PEFT) causal LM, e.g. a LiSA adapter on its base model.

Load offline from the package: ``evaluate.load(lisa_peft.evaluation.metrics.metric_path("lisa_perplexity"))``.
"""

from __future__ import annotations

import datasets
import evaluate

from lisa_peft.evaluation.metrics.core import CITATION, text_perplexities

_DESCRIPTION = """\
Perplexity of each input text under a causal language model object: exp of the mean next-token
cross-entropy over the text's tokens (the BOS token is prepended, so the first token is predicted too).
Unlike the Hub's `perplexity` metric, which takes a model id and loads the model itself, this metric
takes the already loaded model (a `transformers.PreTrainedModel` or a `peft.PeftModel`), so it needs no
Hub access and measures the model with its adapter (LiSA or any other PEFT method) applied.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list[str]`): the texts to score.
    model: a causal LM object (`PreTrainedModel` or `PeftModel`), called as
        `model(input_ids, attention_mask=...)` and returning `.logits` [B, T, V].
    tokenizer: the model's tokenizer (needs a BOS token unless `add_start_token=False`).
    batch_size (`int`, default 8): texts per forward pass (right-padded).
    max_length (`int`, optional): keep at most this many tokens of each text (BOS included).
    add_start_token (`bool`, default True): prepend the BOS token.
Returns:
    perplexities (`list[float]`): one perplexity per text, in input order.
    mean_perplexity (`float`): their plain mean.
Examples:
    >>> import evaluate
    >>> from lisa_peft.evaluation.metrics import metric_path
    >>> ppl = evaluate.load(metric_path("lisa_perplexity"))  # doctest: +SKIP
    >>> ppl.compute(predictions=["some text"], model=peft_model, tokenizer=tokenizer)  # doctest: +SKIP
    {'perplexities': [...], 'mean_perplexity': ...}
"""



@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LisaPerplexity(evaluate.Metric):
    """Perplexity of a loaded causal LM object (works offline and with PEFT adapters)."""

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
        batch_size: int = 8,
        max_length: int | None = None,
        add_start_token: bool = True,
    ) -> dict:
        # `evaluate` passes the feature columns (`predictions`) from its Arrow cache and every other
        # keyword of `compute(...)` unchanged, so `model` and `tokenizer` arrive as the objects given.
        if model is None or tokenizer is None:
            raise ValueError("lisa_perplexity needs model=<loaded model> and tokenizer=<its tokenizer>.")
        perplexities = text_perplexities(model, tokenizer, predictions, batch_size, max_length, add_start_token)
        return {"perplexities": perplexities, "mean_perplexity": sum(perplexities) / len(perplexities)}
