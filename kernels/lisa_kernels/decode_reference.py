"""PyTorch reference of the LiSA decode step (one new query token per sequence)."""

from __future__ import annotations

import torch

from lisa_kernels._checks import check_lisa_inputs, check_scale
from lisa_kernels._reference import lisa_attention_reference, valid_keys
from lisa_kernels._weights import LisaWeights


def lisa_decode_reference(
    prev_logits: torch.Tensor, q_r: torch.Tensor, k_r: torch.Tensor, v: torch.Tensor, weights: LisaWeights,
    scale: float, share: str = "logits", lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LiSA decode in plain PyTorch.

    Shapes: prev_logits [B, H, N], q_r [B, H, r], k_r [B, G, N, r], v [B, G, N, D],
    weights (LisaWeights: w1 [F, H], b1 [F], w2 [H, F], b2 [H]), lengths [B] (key j valid iff
    j < lengths[b]; None = all N valid).
    Returns out [B, H, D] and the pre-mask logits [B, H, N], both in ``v.dtype``.
    """
    check_lisa_inputs(prev_logits, q_r, k_r, v, weights, share, lengths, prefill=False)
    scale = check_scale(scale)
    B, _, N = prev_logits.shape
    valid = valid_keys(B, 1, N, prev_logits.device, lengths=lengths)
    out, s = lisa_attention_reference(
        prev_logits[:, :, None], q_r[:, :, None], k_r, v, weights, scale, share, valid
    )
    return out[:, :, 0], s[:, :, 0]
