"""Zero-shot multiple-choice accuracy, lm-evaluation-harness conventions (the fidelity measure the paper reports).

Each question is the context ``"Question: {question}\\nAnswer:"``; each choice is the continuation
``" {choice}"``, scored by the sum of its tokens' log-likelihoods given the context (context and
continuation tokenized together, continuation tokens = the tokens after the context's, no special
tokens). ``acc``: the highest sum is the answer; ``acc_norm``: the highest sum divided by the
continuation's length in characters (lm-eval's ``acc_norm``). This is what lm-eval's ``arc_easy``
task computes; `load_multiple_choice_jsonl` reads ARC-style JSON lines
(``question``, ``choices.text``, ``choices.label``, ``answerKey``).

`compare_zero_shot` scores the base model (the `PeftModel` under `disable_adapter()`) and the LiSA
model on the same questions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .metrics.core import pad_batch

__all__ = ["MultipleChoice", "ZeroShotResult", "compare_zero_shot", "load_multiple_choice_jsonl", "zero_shot_accuracy"]


@dataclass(frozen=True)
class MultipleChoice:
    """One question: its text, the choice texts and the index of the right choice."""

    question: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class ZeroShotResult:
    """acc / acc_norm (fractions in [0, 1]) over `questions` questions."""

    questions: int
    acc: float
    acc_norm: float


def load_multiple_choice_jsonl(path: str | Path, limit: int | None = None) -> list[MultipleChoice]:
    """ARC-style JSON lines -> questions (the first `limit` ones, file order). Clear errors on bad lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Multiple-choice file not found: {path}")
    items: list[MultipleChoice] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                labels, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
                answer = labels.index(row["answerKey"])
                items.append(MultipleChoice(row["question"], tuple(texts), answer))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(
                    f"{path}:{number}: not an ARC-style question (needs question, choices.text, choices.label and an "
                    f"answerKey among the labels): {err}"
                ) from err
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise ValueError(f"{path} holds no questions.")
    return items


def _encode(tokenizer, question: MultipleChoice) -> list[tuple[list[int], int]]:
    """Per choice: (context + continuation ids, number of continuation tokens)."""
    context = f"Question: {question.question}\nAnswer:"
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    out = []
    for choice in question.choices:
        whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
        shared = len(context_ids)
        while shared > 0 and whole[:shared] != context_ids[:shared]:  # a merge across the boundary
            shared -= 1
        out.append((whole, max(1, len(whole) - shared)))
    return out


@torch.no_grad()
def _choice_loglikelihoods(model, sequences: list[tuple[list[int], int]], batch_size: int) -> list[float]:
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        ids, mask = pad_batch([seq for seq, _ in chunk])
        log_probs = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        log_probs = log_probs.log_softmax(-1).cpu()
        for row, (seq, n) in enumerate(chunk):
            positions = torch.arange(len(seq) - n - 1, len(seq) - 1)
            scores.append(log_probs[row, positions, torch.tensor(seq[len(seq) - n :])].sum().item())
    return scores


def zero_shot_accuracy(
    model,
    tokenizer,
    questions: list[MultipleChoice],
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "zero-shot",
) -> ZeroShotResult:
    """acc and acc_norm of `model` on `questions` (lm-eval's loglikelihood scoring, see the module doc)."""
    was_training = model.training
    model.eval()
    encoded = [_encode(tokenizer, q) for q in questions]
    flat = [seq for per_question in encoded for seq in per_question]
    order = sorted(range(len(flat)), key=lambda i: len(flat[i][0]))  # similar lengths batch together
    scores = [0.0] * len(flat)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            picked = order[start : start + batch_size]
            for i, score in zip(picked, _choice_loglikelihoods(model, [flat[i] for i in picked], batch_size)):
                scores[i] = score
    finally:
        model.train(was_training)
    correct = correct_norm = 0
    offset = 0
    for question in questions:
        mine = scores[offset : offset + len(question.choices)]
        offset += len(question.choices)
        lengths = [max(1, len(c)) for c in question.choices]  # lm-eval: characters of the choice text
        best = max(range(len(mine)), key=mine.__getitem__)
        best_norm = max(range(len(mine)), key=lambda i: mine[i] / lengths[i])
        correct += best == question.answer
        correct_norm += best_norm == question.answer
    n = len(questions)
    return ZeroShotResult(n, correct / n, correct_norm / n)


def compare_zero_shot(
    peft_model, tokenizer, questions: list[MultipleChoice], batch_size: int = 16, progress: bool = False
) -> dict[str, ZeroShotResult]:
    """{"base": ..., "lisa": ...}: the same questions through the base model (adapter disabled) and LiSA."""
    with peft_model.disable_adapter():
        base = zero_shot_accuracy(peft_model, tokenizer, questions, batch_size, progress, "zero-shot (base)")
    lisa = zero_shot_accuracy(peft_model, tokenizer, questions, batch_size, progress, "zero-shot (LiSA)")
    return {"base": base, "lisa": lisa}
