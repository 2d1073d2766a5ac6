"""Triton helpers: the online softmax with P·V shared by the anchor, prefill and decode kernels.

A program owns ROWS query rows and streams the keys in tiles. Per row it keeps the running max
``m``, the running normaliser ``l`` (sum of ``exp(s - m)``) and the unnormalised output ``acc``
(sum of ``exp(s - m) * v``); each key tile rescales them by ``exp(m_old - m_new)`` and adds its
own terms.  ``out = acc / l`` at the end.  Triton inlines ``@triton.jit`` helpers into the calling
kernel, so sharing them costs nothing at run time.
"""

from __future__ import annotations

from lisa_kernels._reference import MASK_VALUE
from lisa_kernels._triton import tl, triton

_NEG = tl.constexpr(MASK_VALUE)


@triton.jit
def online_softmax_init(ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Empty running state: ``m [ROWS]`` = MASK_VALUE, ``l [ROWS]`` = 0, ``acc [ROWS, BLOCK_D]`` = 0 (fp32)."""
    m_i = tl.full([ROWS], _NEG, tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    return m_i, l_i, acc


@triton.jit
def online_softmax_step(m_i, l_i, acc, s, valid, in_tile, vt, PV_F32: tl.constexpr):
    """Fold one key tile into the running state; returns the new ``(m, l, acc)``.

    ``s [ROWS, BLOCK_N]`` fp32 logits; ``valid`` (broadcast to s): key visible to the row's query,
    masked keys get MASK_VALUE (finite, so a row without any visible key stays NaN-free);
    ``in_tile`` (broadcast to s): the key exists (padding lanes of the tile get -inf and never
    count); ``vt [BLOCK_N, BLOCK_D]`` the V tile. P is rounded to V's dtype before ``P @ V`` (as
    flash attention does); ``PV_F32``: that dot on fp32 operands in ieee precision.
    """
    s = tl.where(valid, s, _NEG)
    s = tl.where(in_tile, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p_lp = p.to(vt.dtype)
    if PV_F32:
        pv = tl.dot(p_lp.to(tl.float32), vt.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p_lp, vt)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def online_softmax_output(acc, l_i):
    """``acc / l`` per row ``[ROWS, BLOCK_D]`` fp32; a row with ``l == 0`` gives 0, never NaN."""
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    return acc / l_safe[:, None]
