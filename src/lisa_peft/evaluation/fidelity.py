"""Fidelity of a LiSA model to its base model on held-out text: what a user who converts a model cares about.

A LiSA adapter is meant to make a model cheaper, not different. On token windows of held-out text
(used neither for calibration nor for training, ideally from another source than the training text)
this module measures, in one pass per batch:

* the per-token KL(base || LiSA) of the next-token distributions (nats/token): 0 = identical models;
* the perplexity of the base model and of the LiSA model, and their ratio LiSA/base
  (= exp(mean NLL difference)); 1.0 = as good as the base on this text.

The base model is the same `PeftModel` under `disable_adapter()` (no second copy of the weights).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

__all__ = ["FidelityReport", "measure_fidelity"]


@dataclass(frozen=True)
class FidelityReport:
    """Fidelity of a LiSA model to its base model on one held-out text.

    text: the name of the held-out text (shown next to every figure); tokens: next-token predictions
    counted; kl: mean KL(base || LiSA) per token (nats); base_ppl / lisa_ppl: perplexities;
    ppl_ratio: lisa_ppl / base_ppl."""

    text: str
    tokens: int
    kl: float
    base_ppl: float
    lisa_ppl: float

    @property
    def ppl_ratio(self) -> float:
        return self.lisa_ppl / self.base_ppl

    def as_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "ppl_ratio": self.ppl_ratio}


@torch.no_grad()
def measure_fidelity(
    peft_model: torch.nn.Module,
    windows: torch.Tensor,
    text_name: str,
    batch_size: int = 4,
    progress: bool = False,
) -> FidelityReport:
    """KL(base || LiSA) and perplexities of `peft_model` (a LiSA `PeftModel`) on token windows [N, T].

    Each window of T tokens contributes T - 1 predictions. `text_name` names the held-out text in the
    report (e.g. "pydoc topics (held out; training used model-sampled text)")."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"measure_fidelity takes token windows [N, T] with T >= 2, got {tuple(windows.shape)}.")
    if not hasattr(peft_model, "disable_adapter"):
        raise TypeError("measure_fidelity needs the LiSA PeftModel (it runs the base model under disable_adapter()).")
    was_training = peft_model.training
    peft_model.eval()
    device = next(peft_model.parameters()).device
    nll_base = nll_lisa = kl = 0.0
    count = 0
    try:
        for start in tqdm(range(0, windows.shape[0], batch_size), desc=f"fidelity ({text_name})",
                          disable=not progress, leave=False):
            batch = windows[start : start + batch_size].to(device)
            targets = batch[:, 1:, None]
            with peft_model.disable_adapter():
                log_p = peft_model(batch, use_cache=False).logits[:, :-1].float().log_softmax(-1)
            log_q = peft_model(batch, use_cache=False).logits[:, :-1].float().log_softmax(-1)
            nll_base -= log_p.gather(-1, targets).sum().item()
            nll_lisa -= log_q.gather(-1, targets).sum().item()
            kl += (log_p.exp() * (log_p - log_q)).sum().item()
            count += targets.numel()
            del log_p, log_q
    finally:
        peft_model.train(was_training)
    return FidelityReport(
        text=text_name, tokens=count, kl=kl / count,
        base_ppl=math.exp(nll_base / count), lisa_ppl=math.exp(nll_lisa / count),
    )
