"""PyTorch reference of an anchor (full attention) layer that also returns its pre-mask logits."""

from __future__ import annotations

import torch

from lisa_kernels._checks import check_anchor_inputs, check_scale
from lisa_kernels._reference import full_attention, valid_keys


def anchor_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    lengths: torch.Tensor | None = None, causal_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full attention in plain PyTorch.

    Shapes: q [B, H, T, D], k and v [B, G, N, D] (H divisible by G), lengths [B] or None.
    Query t of batch b sees key j iff ``j < lengths[b]`` (if given) and ``j <= causal_offset + t``,
    ``causal_offset`` defaulting to N - T (decode T = 1: all keys; prefill: causal at the last T).
    Returns out [B, H, T, D] and the pre-mask logits ``scale * q k^T`` [B, H, T, N], both in ``v.dtype``.
    """
    dims = check_anchor_inputs(q, k, v, lengths, causal_offset)
    scale = check_scale(scale)
    valid = valid_keys(dims.B, dims.T, dims.N, q.device, lengths=lengths, causal_offset=causal_offset)
    return full_attention(q, k, v, scale, valid)
