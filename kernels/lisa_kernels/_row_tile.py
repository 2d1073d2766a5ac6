"""Triton helpers: the query-row tile shared by the anchor and prefill kernels.

Grid: one program per (batch b, kv head, tile of BLOCK_T queries); program ids ``(b * G + kv head,
query tile)``.  Its ``BLOCK_G * BLOCK_T`` rows are the g query heads of the kv head times the
BLOCK_T queries, row ``gi * BLOCK_T + t``, so one ``tl.dot`` with a K or V tile serves the whole
GQA group (block sizes: :func:`lisa_kernels._triton.row_blocks`).  Outputs are contiguous
``out [B, H, T, D]`` and ``logits [B, H, T, N]``.
"""

from __future__ import annotations

from lisa_kernels._online_softmax import online_softmax_output
from lisa_kernels._triton import tl, triton


@triton.jit
def row_tile(G, GROUP, H, T, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's tile: ``(b, kv head, t0, row_t, row_head, row_ok, row_idx)``.

    ``t0`` first query of the tile; per row ``[BLOCK_G * BLOCK_T]``: its query ``row_t``, query head
    ``row_head``, ``row_ok`` (a real head and query, not padding) and ``row_idx`` (int64), its index
    in the ``[B, H, T]`` rows of the outputs.
    """
    pid = tl.program_id(0)
    b = pid // G
    kvh = pid % G
    t0 = tl.program_id(1) * BLOCK_T
    rows = tl.arange(0, BLOCK_G * BLOCK_T)
    row_gi = rows // BLOCK_T
    row_t = t0 + rows % BLOCK_T
    row_ok = (row_gi < GROUP) & (row_t < T)
    row_head = kvh * GROUP + row_gi
    row_idx = (b.to(tl.int64) * H + row_head) * T + row_t
    return b, kvh, t0, row_t, row_head, row_ok, row_idx


@triton.jit
def finish_row_tile(
    logits_ptr, out_ptr, acc, l_i, row_idx, row_ok, kv_end, N, D,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Write zeros as the logits of the key tiles from ``kv_end`` on, and ``out = acc / l`` (ROWS rows).

    No query of the tile sees a key from ``kv_end`` on, and every layer applies the same mask, so
    those logits are never read unmasked: they are written as zeros, not computed.
    """
    row_off = row_idx * N
    zero = tl.zeros([ROWS, BLOCK_N], dtype=logits_ptr.dtype.element_ty)
    for n0 in range(tl.cdiv(kv_end, BLOCK_N) * BLOCK_N, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tl.store(logits_ptr + row_off[:, None] + offs_n[None, :], zero, mask=row_ok[:, None] & (offs_n[None, :] < N))

    out = online_softmax_output(acc, l_i)  # rows that saw no key: out = 0, never NaN
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(out_ptr + (row_idx * D)[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < D)[None, :])
