"""Forward computation of anchor and LiSA attention, shared by the adapter form and the compact model.

`LisaAttention` (the PEFT tuner layer, `layer.py`) and the compact model's attention modules
(`lisa_peft.compact.lisa_llama`) both describe one layer as an `AnchorWeights` or `LisaWeights` view of
their own modules and call the functions here. The two forms therefore run the same operations in the
same order, with the same kernel dispatch (`dispatch.py`), and give the same numbers.

Shapes: hidden states [B, T, d]; queries [B, H, T, *]; keys/values [B, G, N, *] (N = cached + new
positions); logits and probabilities [B, H, T, N].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import decode_step
from . import functional as LF
from . import transformers_compat as compat
from .dispatch import anchor_kernel, kernel_plan, lisa_kernel
from .state import LisaForwardState


@dataclass(frozen=True)
class AnchorWeights:
    """A full attention layer that hands its pre-mask logits to the LiSA layer after it."""

    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    num_heads: int
    num_kv_heads: int
    scaling: float
    layer_idx: int
    kernel: str


@dataclass(frozen=True)
class LisaWeights:
    """A LiSA layer: low-rank Q/K on the kept rotary planes, head FFN, the base V and O."""

    q_proj: nn.Module  # W_q_r: d -> H * r
    k_proj: nn.Module  # W_k_r: d -> G * r
    ffn_up: nn.Linear  # W1, b1: H -> F
    ffn_down: nn.Linear  # W2, b2: F -> H
    v_proj: nn.Module
    o_proj: nn.Module
    rotary_index: torch.Tensor  # [G, r]: kept rotary dims [planes, planes + D/2] per KV head
    num_heads: int
    num_kv_heads: int
    scaling: float
    layer_idx: int
    share: str
    kernel: str


def project(proj: nn.Module, x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, d] -> [B, heads, T, e] (x cast to the projection's dtype)."""
    out = proj(x.to(proj.weight.dtype))
    return out.view(*x.shape[:2], heads, -1).transpose(1, 2)


def attention_output(o_proj: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> o_proj -> [B, T, d]."""
    b, h, t, d = out.shape
    out = out.transpose(1, 2).reshape(b, t, h * d)
    return o_proj(out.to(o_proj.weight.dtype))


def select_rotary_for(
    position_embeddings: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the kept planes, [B, G, T, r], in `dtype`."""
    cos_r, sin_r = LF.select_rotary(position_embeddings, index)
    return cos_r.to(dtype), sin_r.to(dtype)


def explicit_mask(
    attention_mask: torch.Tensor | None, cache: Any, layer_idx: int, num_queries: int, num_keys: int
) -> torch.Tensor | None:
    """The mask to use after the cache update: `attention_mask`, or for a static cache layer without one the
    causal mask over its filled slots (`None` means "queries are the last T of N keys", which a pre-allocated
    cache of N = max_cache_len slots breaks; transformers passes None when sdpa's `is_causal` would do)."""
    if attention_mask is not None or not compat.is_static_layer(cache, layer_idx):
        return attention_mask
    return compat.static_cache_mask(cache, layer_idx, num_queries, num_keys, cache.layers[layer_idx].keys.device)


def outputs_observed(*modules: nn.Module, recorded: bool = True) -> bool:
    """Whether something may read an attention module's outputs in this call: other tools' forward hooks
    always; transformers' `output_attentions` recording only while a call asks for attentions
    (`compat.hook_reads_attentions`; older releases wrap the module's forward instead) and only when
    `recorded` (the attention implementation returns probabilities, `compat.records_attention_weights`:
    under sdpa the base layers record none, and LiSA layers must not either, or entry i of `attentions`
    would not be layer i)."""
    if nn.modules.module._global_forward_hooks:
        return True
    for module in modules:
        for hook in module._forward_hooks.values():
            if not compat.is_recording_hook(hook) or (recorded and compat.hook_reads_attentions(hook)):
                return True
        if recorded and compat.forward_records_attentions(module):
            return True
    return False


def _probs_and_values(
    logits: torch.Tensor, mask: torch.Tensor, v: torch.Tensor, need_probs: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """With autograd: (probabilities [B, H, T, N] or None, P V [B, H, T, D]). When nothing observes the
    probabilities they are not kept for the backward either (`LF.softmax_values` recomputes them there)."""
    if not need_probs:
        return None, LF.softmax_values(logits, mask, v)
    probs = LF.masked_softmax(logits, mask, v.dtype)
    return probs, LF.grouped_values(probs, v)


def anchor_forward(
    w: AnchorWeights,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache: Any,
    state: LisaForwardState,
    need_probs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full attention that publishes its pre-mask logits -> (output [B, T, d], probabilities or None).

    On the Triton kernel when `dispatch.kernel_plan` says so (then the probabilities are None, as with sdpa);
    a maskless one-token decode step takes `decode_step.anchor_step` (same numbers, fewer PyTorch calls).
    need_probs=False (nothing observes the module's outputs): returns None for the probabilities
    instead of keeping a [B, H, T, N] tensor that nobody reads (in training, autograd does not keep
    them either: `LF.softmax_values` recomputes them in the backward).
    """
    if decode_step.applies(w.kernel, hidden_states, attention_mask, cache, w.layer_idx, need_probs):
        return decode_step.anchor_step(w, hidden_states, position_embeddings, cache, state), None
    q = project(w.q_proj, hidden_states, w.num_heads)
    k = project(w.k_proj, hidden_states, w.num_kv_heads)
    v = project(w.v_proj, hidden_states, w.num_kv_heads)
    cos, sin = position_embeddings
    q, k = compat.apply_rotary_pos_emb(q, k, cos, sin)
    if cache is not None:
        k, v = compat.update_cache(cache, k, v, w.layer_idx)
        attention_mask = explicit_mask(attention_mask, cache, w.layer_idx, q.shape[2], k.shape[2])
    plan = kernel_plan(w.kernel, attention_mask, (q, k, v), q.shape[2], k.shape[2], state)
    if plan is not None:
        out, logits = anchor_kernel(q, k, v, w.scaling, plan)
        probs = None
    else:
        mask = LF.additive_mask(attention_mask, q.shape[2], k.shape[2], q.dtype, q.device)
        if torch.is_grad_enabled():
            logits = LF.grouped_scores(q, k, w.scaling)
            probs, out = _probs_and_values(logits, mask, v, need_probs)
        else:  # inference: a few query rows at a time (see LF.lisa_attention_rows)
            rows = LF.query_tile_rows(q.shape[2], k.shape[2], 2 * w.num_heads, q.element_size())
            logits_out = state.empty_logits((q.shape[0], w.num_heads, q.shape[2], k.shape[2]), q.dtype, q.device)
            logits, probs, out = LF.full_attention_rows(q, k, v, mask, w.scaling, rows, need_probs, logits_out)
    out = state.publish(w.layer_idx, logits, out)
    return attention_output(w.o_proj, out), probs


def lisa_projections(
    w: LisaWeights, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary-embedded low-rank queries [B, H, T, r] and keys [B, G, T, r]."""
    q_r = project(w.q_proj, hidden_states, w.num_heads)
    k_r = project(w.k_proj, hidden_states, w.num_kv_heads)
    cos_r, sin_r = select_rotary_for(position_embeddings, w.rotary_index, q_r.dtype)
    g = w.num_heads // w.num_kv_heads
    q_r = LF.apply_rotary(q_r, cos_r.repeat_interleave(g, dim=1), sin_r.repeat_interleave(g, dim=1))
    return q_r, LF.apply_rotary(k_r, cos_r, sin_r)


def align_heads(w: LisaWeights, x: torch.Tensor) -> torch.Tensor:
    """The head-alignment FFN on [B, H, T, N] logits or probabilities."""
    return LF.head_ffn(x, w.ffn_up.weight, w.ffn_up.bias, w.ffn_down.weight, w.ffn_down.bias)


def lisa_logits(
    w: LisaWeights, q_r: torch.Tensor, k_r: torch.Tensor, prev_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """This layer's pre-mask logits [B, H, T, N] from the previous layer's [B, H, T, N]."""
    prev = prev_logits.to(q_r.dtype)
    ffn_in = prev if w.share == "logits" else LF.masked_softmax(prev, mask, q_r.dtype)
    return LF.combine_scores(align_heads(w, ffn_in), q_r, k_r, w.scaling, w.share)


def lisa_forward(
    w: LisaWeights,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache: Any,
    state: LisaForwardState,
    need_probs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LiSA attention -> (output [B, T, d], probabilities or None on the kernels or when not
    `need_probs`, as in `anchor_forward`). Caches only Kr and V. A maskless one-token decode step takes
    `decode_step.lisa_step` (same numbers, fewer PyTorch calls)."""
    if decode_step.applies(w.kernel, hidden_states, attention_mask, cache, w.layer_idx, need_probs):
        return decode_step.lisa_step(w, hidden_states, position_embeddings, cache, state), None
    q_r, k_r = lisa_projections(w, hidden_states, position_embeddings)
    v = project(w.v_proj, hidden_states, w.num_kv_heads)
    # The low-rank keys are stored at the base model's precision (V's dtype), whatever lisa_dtype is,
    # and used at that precision with or without a cache, so cached decoding equals a full forward.
    k_r = k_r.to(v.dtype)
    if cache is not None:
        k_r, v = compat.update_cache(cache, k_r, v, w.layer_idx)
        attention_mask = explicit_mask(attention_mask, cache, w.layer_idx, q_r.shape[2], k_r.shape[2])
    k_r = k_r.to(q_r.dtype)
    prev = state.consume(w.layer_idx - 1)
    up, down = w.ffn_up, w.ffn_down
    plan = kernel_plan(
        w.kernel, attention_mask, (prev, q_r, k_r, v, up.weight, up.bias, down.weight, down.bias),
        q_r.shape[2], k_r.shape[2], state,
    )
    if plan is not None:
        out, logits = lisa_kernel(prev, q_r, k_r, v, up, down, w.scaling, w.share, plan)
        return attention_output(w.o_proj, state.publish(w.layer_idx, logits, out)), None
    mask = LF.additive_mask(attention_mask, q_r.shape[2], k_r.shape[2], q_r.dtype, q_r.device)
    if torch.is_grad_enabled():
        logits = lisa_logits(w, q_r, k_r, prev, mask)
        probs, out = _probs_and_values(logits, mask, v, need_probs)
    else:  # inference: the same numbers, computed a few query rows at a time (see LF.lisa_attention_rows)
        rows = LF.query_tile_rows(q_r.shape[2], k_r.shape[2], up.weight.shape[0], q_r.element_size())
        logits_out = state.empty_logits(tuple(prev.shape), q_r.dtype, q_r.device)
        logits, probs, out = LF.lisa_attention_rows(
            prev.to(q_r.dtype), q_r, k_r, v, up.weight, up.bias, down.weight, down.bias,
            mask, w.scaling, w.share, rows, need_probs, logits_out,
        )
    return attention_output(w.o_proj, state.publish(w.layer_idx, logits, out)), probs


__all__ = [
    "AnchorWeights",
    "LisaWeights",
    "anchor_forward",
    "attention_output",
    "explicit_mask",
    "align_heads",
    "lisa_forward",
    "lisa_logits",
    "lisa_projections",
    "outputs_observed",
    "project",
    "select_rotary_for",
]
