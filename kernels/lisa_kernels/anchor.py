"""Triton kernel: anchor (full) attention that also writes its pre-mask logits ``S = scale * q k^T``.

The full-attention layers that feed a LiSA layer must hand it their logits, so besides the
attention output this kernel writes ``S`` for every visible key. Key tiles that no query of a
query tile sees are written as zeros instead of computed (design, ours: every layer applies the
same mask, so those entries are never read unmasked).

Program grid: one program per (batch b, kv head, tile of BLOCK_T queries); its rows are the g query
heads sharing that kv head times the BLOCK_T queries (row ``gi * BLOCK_T + t``), so each K / V
tile is loaded once per GQA group and used in one ``tl.dot``.  Keys are streamed in BLOCK_N tiles
with an online softmax.  Tiles before the last key visible to the query tile do softmax and P·V;
later tiles only write zeros.  Masking: query t of batch b sees key j iff
``j < lengths[b]`` (when lengths is given) and ``j <= causal_offset + t`` (``causal_offset``
defaults to N - T: decode T = 1 sees all keys, prefill is causal at the last T positions).
Decode (T = 1) is not split over keys: B * G programs.
"""

from __future__ import annotations

import torch

from lisa_kernels._checks import check_anchor_inputs, check_scale
from lisa_kernels._online_softmax import online_softmax_init, online_softmax_step
from lisa_kernels._row_tile import finish_row_tile, row_tile
from lisa_kernels._triton import check_launch, is_interpreted, pow2, row_blocks, tl, triton


@triton.jit
def _anchor_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, logits_ptr, out_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kg, stride_kn, stride_kd,
    stride_vb, stride_vg, stride_vn, stride_vd,
    scale, H, G, GROUP, T, N, D, OFFSET,
    HAS_LEN: tl.constexpr, QK_F32: tl.constexpr, PV_F32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, kvh, t0, row_t, row_head, row_ok, row_idx = row_tile(G, GROUP, H, T, BLOCK_G, BLOCK_T)
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_lim = OFFSET + row_t  # last key visible to the row's query (causal)

    seq_len = N
    if HAS_LEN:
        seq_len = tl.minimum(tl.load(len_ptr + b).to(tl.int32), N)
    # keys visible to at least one query of the tile
    kv_end = tl.maximum(tl.minimum(tl.minimum(OFFSET + t0 + BLOCK_T, seq_len), N), 0)

    q = tl.load(q_ptr + b64 * stride_qb + row_head[:, None] * stride_qh + row_t[:, None] * stride_qt
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if QK_F32:
        q = q.to(tl.float32)
    k_base = k_ptr + b64 * stride_kb + kvh * stride_kg
    v_base = v_ptr + b64 * stride_vb + kvh * stride_vg
    row_off = row_idx * N  # row offset in logits [B, H, T, N]

    m_i, l_i, acc = online_softmax_init(BLOCK_G * BLOCK_T, BLOCK_D)
    for n0 in range(0, kv_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        if QK_F32:
            s = tl.dot(q, kt.to(tl.float32), input_precision="ieee") * scale
        else:
            s = tl.dot(q, kt) * scale
        tl.store(logits_ptr + row_off[:, None] + offs_n[None, :], s.to(logits_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])
        valid = (offs_n[None, :] <= row_lim[:, None]) & (offs_n[None, :] < seq_len)
        vt = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                     mask=(offs_n[:, None] < kv_end) & d_ok[None, :], other=0.0)
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, valid, n_ok[None, :], vt, PV_F32)

    # Key tiles after every query of the tile: zeros (never read unmasked), then out = acc / l.
    finish_row_tile(logits_ptr, out_ptr, acc, l_i, row_idx, row_ok, kv_end, N, D, BLOCK_G * BLOCK_T, BLOCK_N, BLOCK_D)


def anchor_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    lengths: torch.Tensor | None = None, causal_offset: int | None = None,
    *, block_t: int = 16, block_n: int = 64, num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full attention with GQA that also returns the pre-mask logits (Triton).

    Shapes: q [B, H, T, D], k and v [B, G, N, D] (H divisible by G), lengths [B] int or None.
    Query t of batch b sees key j iff ``j < lengths[b]`` (if given) and ``j <= causal_offset + t``
    (``causal_offset`` defaults to N - T).  Returns out [B, H, T, D] and ``scale * q k^T``
    [B, H, T, N], both in ``v.dtype`` (zero in key tiles that no query of a query tile sees; the
    reference computes those too).  A query that sees no key gets out = 0 (the reference gives
    the mean of V there; neither is meaningful).
    """
    dims = check_anchor_inputs(q, k, v, lengths, causal_offset)
    scale = check_scale(scale)
    check_launch(_anchor_kernel, q=q, k=k, v=v, lengths=lengths)
    B, H, G, T, N, D = dims.B, dims.H, dims.G, dims.T, dims.N, dims.D
    dev = v.device
    offset = N - T if causal_offset is None else int(causal_offset)
    block_g, block_t, _ = row_blocks(dims.group, T, block_t)
    block_n = pow2(block_n)
    lengths_i = lengths.to(device=dev, dtype=torch.int32).contiguous() if lengths is not None else None
    logits = torch.empty((B, H, T, N), dtype=v.dtype, device=dev)
    out = torch.empty((B, H, T, D), dtype=v.dtype, device=dev)
    # fp32 dots where an operand is fp32 (ieee precision), or bf16 under the interpreter, which
    # cannot tl.dot bf16 operands (triton-lang/triton#11584).
    bf16_interp = is_interpreted(_anchor_kernel) and torch.bfloat16 in (q.dtype, k.dtype, v.dtype)
    qk_f32 = torch.float32 in (q.dtype, k.dtype) or q.dtype != k.dtype or bf16_interp
    pv_f32 = v.dtype == torch.float32 or bf16_interp

    _anchor_kernel[(B * G, triton.cdiv(T, block_t))](
        q, k, v, lengths_i if lengths_i is not None else out, logits, out,
        *q.stride(), *k.stride(), *v.stride(),
        scale, H, G, dims.group, T, N, D, offset,
        HAS_LEN=lengths_i is not None, QK_F32=qk_f32, PV_F32=pv_f32,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_G=block_g, BLOCK_D=pow2(D),
        num_warps=num_warps,
    )
    return out, logits
