"""PyTorch reference of the LiSA prefill (T queries at the last T of N key positions, causal)."""

from __future__ import annotations

import torch

from lisa_kernels._checks import check_lisa_inputs, check_scale
from lisa_kernels._reference import lisa_attention_reference, valid_keys
from lisa_kernels._weights import LisaWeights


def lisa_prefill_reference(
    prev_logits: torch.Tensor, q_r: torch.Tensor, k_r: torch.Tensor, v: torch.Tensor, weights: LisaWeights,
    scale: float, share: str = "logits",
) -> tuple[torch.Tensor, torch.Tensor]:
    """LiSA prefill in plain PyTorch.

    Shapes: prev_logits [B, H, T, N], q_r [B, H, T, r], k_r [B, G, N, r], v [B, G, N, D],
    weights (LisaWeights: w1 [F, H], b1 [F], w2 [H, F], b2 [H]); query t sees key j iff j <= N - T + t.
    Returns out [B, H, T, D] and the pre-mask logits [B, H, T, N], both in ``v.dtype``.
    """
    dims = check_lisa_inputs(prev_logits, q_r, k_r, v, weights, share, None, prefill=True)
    scale = check_scale(scale)
    valid = valid_keys(dims.B, dims.T, dims.N, prev_logits.device)
    return lisa_attention_reference(prev_logits, q_r, k_r, v, weights, scale, share, valid)
