"""Plain PyTorch building blocks of the LiSA / anchor references (fp32 math, no tiling).

Layouts: logits ``[B, H, T, N]`` (decode uses T = 1), rotary-embedded low-rank queries
``q_r [B, H, T, r]``, compressed keys ``k_r [B, G, N, r]``, values ``v [B, G, N, D]``, head FFN
``weights`` (:class:`~lisa_kernels.LisaWeights`).
"""

from __future__ import annotations

import torch

from lisa_kernels._weights import LisaWeights

# Additive mask for invalid keys: large, negative and finite so that no NaN can appear.
MASK_VALUE = -1.0e30
# Floor inside log(relu(A) + PROBS_EPS) for share="probs".
PROBS_EPS = 1.0e-6


def valid_keys(
    B: int,
    T: int,
    N: int,
    device: torch.device,
    lengths: torch.Tensor | None = None,
    causal_offset: int | None = None,
) -> torch.Tensor:
    """Bool ``[B, 1, T, N]``: key j is visible to query t of batch b.

    ``j < lengths[b]`` (when lengths is given) and ``j <= causal_offset + t`` with
    ``causal_offset = N - T`` by default (the T queries are the last T positions).
    """
    j = torch.arange(N, device=device)
    t = torch.arange(T, device=device)
    offset = N - T if causal_offset is None else causal_offset
    valid = (j[None, :] <= offset + t[:, None]).expand(B, T, N)
    if lengths is not None:
        valid = valid & (j[None, None, :] < lengths.to(device=device, dtype=torch.long)[:, None, None])
    return valid[:, None]


def valid_bias(valid: torch.Tensor) -> torch.Tensor:
    """0 where valid, MASK_VALUE elsewhere (fp32)."""
    zero = torch.zeros((), dtype=torch.float32, device=valid.device)
    return torch.where(valid, zero, torch.full_like(zero, MASK_VALUE))


def softmax_over_valid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``softmax(x + mask)`` over the last (key) axis, in fp32."""
    return torch.softmax(x.float() + valid_bias(valid), dim=-1)


def head_ffn_reference(x: torch.Tensor, weights: LisaWeights) -> torch.Tensor:
    """Head-alignment FFN along the head axis of ``x [B, H, T, N]`` for every (query, key) pair.

    ``A[:, h] = sum_f w2[h, f] * relu(sum_h' w1[f, h'] * x[:, h'] + b1[f]) + b2[h]``;
    returns fp32 ``[B, H, T, N]``.
    """
    w1, b1, w2, b2 = weights
    hidden = torch.einsum("fh,bhtn->bftn", w1.float(), x.float()) + b1.float()[None, :, None, None]
    hidden = torch.relu(hidden)
    return torch.einsum("hf,bftn->bhtn", w2.float(), hidden) + b2.float()[None, :, None, None]


def lisa_attention_reference(
    prev_logits: torch.Tensor,
    q_r: torch.Tensor,
    k_r: torch.Tensor,
    v: torch.Tensor,
    weights: LisaWeights,
    scale: float,
    share: str,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LiSA attention on 4-d tensors; ``valid`` is a bool mask broadcastable to ``[B, H, T, N]``.

    Returns ``out [B, H, T, D]`` and the pre-mask logits ``S [B, H, T, N]``, both in ``v.dtype``.
    """
    H, G = prev_logits.shape[1], k_r.shape[1]
    g = H // G
    x = prev_logits.float()
    if share == "probs":
        x = softmax_over_valid(x, valid)
    a = head_ffn_reference(x, weights)
    k_full = k_r.float().repeat_interleave(g, dim=1)  # [B, H, N, r]: query head h uses kv head h // g
    delta = scale * torch.einsum("bhti,bhni->bhtn", q_r.float(), k_full)
    if share == "probs":
        s = torch.log(torch.relu(a) + PROBS_EPS) + delta
    else:
        s = a + delta
    p = softmax_over_valid(s, valid)
    out = torch.einsum("bhtn,bhnd->bhtd", p, v.float().repeat_interleave(g, dim=1))
    return out.to(v.dtype), s.to(v.dtype)


def full_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with GQA; returns ``out [B, H, T, D]`` and pre-mask ``S = scale * q k^T``."""
    g = q.shape[1] // k.shape[1]
    s = scale * torch.einsum("bhtd,bhnd->bhtn", q.float(), k.float().repeat_interleave(g, dim=1))
    p = softmax_over_valid(s, valid)
    out = torch.einsum("bhtn,bhnd->bhtd", p, v.float().repeat_interleave(g, dim=1))
    return out.to(v.dtype), s.to(v.dtype)
