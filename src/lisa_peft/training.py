"""Training LiSA weights with the standard `transformers.Trainer`.

* `LisaTrainer`: a `Trainer` whose loss can mix causal-LM cross-entropy with self-distillation:
  KL(base model's next-token distribution || LiSA model's), where the base model is the same
  `PeftModel` run under `disable_adapter()` (no second copy of the weights).
* `TimeBudgetCallback`: stops training after a wall-clock budget (the CPU demo uses it).
* `TokenWindowDataset`: fixed-length token windows with `labels = input_ids`.
* `perplexity`: held-out perplexity of a (PEFT) model on token windows.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm


class TokenWindowDataset(torch.utils.data.Dataset):
    """Token windows [N, T] as `{"input_ids", "labels"}` examples (labels = inputs, causal LM)."""

    def __init__(self, windows: torch.Tensor) -> None:
        if windows.dim() != 2:
            raise ValueError(f"TokenWindowDataset takes [N, T] token ids, got shape {tuple(windows.shape)}.")
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """Mean over tokens of KL(teacher || student) on [B, T, V] logits, scaled by T^2 (a scalar tensor)."""
    t = temperature
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t


class LisaTrainer(transformers.Trainer):
    """`transformers.Trainer` with optional self-distillation from the adapter-disabled model.

    loss = (1 - distill_weight) * CE + distill_weight * KL(base || LiSA). With
    `distill_weight=0` this is exactly the standard Trainer loss.
    """

    def __init__(self, *args, distill_weight: float = 0.0, distill_temperature: float = 1.0, **kwargs) -> None:
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight}.")
        super().__init__(*args, **kwargs)
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.distill_weight == 0.0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        peft_model = getattr(model, "module", model)
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad(), peft_model.disable_adapter():
            teacher_logits = model(**teacher_inputs).logits
        outputs = model(**inputs)
        kl = distillation_kl(outputs.logits, teacher_logits, self.distill_temperature)
        loss = (1.0 - self.distill_weight) * outputs.loss + self.distill_weight * kl
        return (loss, outputs) if return_outputs else loss


class TimeBudgetCallback(transformers.TrainerCallback):
    """Stop training (and save) once `seconds` of wall-clock training time have passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self._start >= self.seconds:
            control.should_training_stop = True
            control.should_save = True
        return control


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "ppl") -> float:
    """exp(mean next-token cross-entropy) of `model` over token windows [N, T]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    try:
        for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
            batch = windows[start : start + batch_size].to(device)
            loss = model(batch, labels=batch, use_cache=False).loss
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += loss.item() * n
            tokens += n
    finally:
        model.train(was_training)
    return math.exp(total / tokens)
