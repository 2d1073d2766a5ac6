"""Triton kernel: fused LiSA prefill (T queries at the last T of N key positions, causal).

Program grid and tiling
-----------------------
One program per (batch b, kv head, tile of BLOCK_T queries).  Its rows are the g query heads of
the kv head times the BLOCK_T queries (row ``gi * BLOCK_T + t``), so one ``tl.dot`` with a V tile
serves the whole GQA group.  For each key tile the program

1. loads ``prev[b, :, t-tile, n-tile]`` for all H heads as ``[H, BLOCK_T * BLOCK_N]`` (one column
   per (query, key) pair: the head FFN mixes heads independently per pair);
2. computes the FFN hidden layer ``relu(W1 @ X + b1)`` (``[F, BLOCK_T * BLOCK_N]``) and the output
   rows of this group's heads, reshaped to ``[g * BLOCK_T, BLOCK_N]``; when g < 16 the ``W2`` rows
   are zero-padded to a 16-row ``tl.dot`` and the padding is summed away;
3. adds the low-rank delta ``(scale * q_r) @ k_r^T``, combines (share="logits"/"probs") and writes
   the logits tile;
4. runs an online softmax and ``acc += P @ V``.

Only a ``[g * BLOCK_T, BLOCK_N]`` tile of probabilities ever exists.  Key tiles that lie wholly
after the tile's last visible key (causal) are not computed: their logits are written as zeros
(design, ours: every layer applies the same causal mask, so no layer reads those entries unmasked;
the caller's tensor stays finite for any reader). This halves the FFN work of a prefill without a
cache. The FFN hidden layer of a visible tile is still recomputed by each of the G kv-group programs
(unlike the decode step, which runs it once per key tile in a separate pass: :mod:`lisa_kernels.decode`).
share="probs" first takes the masked softmax
statistics of ``prev`` in one extra pass (:mod:`lisa_kernels._row_stats`).
"""

from __future__ import annotations

import torch

from lisa_kernels._checks import check_lisa_inputs, check_scale
from lisa_kernels._online_softmax import online_softmax_init, online_softmax_step
from lisa_kernels._reference import MASK_VALUE, PROBS_EPS
from lisa_kernels._row_stats import row_softmax_stats
from lisa_kernels._row_tile import finish_row_tile, row_tile
from lisa_kernels._triton import check_launch, is_interpreted, pow2, row_blocks, tl, triton
from lisa_kernels._weights import LisaWeights

_NEG = tl.constexpr(MASK_VALUE)
_EPS = tl.constexpr(PROBS_EPS)


@triton.jit
def _lisa_s_tile(
    prev_base, k_base, stride_ph, stride_pt, stride_pn, stride_kn, stride_kr,
    w1, b1, w2x, b2x, q, pm, pl, t0, n0, T, N, H, R,
    SHARE_PROBS: tl.constexpr, QK_F32: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr, REP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Pre-mask LiSA logits of one (query tile, key tile): ``[BLOCK_G * BLOCK_T, BLOCK_N]`` fp32."""
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    offs_p = tl.arange(0, BLOCK_T * BLOCK_N)  # (query, key) pairs, pair = t * BLOCK_N + n
    p_t = t0 + offs_p // BLOCK_N
    p_n = n0 + offs_p % BLOCK_N
    p_ok = (p_t < T) & (p_n < N)
    x_ok = h_ok[:, None] & p_ok[None, :]
    x = tl.load(prev_base + offs_h[:, None] * stride_ph + p_t[None, :] * stride_pt + p_n[None, :] * stride_pn,
                mask=x_ok, other=0.0).to(tl.float32)
    if SHARE_PROBS:
        p_valid = p_n <= N - T + p_t
        x = tl.exp(tl.where(p_valid[None, :], x, _NEG) - pm) / pl
        x = tl.where(x_ok, x, 0.0)
    hidden = tl.maximum(tl.dot(w1, x, input_precision="ieee") + b1[:, None], 0.0)
    a = tl.dot(w2x, hidden, input_precision="ieee") + b2x[:, None]  # [BLOCK_G * REP, pairs]
    if REP > 1:
        a = tl.sum(tl.reshape(a, [BLOCK_G, REP, BLOCK_T * BLOCK_N]), axis=1)  # drop zero padding rows
    a = tl.reshape(a, [BLOCK_G * BLOCK_T, BLOCK_N])  # row gi * BLOCK_T + t, column n
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_r[:, None] * stride_kr,
                 mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0)
    if QK_F32:
        delta = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
    else:  # fp16 / bf16 operands (tensor cores), fp32 accumulation: the precision of the base's own QK
        delta = tl.dot(q, kt)
    if SHARE_PROBS:
        s = tl.log(tl.maximum(a, 0.0) + _EPS) + delta
    else:
        s = a + delta
    return s


@triton.jit
def _lisa_prefill_kernel(
    prev_ptr, q_ptr, k_ptr, v_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, stat_m_ptr, stat_l_ptr,
    logits_ptr, out_ptr,
    stride_pb, stride_ph, stride_pt, stride_pn,
    stride_qb, stride_qh, stride_qt, stride_qr,
    stride_kb, stride_kg, stride_kn, stride_kr,
    stride_vb, stride_vg, stride_vn, stride_vd,
    scale, H, G, GROUP, T, N, R, D, F,
    SHARE_PROBS: tl.constexpr, QK_F32: tl.constexpr, PV_F32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr,
    REP: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, kvh, t0, row_t, row_head, row_ok, row_idx = row_tile(G, GROUP, H, T, BLOCK_G, BLOCK_T)
    b64 = b.to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    offs_f = tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_lim = N - T + row_t  # last key visible to the row's query

    w1 = tl.load(w1_ptr + offs_f[:, None] * H + offs_h[None, :], mask=f_ok[:, None] & h_ok[None, :],
                 other=0.0).to(tl.float32)
    b1 = tl.load(b1_ptr + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    # W2 rows of this group's heads; row gi sits at gi * REP, the REP - 1 rows after it are zero.
    rows2 = tl.arange(0, BLOCK_G * REP)
    gi2 = rows2 // REP
    ok2 = (rows2 % REP == 0) & (gi2 < GROUP)
    head2 = kvh * GROUP + gi2
    w2x = tl.load(w2_ptr + head2[:, None] * F + offs_f[None, :], mask=ok2[:, None] & f_ok[None, :],
                  other=0.0).to(tl.float32)
    b2x = tl.load(b2_ptr + head2, mask=ok2, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + b64 * stride_qb + row_head[:, None] * stride_qh + row_t[:, None] * stride_qt
                + offs_r[None, :] * stride_qr, mask=row_ok[:, None] & (offs_r[None, :] < R),
                other=0.0).to(tl.float32) * scale
    if not QK_F32:
        q = q.to(q_ptr.dtype.element_ty)  # scaled in fp32, rounded once to the half dtype
    if SHARE_PROBS:
        # softmax statistics of prev for all heads and the tile's queries, expanded to (query, key) pairs
        offs_t = t0 + tl.arange(0, BLOCK_T)
        st_off = (b * H + offs_h[:, None]) * T + offs_t[None, :]
        st_ok = h_ok[:, None] & (offs_t[None, :] < T)
        pm = tl.load(stat_m_ptr + st_off, mask=st_ok, other=0.0)
        pl = tl.load(stat_l_ptr + st_off, mask=st_ok, other=1.0)
        pm = tl.reshape(tl.broadcast_to(pm[:, :, None], [BLOCK_H, BLOCK_T, BLOCK_N]),
                        [BLOCK_H, BLOCK_T * BLOCK_N])
        pl = tl.reshape(tl.broadcast_to(pl[:, :, None], [BLOCK_H, BLOCK_T, BLOCK_N]),
                        [BLOCK_H, BLOCK_T * BLOCK_N])
    else:
        pm = 0.0
        pl = 1.0

    prev_base = prev_ptr + b64 * stride_pb
    k_base = k_ptr + b64 * stride_kb + kvh * stride_kg
    v_base = v_ptr + b64 * stride_vb + kvh * stride_vg
    row_off = row_idx * N  # row offset in logits [B, H, T, N]

    m_i, l_i, acc = online_softmax_init(BLOCK_G * BLOCK_T, BLOCK_D)
    kv_end = tl.minimum(N - T + t0 + BLOCK_T, N)  # keys visible to at least one query of the tile
    for n0 in range(0, kv_end, BLOCK_N):
        s = _lisa_s_tile(prev_base, k_base, stride_ph, stride_pt, stride_pn, stride_kn, stride_kr,
                         w1, b1, w2x, b2x, q, pm, pl, t0, n0, T, N, H, R,
                         SHARE_PROBS, QK_F32, BLOCK_H, BLOCK_G, REP, BLOCK_T, BLOCK_N, BLOCK_R)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        tl.store(logits_ptr + row_off[:, None] + offs_n[None, :], s.to(logits_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])
        vt = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                     mask=(offs_n[:, None] < kv_end) & d_ok[None, :], other=0.0)
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, offs_n[None, :] <= row_lim[:, None], n_ok[None, :],
                                            vt, PV_F32)

    # Key tiles after every query of the tile: zeros (never read unmasked), then out = acc / l.
    finish_row_tile(logits_ptr, out_ptr, acc, l_i, row_idx, row_ok, kv_end, N, D, BLOCK_G * BLOCK_T, BLOCK_N, BLOCK_D)


def lisa_prefill(
    prev_logits: torch.Tensor, q_r: torch.Tensor, k_r: torch.Tensor, v: torch.Tensor, weights: LisaWeights,
    scale: float, share: str = "logits",
    *, block_t: int = 16, block_n: int = 16, num_warps: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LiSA prefill (Triton).

    Shapes: prev_logits [B, H, T, N] (previous layer's pre-mask logits), q_r [B, H, T, r],
    k_r [B, G, N, r], v [B, G, N, D], weights (LisaWeights: w1 [F, H], b1 [F], w2 [H, F], b2 [H]);
    query t sees key j iff j <= N - T + t.
    Returns out [B, H, T, D] and the pre-mask logits [B, H, T, N], both in ``v.dtype`` (zero in key
    tiles that no query of a query tile sees; the reference computes those too).
    ``block_t`` / ``block_n`` (queries / keys per tile) and ``num_warps`` are tuning knobs.
    """
    dims = check_lisa_inputs(prev_logits, q_r, k_r, v, weights, share, None, prefill=True)
    scale = check_scale(scale)
    check_launch(
        _lisa_prefill_kernel, prev_logits=prev_logits, q_r=q_r, k_r=k_r, v=v, **weights._asdict()
    )
    B, H, G, T, N, r, D, F = dims.B, dims.H, dims.G, dims.T, dims.N, dims.r, dims.D, dims.F
    dev = v.device
    block_g, block_t, rep = row_blocks(dims.group, T, block_t)
    block_n = pow2(block_n)

    share_probs = share == "probs"
    if share_probs:
        stat_m, stat_l = row_softmax_stats(prev_logits, None)
    else:
        stat_m = stat_l = torch.empty(1, dtype=torch.float32, device=dev)
    logits = torch.empty((B, H, T, N), dtype=v.dtype, device=dev)
    out = torch.empty((B, H, T, D), dtype=v.dtype, device=dev)
    # See lisa_kernels.decode: the interpreter cannot tl.dot bf16 operands (triton-lang/triton#11584).
    interp = is_interpreted(_lisa_prefill_kernel)
    pv_f32 = v.dtype == torch.float32 or (interp and v.dtype == torch.bfloat16)
    # The low-rank delta q_r . k_r runs on half operands when both are the same half dtype.
    qk_f32 = q_r.dtype == torch.float32 or q_r.dtype != k_r.dtype or (interp and q_r.dtype == torch.bfloat16)

    _lisa_prefill_kernel[(B * G, triton.cdiv(T, block_t))](
        prev_logits, q_r, k_r, v, *weights.contiguous(), stat_m, stat_l, logits, out,
        *prev_logits.stride(), *q_r.stride(), *k_r.stride(), *v.stride(),
        scale, H, G, dims.group, T, N, r, D, F,
        SHARE_PROBS=share_probs, QK_F32=qk_f32, PV_F32=pv_f32,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_H=pow2(H), BLOCK_G=block_g, REP=rep,
        BLOCK_F=pow2(F), BLOCK_R=pow2(r), BLOCK_D=pow2(D),
        num_warps=num_warps,
    )
    return out, logits
