"""Triton kernels: fused LiSA decode step (one new query token per sequence).

Two passes and why
------------------
The head-alignment FFN mixes the H heads of each key position, so whoever computes the logits of
a key tile needs the ``prev_logits`` rows of *all* H heads for that tile. The P·V product, on the
other hand, wants the query heads that share one kv head together (GQA), so that a V tile is read
once and fed to a single ``tl.dot``. The step therefore runs as two kernels:

1. ``_lisa_decode_logits_kernel``, one program per (batch b, key tile): load ``prev[b, :, tile]``
   for all H heads (``[H, BLOCK_N]``), compute the FFN once, ``A = W2 relu(W1 X + b1) + b2``
   (two ``tl.dot``), add the low-rank delta ``scale * q_r[h] . k_r[h // g]`` for every head
   (element-wise products accumulated over the r planes: r is small), and write the pre-mask logits
   ``S = A + Delta`` (or ``log(relu(A) + 1e-6) + Delta`` for share="probs") for every key, masked
   or not, since the next layer reads them all;
2. ``_decode_softmax_pv_kernel``, one program per (batch, kv head, key split), the flash-decoding
   layout: read the logits of the g query heads of the group, online softmax over the valid keys,
   ``acc += P @ V[kv, tile]``; a third tiny kernel (``_combine_splits_kernel``) merges the splits'
   ``(m, l, acc)`` partials.

Design (ours, issue #8): an earlier single fused kernel ran pass 1 inside every kv-group program, so
the FFN hidden layer was recomputed G times per key tile (up to 32x for MHA models, about 20x the
FLOPs the cost model counts for LLaMA-2-7B at 4k). Splitting the passes computes it once, at the
price of writing and reading back the fp32 logits, [B, H, N]: 4H bytes per key against the 2GD
bytes per key of an fp16 V cache it streams anyway (LLaMA-2-7B: 128 vs 8192). The logits that the
second pass reads are that fp32 scratch; the returned logits are cast to V's dtype.
``benchmarks/costs.lisa_decode_kernel_flops`` counts what these kernels execute.

V is loaded only for valid keys (``j < lengths[b]``), so padding beyond a sequence's length costs
no V bandwidth. share="probs" needs the masked softmax statistics of ``prev`` before pass 1; they
come from one extra streaming read of ``prev`` (:mod:`lisa_kernels._row_stats`).

All math is fp32; ``tl.dot`` on fp32 operands uses ``input_precision="ieee"``; P is rounded to
V's dtype for the P·V dot when V is fp16/bf16 (as flash attention does).
"""

from __future__ import annotations

import functools

import torch

from lisa_kernels._checks import check_lisa_inputs, check_scale
from lisa_kernels._online_softmax import online_softmax_init, online_softmax_step
from lisa_kernels._reference import MASK_VALUE, PROBS_EPS
from lisa_kernels._row_stats import row_softmax_stats
from lisa_kernels._triton import check_launch, is_interpreted, pow2, tl, triton
from lisa_kernels._weights import LisaWeights

_NEG = tl.constexpr(MASK_VALUE)
_EPS = tl.constexpr(PROBS_EPS)


@triton.jit
def _lisa_decode_logits_kernel(
    prev_ptr, q_ptr, k_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    stat_m_ptr, stat_l_ptr, len_ptr, scores_ptr,
    stride_pb, stride_ph, stride_pn,
    stride_qb, stride_qh, stride_qr,
    stride_kb, stride_kg, stride_kn, stride_kr,
    scale, H, GROUP, N, R, F,
    SHARE_PROBS: tl.constexpr, HAS_LEN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr,
):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    b64 = b.to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    offs_f = tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N

    w1 = tl.load(w1_ptr + offs_f[:, None] * H + offs_h[None, :], mask=f_ok[:, None] & h_ok[None, :],
                 other=0.0).to(tl.float32)
    b1 = tl.load(b1_ptr + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + offs_h[:, None] * F + offs_f[None, :], mask=h_ok[:, None] & f_ok[None, :],
                 other=0.0).to(tl.float32)
    b2 = tl.load(b2_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)

    # 1. previous layer's logits (or probabilities) of all heads for the tile: [BLOCK_H, BLOCK_N]
    x = tl.load(prev_ptr + b64 * stride_pb + offs_h[:, None] * stride_ph + offs_n[None, :] * stride_pn,
                mask=h_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    if SHARE_PROBS:
        seq_len = N
        if HAS_LEN:
            seq_len = tl.minimum(tl.load(len_ptr + b).to(tl.int32), N)
        pm = tl.load(stat_m_ptr + b * H + offs_h, mask=h_ok, other=0.0)
        pl = tl.load(stat_l_ptr + b * H + offs_h, mask=h_ok, other=1.0)
        valid = n_ok & (offs_n < seq_len)
        x = tl.exp(tl.where(valid[None, :], x, _NEG) - pm[:, None]) / pl[:, None]
        x = tl.where(h_ok[:, None] & n_ok[None, :], x, 0.0)
    # 2. head-alignment FFN, once for all heads: [BLOCK_H, BLOCK_N]
    hidden = tl.maximum(tl.dot(w1, x, input_precision="ieee") + b1[:, None], 0.0)
    a = tl.dot(w2, hidden, input_precision="ieee") + b2[:, None]
    # 3. low-rank delta: query head h against the compressed keys of kv head h // GROUP, one rotary
    #    plane at a time (r is small; a [H, r, BLOCK_N] product would not fit in registers)
    q_base = q_ptr + b64 * stride_qb + offs_h * stride_qh
    k_rows = k_ptr + b64 * stride_kb + (offs_h // GROUP)[:, None] * stride_kg + offs_n[None, :] * stride_kn
    delta = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
    for i in range(0, R):
        qi = tl.load(q_base + i * stride_qr, mask=h_ok, other=0.0).to(tl.float32)
        ki = tl.load(k_rows + i * stride_kr, mask=h_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        delta += qi[:, None] * ki
    delta = delta * scale
    # 4. combine and write the pre-mask logits (fp32 scratch)
    if SHARE_PROBS:
        s = tl.log(tl.maximum(a, 0.0) + _EPS) + delta
    else:
        s = a + delta
    tl.store(scores_ptr + (b64 * H + offs_h[:, None]) * N + offs_n[None, :], s, mask=h_ok[:, None] & n_ok[None, :])


@triton.jit
def _decode_softmax_pv_kernel(
    scores_ptr, v_ptr, len_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    stride_vb, stride_vg, stride_vn, stride_vd,
    H, G, GROUP, N, D, KEYS_PER_SPLIT, NUM_SPLITS,
    HAS_LEN: tl.constexpr, PV_F32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // G
    kvh = pid % G
    b64 = b.to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)  # query heads of this kv group
    g_ok = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    seq_len = N
    if HAS_LEN:
        seq_len = tl.minimum(tl.load(len_ptr + b).to(tl.int32), N)
    v_base = v_ptr + b64 * stride_vb + kvh * stride_vg
    rows = (b64 * H + heads) * N

    m_i, l_i, acc = online_softmax_init(BLOCK_G, BLOCK_D)
    start = split * KEYS_PER_SPLIT
    end = tl.minimum(start + KEYS_PER_SPLIT, N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end  # tile padding beyond the split: -inf in the softmax, never counted
        valid = n_ok & (offs_n < seq_len)
        s = tl.load(scores_ptr + rows[:, None] + offs_n[None, :], mask=g_ok[:, None] & n_ok[None, :], other=0.0)
        vt = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                     mask=valid[:, None] & d_ok[None, :], other=0.0)  # V of valid keys only
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, valid[None, :], n_ok[None, :], vt, PV_F32)

    row = (b * H + heads) * NUM_SPLITS + split
    tl.store(part_acc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(part_m_ptr + row, m_i, mask=g_ok)
    tl.store(part_l_ptr + row, l_i, mask=g_ok)


@triton.jit
def _combine_splits_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, NUM_SPLITS, D,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (b, h): merge the per-split online-softmax partials.
    pid = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m = tl.load(part_m_ptr + pid * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_l_ptr + pid * NUM_SPLITS + offs_s, mask=s_ok, other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))
    denom = tl.sum(w * l_s, axis=0)
    denom = tl.where(denom > 0.0, denom, 1.0)
    acc = tl.load(part_acc_ptr + (pid * NUM_SPLITS + offs_s[:, None]) * D + offs_d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / denom
    tl.store(out_ptr + pid * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_num_splits(programs: int, n_tiles: int, device: torch.device) -> int:
    """Enough key splits to give ~2 programs per SM (CPU interpreter: up to 4 splits)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = 2 * _sm_count(index)
    else:
        target = 4 * programs
    return max(1, min(n_tiles, triton.cdiv(target, programs)))


def lisa_decode(
    prev_logits: torch.Tensor, q_r: torch.Tensor, k_r: torch.Tensor, v: torch.Tensor, weights: LisaWeights,
    scale: float, share: str = "logits", lengths: torch.Tensor | None = None,
    *, block_n: int | None = None, num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LiSA decode step (Triton: logits pass, then softmax and P·V; module docstring).

    Shapes: prev_logits [B, H, N] (previous layer's pre-mask logits), q_r [B, H, r], k_r [B, G, N, r],
    v [B, G, N, D], weights (LisaWeights: w1 [F, H], b1 [F], w2 [H, F], b2 [H]), lengths [B] int or None
    (key j valid iff j < lengths[b]).  Returns out [B, H, D] and the pre-mask logits [B, H, N], both in
    ``v.dtype``.
    ``block_n`` (keys per tile) and ``num_splits`` (key splits per (batch, kv head)) are tuning knobs.
    """
    dims = check_lisa_inputs(prev_logits, q_r, k_r, v, weights, share, lengths, prefill=False)
    scale = check_scale(scale)
    check_launch(
        _lisa_decode_logits_kernel, prev_logits=prev_logits, q_r=q_r, k_r=k_r, v=v, **weights._asdict(),
        lengths=lengths,
    )
    B, H, G, N, r, D, F = dims.B, dims.H, dims.G, dims.N, dims.r, dims.D, dims.F
    dev = v.device
    block_n = pow2(block_n or 64)
    n_tiles = triton.cdiv(N, block_n)
    if num_splits is None:
        num_splits = _default_num_splits(B * G, n_tiles, dev)
    num_splits = max(1, min(int(num_splits), n_tiles))
    keys_per_split = triton.cdiv(n_tiles, num_splits) * block_n
    num_splits = triton.cdiv(N, keys_per_split)  # every split holds at least one key

    lengths_i = lengths.to(device=dev, dtype=torch.int32).contiguous() if lengths is not None else None
    share_probs = share == "probs"
    if share_probs:
        stat_m, stat_l = row_softmax_stats(prev_logits[:, :, None], lengths_i)
    else:
        stat_m = stat_l = torch.empty(1, dtype=torch.float32, device=dev)

    scores = torch.empty((B, H, N), dtype=torch.float32, device=dev)
    out = torch.empty((B, H, D), dtype=v.dtype, device=dev)
    part_acc = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=dev)
    part_m = torch.empty((B, H, num_splits), dtype=torch.float32, device=dev)
    part_l = torch.empty_like(part_m)
    # The interpreter multiplies raw bf16 bit patterns in tl.dot (triton-lang/triton#11584), so under
    # TRITON_INTERPRET=1 bf16 P.V is done on fp32 copies of the bf16-rounded operands.
    interp_bf16 = is_interpreted(_decode_softmax_pv_kernel) and v.dtype == torch.bfloat16
    pv_f32 = v.dtype == torch.float32 or interp_bf16
    len_arg = lengths_i if lengths_i is not None else stat_m

    _lisa_decode_logits_kernel[(B, n_tiles)](
        prev_logits, q_r, k_r, *weights.contiguous(), stat_m, stat_l, len_arg, scores,
        *prev_logits.stride(), *q_r.stride(), *k_r.stride(),
        scale, H, H // G, N, r, F,
        SHARE_PROBS=share_probs, HAS_LEN=lengths_i is not None,
        BLOCK_N=block_n, BLOCK_H=pow2(H), BLOCK_F=pow2(F),
    )
    _decode_softmax_pv_kernel[(B * G, num_splits)](
        scores, v, len_arg, part_acc, part_m, part_l, *v.stride(),
        H, G, H // G, N, D, keys_per_split, num_splits,
        HAS_LEN=lengths_i is not None, PV_F32=pv_f32,
        BLOCK_N=block_n, BLOCK_G=pow2(H // G), BLOCK_D=pow2(D),
    )
    _combine_splits_kernel[(B * H,)](
        part_acc, part_m, part_l, out, num_splits, D,
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=pow2(D),
    )
    return out, scores if v.dtype == torch.float32 else scores.to(v.dtype)
