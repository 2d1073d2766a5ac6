"""Triton kernel: masked softmax statistics (row max and sum of exponentials) of ``prev_logits``.

Used by share="probs", where the head FFN reads the previous layer's probabilities
``softmax(prev + mask)``: the LiSA kernels need each row's max ``m`` and normaliser ``l``
before their single fused pass, so this is one extra streaming read of ``prev_logits``
(``B * H * T * N`` elements, small next to the V cache at decode).
"""

from __future__ import annotations

import torch

from lisa_kernels._reference import MASK_VALUE
from lisa_kernels._triton import tl, triton

_NEG = tl.constexpr(MASK_VALUE)


@triton.jit
def _row_stats_kernel(
    x_ptr, len_ptr, m_ptr, l_ptr,
    stride_xb, stride_xh, stride_xt, stride_xn,
    H, T, N,
    HAS_LEN: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (b, h) row pair and query t: x[b, h, t, :] with key j valid iff
    # j <= N - T + t and (j < lengths[b] if HAS_LEN).
    pid_bh = tl.program_id(0)
    t = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    limit = N - T + t + 1
    if HAS_LEN:
        limit = tl.minimum(limit, tl.load(len_ptr + b).to(tl.int32))
    row = x_ptr + b.to(tl.int64) * stride_xb + h * stride_xh + t * stride_xt
    m = tl.full([BLOCK_N], _NEG, tl.float32)  # per-lane running max and sum
    s = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        in_row = offs < N
        x = tl.load(row + offs * stride_xn, mask=in_row, other=0.0).to(tl.float32)
        x = tl.where(offs < limit, x, _NEG)
        x = tl.where(in_row, x, float("-inf"))  # padding lanes never count
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    l_row = tl.sum(s * tl.exp(m - m_row), axis=0)
    tl.store(m_ptr + pid_bh * T + t, m_row)
    tl.store(l_ptr + pid_bh * T + t, l_row)


def row_softmax_stats(
    prev_logits: torch.Tensor, lengths: torch.Tensor | None, block_n: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax statistics of ``prev_logits [B, H, T, N]`` (any strides).

    Returns fp32 ``m [B, H, T]`` (row max of the masked logits) and ``l [B, H, T]``
    (sum of ``exp(masked - m)``), so that ``softmax(prev + mask) = exp(masked - m) / l``.
    """
    B, H, T, N = prev_logits.shape
    m = torch.empty((B, H, T), dtype=torch.float32, device=prev_logits.device)
    denom = torch.empty_like(m)
    block_n = min(block_n, max(16, triton.next_power_of_2(N)))
    len_arg = lengths if lengths is not None else m  # dummy pointer when HAS_LEN is False
    _row_stats_kernel[(B * H, T)](
        prev_logits, len_arg, m, denom,
        *prev_logits.stride(),
        H, T, N,
        HAS_LEN=lengths is not None, BLOCK_N=block_n,
    )
    return m, denom
