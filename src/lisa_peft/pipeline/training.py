"""Training LiSA weights with the standard `transformers.Trainer`.

* `LisaTrainer`: a `Trainer` whose loss is self-distillation by default: KL(base model's next-token
  distribution || LiSA model's), where the base model is the same `PeftModel` run under
  `disable_adapter()` (no second copy of the weights); `distill_weight < 1` mixes in the causal-LM
  loss on the training text (task fine-tuning / domain adaptation).
* `cache_teacher_topk` + `TokenWindowDataset(windows, teacher=...)`: the base model's top-k
  next-token log-probabilities computed once, so a distillation step costs one forward and backward
  instead of two forwards and a backward when windows are seen more than once.
* `TimeBudgetCallback`: stops training after a wall-clock budget (the CPU demo uses it).
* `TokenWindowDataset`: fixed-length token windows with `labels = input_ids`.
* `perplexity`: held-out perplexity of a (PEFT) model on token windows.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm

TEACHER_KEYS = ("teacher_logprobs", "teacher_ids")


class TeacherTopK(NamedTuple):
    """The base model's top-k next-token log-probabilities per position: logprobs [N, T, k] (float32)
    and token ids [N, T, k] (int64), for token windows [N, T]."""

    logprobs: torch.Tensor
    ids: torch.Tensor


class TokenWindowDataset(torch.utils.data.Dataset):
    """Token windows [N, T] as `{"input_ids", "labels"}` examples (labels = inputs, causal LM).

    With `teacher` (from `cache_teacher_topk` on the same windows) each example also carries
    `teacher_logprobs` / `teacher_ids` [T, k], which `LisaTrainer` uses instead of a teacher forward."""

    def __init__(self, windows: torch.Tensor, teacher: TeacherTopK | None = None) -> None:
        if windows.dim() != 2:
            raise ValueError(f"TokenWindowDataset takes [N, T] token ids, got shape {tuple(windows.shape)}.")
        if teacher is not None and teacher.logprobs.shape[:2] != windows.shape:
            raise ValueError(
                f"teacher outputs cover {tuple(teacher.logprobs.shape[:2])} positions, the windows are "
                f"{tuple(windows.shape)}: compute them with cache_teacher_topk on these windows."
            )
        self.windows = windows
        self.teacher = teacher

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.windows[i], "labels": self.windows[i]}
        if self.teacher is not None:
            item["teacher_logprobs"] = self.teacher.logprobs[i]
            item["teacher_ids"] = self.teacher.ids[i]
        return item


@torch.no_grad()
def teacher_topk(model, windows: torch.Tensor, k: int = 64, batch_size: int = 4, progress: bool = False) -> TeacherTopK:
    """`model`'s own top-k log-probabilities (as it runs now) at every position of windows [N, T]
    (k capped at the vocabulary size)."""
    device = next(model.parameters()).device
    values, ids = [], []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="teacher top-k", disable=not progress):
        logits = model(windows[start : start + batch_size].to(device), use_cache=False).logits
        top = logits.float().log_softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)  # k <= vocabulary
        values.append(top.values.cpu())
        ids.append(top.indices.cpu())
    return TeacherTopK(torch.cat(values), torch.cat(ids))


@torch.no_grad()
def cache_teacher_topk(
    peft_model, windows: torch.Tensor, k: int = 64, batch_size: int = 4, progress: bool = False
) -> TeacherTopK:
    """The base model's (adapter disabled) top-k log-probabilities at every position of windows [N, T].

    k=64 keeps most of the probability mass of a 49k-token vocabulary; the rest is one bucket in
    `topk_distillation_kl`. Memory: N*T*k*12 bytes (e.g. 1024 x 256 x 64 -> 200 MB)."""
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            return teacher_topk(peft_model, windows, k, batch_size, progress)
    finally:
        peft_model.train(was_training)


def topk_distillation_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor):
    """Mean over tokens of KL(teacher || student) on the teacher's top-k tokens plus one bucket for the rest.

    student_logits [B, T, V]; teacher_logprobs / teacher_ids [B, T, k]. Equals the full KL when the
    teacher's top-k hold all its mass, and is exact on the (k+1)-bucket coarsening otherwise."""
    log_q = student_logits.float().log_softmax(-1).gather(-1, teacher_ids)
    log_p = teacher_logprobs.float()
    p_top = log_p.exp()
    p_rest = (1.0 - p_top.sum(-1)).clamp(min=1e-8)
    q_rest = (1.0 - log_q.exp().sum(-1)).clamp(min=1e-8)
    kl = (p_top * (log_p - log_q)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean()


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """Mean over tokens of KL(teacher || student) on [B, T, V] logits, scaled by T^2 (a scalar tensor)."""
    t = temperature
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t


class LisaTrainer(transformers.Trainer):
    """`transformers.Trainer` whose loss is self-distillation from the adapter-disabled model by default.

    loss = (1 - distill_weight) * CE + distill_weight * KL(base || LiSA). `distill_weight=1` (the
    default) makes LiSA imitate its base model (conversion); with `distill_weight=0` this is exactly
    the standard Trainer loss (fine-tuning on the training text). Examples that carry
    `teacher_logprobs` / `teacher_ids` (see `TokenWindowDataset`) use those instead of a teacher
    forward (top-k KL; `distill_temperature` must then be 1).
    """

    def __init__(self, *args, distill_weight: float = 1.0, distill_temperature: float = 1.0, **kwargs) -> None:
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight}.")
        super().__init__(*args, **kwargs)
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the cached-teacher fields: the Trainer drops every example key that the model's forward does
        not take (`remove_unused_columns`), which would silently turn the cache off."""
        super()._set_signature_columns_if_needed()
        missing = [key for key in TEACHER_KEYS if key not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *missing]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        cached_logprobs, cached_ids = inputs.pop("teacher_logprobs", None), inputs.pop("teacher_ids", None)
        if self.distill_weight == 0.0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.distill_weight == 1.0:
            inputs.pop("labels", None)  # no cross-entropy to compute
        if cached_logprobs is not None:
            if self.distill_temperature != 1.0:
                raise ValueError(
                    "Cached teacher top-k log-probabilities are at temperature 1; set distill_temperature=1."
                )
            outputs = model(**inputs)
            kl = topk_distillation_kl(outputs.logits, cached_logprobs, cached_ids)
        else:
            peft_model = getattr(model, "module", model)
            teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            with torch.no_grad(), peft_model.disable_adapter():
                teacher_logits = model(**teacher_inputs).logits
            outputs = model(**inputs)
            kl = distillation_kl(outputs.logits, teacher_logits, self.distill_temperature)
        loss = kl
        if self.distill_weight < 1.0:
            loss = (1.0 - self.distill_weight) * outputs.loss + self.distill_weight * kl
        return (loss, outputs) if return_outputs else loss


class TimeBudgetCallback(transformers.TrainerCallback):
    """Stop training (and save) once `seconds` of wall-clock training time have passed.

    anneal=True also decays the learning rate along a cosine over the *time* budget: after every step
    the rate set by the Trainer's scheduler is multiplied by 0.5 * (1 + cos(pi * elapsed / seconds)).
    With `lr_scheduler_type="constant_with_warmup"` this is a cosine schedule that ends when the budget
    does, on a fast or a slow machine alike (a step-count schedule would stop mid-way, at a high rate).
    The scheduler's last rate follows, so the Trainer's logs show the annealed rate.
    """

    def __init__(self, seconds: float, anneal: bool = False) -> None:
        if seconds <= 0:
            raise ValueError(f"The time budget must be positive, got {seconds} s.")
        self.seconds = seconds
        self.anneal = anneal
        self._start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.monotonic()

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        elapsed = time.monotonic() - self._start
        if self.anneal and optimizer is not None:
            factor = 0.5 * (1.0 + math.cos(math.pi * min(1.0, elapsed / self.seconds)))
            for group in optimizer.param_groups:
                group["lr"] *= factor
            if hasattr(lr_scheduler, "_last_lr"):
                # The Trainer logs the scheduler's last rate: make it the one the next step uses.
                lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if elapsed >= self.seconds:
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
