"""The lean decode step: one new token of an anchor or LiSA layer on the PyTorch path.

A decode step (T = 1) without a mask does little arithmetic per layer at short and medium contexts,
so the number of PyTorch calls counts: `attention.lisa_forward`'s general path (query-row tiles,
additive mask, repeated rotary tables for the query heads, a logits tile copied into the logits
buffer) spends more PyTorch calls per layer than one token needs. These functions compute the
same numbers with fewer calls: the rotary tables broadcast over the query heads of a KV group
instead of `repeat_interleave`, the FFN writes straight into the logits buffer that the next layer
reads, and there is no mask or tile bookkeeping. The logits are bit-identical to the general path
(tests compare them).

`applies` decides; everything else (masks, probabilities read by hooks, autograd, Triton kernels,
pre-allocated static caches, `torch.compile`) takes the general path.
"""

from __future__ import annotations

from typing import Any

import torch

from . import functional as LF
from . import transformers_compat as compat
from .state import LisaForwardState


def applies(kernel: str, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any,
            layer_idx: int, need_probs: bool) -> bool:
    """True when the call is a maskless single-token decode step on the PyTorch path under no-grad,
    with a growing cache layer and nothing reading the probabilities (hidden_states [B, 1, d])."""
    return (
        hidden_states.shape[1] == 1
        and attention_mask is None
        and cache is not None
        and not need_probs
        and not torch.is_grad_enabled()
        and (kernel == "torch" or (kernel == "auto" and not hidden_states.is_cuda))
        and not torch.compiler.is_compiling()
        and not compat.is_static_layer(cache, layer_idx)
    )


def _attend(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(logits) V: logits [B, H, 1, N], values [B, G, N, D] -> [B, 1, H * D] (softmax in fp32)."""
    out = LF.grouped_values(LF.softmax_fp32(logits, values.dtype), values)  # [B, H, 1, D]
    return out.reshape(out.shape[0], 1, -1)


def anchor_step(w: Any, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                cache: Any, state: LisaForwardState) -> torch.Tensor:
    """An anchor layer (`attention.AnchorWeights`) on one token: publishes its logits [B, H, 1, N];
    hidden_states [B, 1, d] -> [B, 1, d]."""
    b, h, g = hidden_states.shape[0], w.num_heads, w.num_kv_heads
    q = w.q_proj(hidden_states.to(w.q_proj.weight.dtype)).view(b, h, 1, -1)
    k = w.k_proj(hidden_states.to(w.k_proj.weight.dtype)).view(b, g, 1, -1)
    v = w.v_proj(hidden_states.to(w.v_proj.weight.dtype)).view(b, g, 1, -1)
    cos, sin = position_embeddings
    q, k = compat.apply_rotary_pos_emb(q, k, cos, sin)
    keys, values = compat.update_cache(cache, k, v, w.layer_idx)
    n = keys.shape[2]
    logits = LF.grouped_scores(q, keys, w.scaling, out=state.empty_logits((b, h, 1, n), q.dtype, q.device))
    out = _attend(logits, values)
    state.publish(w.layer_idx, logits, out)
    return w.o_proj(out.to(w.o_proj.weight.dtype))


def lisa_step(w: Any, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
              cache: Any, state: LisaForwardState) -> torch.Tensor:
    """A LiSA layer (`attention.LisaWeights`) on one token: reads the previous layer's logits, publishes its
    own [B, H, 1, N]; caches k_r at V's dtype as the general path does; hidden_states [B, 1, d] -> [B, 1, d]."""
    b, h, g = hidden_states.shape[0], w.num_heads, w.num_kv_heads
    q = w.q_proj(hidden_states.to(w.q_proj.weight.dtype)).view(b, g, h // g, -1)  # [B, G, H/G, r]
    k = w.k_proj(hidden_states.to(w.k_proj.weight.dtype)).view(b, g, -1)  # [B, G, r]
    v = w.v_proj(hidden_states.to(w.v_proj.weight.dtype)).view(b, g, 1, -1)
    cos, sin = position_embeddings  # [B, 1, D]
    cos_r = cos[:, 0][:, w.rotary_index].to(q.dtype)  # [B, G, r]
    sin_r = sin[:, 0][:, w.rotary_index].to(q.dtype)
    q = LF.apply_rotary(q, cos_r[:, :, None], sin_r[:, :, None]).view(b, h, 1, -1)  # broadcast over H/G
    k = LF.apply_rotary(k, cos_r, sin_r).to(v.dtype).view(b, g, 1, -1)
    keys, values = compat.update_cache(cache, k, v, w.layer_idx)
    n = keys.shape[2]
    prev = state.consume(w.layer_idx - 1).to(q.dtype)  # [B, H, 1, N]
    if w.share == "probs":
        prev = LF.softmax_fp32(prev, q.dtype)
    up, down = w.ffn_up, w.ffn_down
    aligned = LF.head_ffn(prev, up.weight, up.bias, down.weight, down.bias,
                          out=state.empty_logits((b, h, 1, n), q.dtype, q.device))
    logits = LF.combine_scores(aligned, q, keys.to(q.dtype), w.scaling, w.share)
    out = _attend(logits, values)
    state.publish(w.layer_idx, logits, out)
    return w.o_proj(out.to(w.o_proj.weight.dtype))


__all__ = ["anchor_step", "applies", "lisa_step"]
