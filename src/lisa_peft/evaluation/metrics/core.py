"""What the `evaluate` metrics in `lisa_peft.evaluation.metrics` compute, usable without `evaluate`.

* `text_perplexities`: per-text perplexity of a causal LM object (a `PreTrainedModel` or a `PeftModel`).
* `attention_fidelity`: per-layer Jensen-Shannon divergence between the attention of the base model
  (the same `PeftModel` under `disable_adapter()`) and of the LiSA model, on the same texts.

Texts are tokenized without special tokens; the BOS token is prepended (`add_start_token=True`, as the
Hub's ``perplexity`` metric does) so the first real token is predicted too. Batches are right-padded
with an attention mask; padded positions never count.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...tuners.lisa import transformers_compat as compat
from ...tuners.lisa.layer import ROLE_LISA, LisaAttention
from ...tuners.lisa.model import backbone

__all__ = [
    "CITATION", "attention_fidelity", "encode_texts", "layer_attentions", "lisa_layer_indices", "text_perplexities",
]


# BibTeX of the LiSA paper, cited by both evaluate modules.
CITATION = """\
@article{mu2026lisa,
  title={Cross-layer Attention Sharing for Pre-trained Large Language Models},
  author={Mu and Wu and Fan and others},
  journal={Transactions of the Association for Computational Linguistics},
  volume={14},
  pages={656--688},
  year={2026},
  note={arXiv:2408.01890}
}
"""


def encode_texts(
    tokenizer, texts: Sequence[str], max_length: int | None = None, add_start_token: bool = True
) -> list[list[int]]:
    """Token ids of each text (BOS first if `add_start_token`), cut to `max_length` tokens."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a single string.")
    bos = tokenizer.bos_token_id
    if add_start_token and bos is None:
        raise ValueError("add_start_token=True needs a tokenizer with a BOS token; pass add_start_token=False.")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    out = []
    for ids in encoded:
        ids = ([bos] if add_start_token else []) + list(ids)
        out.append(ids[:max_length] if max_length else ids)
    return out


def pad_batch(seqs: Sequence[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids [B, T], attention_mask [B, T]) from B lists of ids."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def text_perplexities(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 8,
    max_length: int | None = None,
    add_start_token: bool = True,
) -> list[float]:
    """exp(mean next-token cross-entropy) of each text under `model` (one float per text).

    Each text of T tokens (after BOS and truncation to `max_length`) contributes T - 1 predictions;
    texts with fewer than 2 tokens raise ValueError. Runs `batch_size` texts per forward.
    """
    seqs = encode_texts(tokenizer, texts, max_length, add_start_token)
    short = [i for i, s in enumerate(seqs) if len(s) < 2]
    if short:
        raise ValueError(f"Texts {short} have fewer than 2 tokens: nothing to predict.")
    device, pad_id = _device(model), _pad_id(tokenizer)
    out: list[float] = []
    with _eval_mode(model):
        for start in range(0, len(seqs), batch_size):
            ids, mask = pad_batch(seqs[start : start + batch_size], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, T, V]
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
            valid = mask[:, 1:].to(nll.dtype)
            mean_nll = (nll * valid).sum(1) / valid.sum(1)
            out.extend(math.exp(x) for x in mean_nll.tolist())
    return out


def lisa_layer_indices(model: nn.Module) -> list[int]:
    """Indices of the decoder layers whose attention the active LiSA adapter replaces."""
    adapter = getattr(model, "active_adapter", None)
    return sorted(
        m.layer_idx
        for m in model.modules()
        if isinstance(m, LisaAttention) and m.lisa_roles.get(adapter) == ROLE_LISA
    )


@contextlib.contextmanager
def _explicit_attention(model: nn.Module) -> Iterator[None]:
    """Inside the context every attention layer returns its probabilities: the base attention runs
    eagerly (sdpa / flash return None) and LiSA / anchor layers run the PyTorch path (the Triton
    kernels return None). Both settings are restored on exit."""
    previous = compat.attn_implementation(model)
    lisa_modules = [m for m in model.modules() if isinstance(m, LisaAttention)]
    saved_kernels = [dict(m.lisa_kernel) for m in lisa_modules]
    switch = previous != "eager"
    if switch:
        model.set_attn_implementation("eager")
    for module in lisa_modules:
        module.lisa_kernel.update(dict.fromkeys(module.lisa_kernel, "torch"))
    try:
        yield
    finally:
        for module, saved in zip(lisa_modules, saved_kernels):
            module.lisa_kernel.clear()
            module.lisa_kernel.update(saved)
        if switch and previous is not None:
            model.set_attn_implementation(previous)


@torch.no_grad()
def layer_attentions(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities of every decoder layer: L tensors [B, H, T, T] (rows sum to 1).

    Read with forward hooks on each layer's ``self_attn`` (a `LisaAttention` or the base attention),
    whose second output is the probabilities. transformers' own ``output_attentions`` records only
    modules of the base attention class, which a `LisaAttention` wrapper running the LiSA path is not.
    """
    layers = backbone(model).layers
    captured: dict[int, torch.Tensor | None] = {}

    def make_hook(idx: int):
        def hook(module, args, output):
            captured[idx] = output[1] if isinstance(output, tuple) and len(output) > 1 else None

        return hook

    handles = [layer.self_attn.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        with _explicit_attention(model):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in range(len(layers)) if captured.get(i) is None]
    if missing:
        raise RuntimeError(f"Layers {missing} returned no attention probabilities.")
    return [captured[i] for i in range(len(layers))]


def _row_js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between rows: p, q [..., K] -> [...] (float64)."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)
    ent = torch.xlogy(p, p).sum(-1) + torch.xlogy(q, q).sum(-1)
    return (0.5 * ent - torch.xlogy(m, m).sum(-1)).clamp_min(0.0)


@torch.no_grad()
def attention_fidelity(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 1,
    max_length: int | None = None,
    add_start_token: bool = True,
) -> dict:
    """Per-layer mean Jensen-Shannon divergence (nats, 0..ln 2) between base and LiSA attention.

    `model`: a `PeftModel` with an active LiSA adapter. For each batch the model runs twice on the same
    tokens: under `disable_adapter()` (the base attention) and with the adapter (LiSA attention); the JS
    between the two distributions over keys is averaged over heads and real (non-padding) query rows.
    End to end, not teacher-forced: a layer after a LiSA layer sees different hidden states, so it can
    differ from the base even when it is not a LiSA layer itself. Memory: the base probabilities of all
    layers of one batch are kept, L x B x H x T x T floats.

    Returns {"js_per_layer": {layer: js}, "mean_js_lisa_layers": mean over LiSA layers,
    "lisa_layers": [...], "num_rows": query rows averaged over}.
    """
    lisa_layers = lisa_layer_indices(model)
    if not lisa_layers or not hasattr(model, "disable_adapter"):
        raise ValueError("attention_fidelity needs a PeftModel with an active LiSA adapter.")
    seqs = encode_texts(tokenizer, texts, max_length, add_start_token)
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("attention_fidelity needs at least one non-empty text.")
    device, pad_id = _device(model), _pad_id(tokenizer)
    sums: torch.Tensor | None = None
    rows = 0
    with _eval_mode(model):
        for start in range(0, len(seqs), batch_size):
            ids, mask = pad_batch(seqs[start : start + batch_size], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            with model.disable_adapter():
                base = layer_attentions(model, ids, mask)
            lisa = layer_attentions(model, ids, mask)
            valid = mask.to(torch.float64)  # [B, T]
            batch_sums = torch.stack(
                [(_row_js(p, q).mean(1) * valid).sum() for p, q in zip(base, lisa)]
            ).cpu()  # [L]
            del base, lisa
            sums = batch_sums if sums is None else sums + batch_sums
            rows += int(mask.sum())
    per_layer = (sums / rows).tolist()
    return {
        "js_per_layer": dict(enumerate(per_layer)),
        "mean_js_lisa_layers": sum(per_layer[i] for i in lisa_layers) / len(lisa_layers),
        "lisa_layers": lisa_layers,
        "num_rows": rows,
    }
