"""Analytic per-layer decode costs (one new token at context N): full attention vs a LiSA layer.

FLOPs count a multiply-add as 2.  Bytes are what one layer reads from memory for that token:
projection weights, the KV cache, and (LiSA only) the previous layer's logit row and the head-FFN
weights.  Softmax, RoPE, norms and the MLP block are the same for both layers and left out.

Full attention (H query heads, G kv heads, head dim D, model width d):
  projections  q: d x H*D, k: d x G*D, v: d x G*D, o: H*D x d
  attention    QK: 2*H*N*D, PV: 2*H*N*D
  KV cache     K and V: 2 * G*N*D elements
LiSA (low rank r, head FFN width F):
  projections  q_r: d x H*r, k_r: d x G*r, v: d x G*D, o: H*D x d
  attention    low-rank QK: 2*H*N*r, PV: 2*H*N*D, head FFN on the previous logit row:
               2*N*(F*H + H*F) (two layers over the head axis per key)
  cache        k_r: G*N*r and V: G*N*D elements; previous layer's logits: H*N elements

What the shipped Triton decode kernels execute (`lisa_decode_kernel_flops`) differs from the LiSA
count above by padding: the logits pass computes the head FFN once per key tile for all H heads,
but every `tl.dot` dimension is padded to a power of two >= 16 (`lisa_kernels._triton.pow2`), so
the softmax / P·V pass runs 16-row dots for a GQA group of g < 16 query heads (MHA: g = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lisa_kernels._triton import pow2  # the padding the kernels apply to every tl.dot dimension


def low_rank(head_dim: int) -> int:
    """r = head_dim / 6 rounded up to an even integer (22 for D = 128)."""
    r = math.ceil(head_dim / 6)
    return r + (r % 2)


@dataclass(frozen=True)
class ModelShape:
    """Attention shape of a decoder: d model width, H query heads, G kv heads, D head dim."""

    name: str
    d: int
    H: int
    G: int
    D: int
    layers: int

    @property
    def r(self) -> int:
        return low_rank(self.D)

    @property
    def F(self) -> int:
        """Hidden width of the head-alignment FFN, 2H."""
        return 2 * self.H


LLAMA2_7B = ModelShape("LLaMA-2-7B", d=4096, H=32, G=32, D=128, layers=32)
LLAMA3_8B = ModelShape("LLaMA-3-8B", d=4096, H=32, G=8, D=128, layers=32)
LLAMA2_13B = ModelShape("LLaMA-2-13B", d=5120, H=40, G=40, D=128, layers=40)
MODELS = (LLAMA2_7B, LLAMA3_8B, LLAMA2_13B)


@dataclass(frozen=True)
class LayerCost:
    """Per-layer decode cost of one token; FLOPs and bytes read."""

    proj_flops: int
    attn_flops: int
    weight_bytes: int
    cache_bytes: int
    logit_bytes: int = 0

    @property
    def flops(self) -> int:
        return self.proj_flops + self.attn_flops

    @property
    def bytes_read(self) -> int:
        return self.weight_bytes + self.cache_bytes + self.logit_bytes


def full_attention_cost(m: ModelShape, n: int, bytes_per_el: int = 2) -> LayerCost:
    """Full (GQA) attention layer at context ``n``; fp16 weights and cache by default."""
    proj_params = m.d * m.H * m.D + 2 * m.d * m.G * m.D + m.H * m.D * m.d
    attn = 2 * m.H * n * m.D + 2 * m.H * n * m.D
    return LayerCost(
        proj_flops=2 * proj_params,
        attn_flops=attn,
        weight_bytes=bytes_per_el * proj_params,
        cache_bytes=bytes_per_el * 2 * m.G * n * m.D,
    )


def lisa_cost(m: ModelShape, n: int, bytes_per_el: int = 2) -> LayerCost:
    """LiSA layer at context ``n``: low-rank q_r / k_r, full V, head FFN on the previous logit row."""
    proj_params = m.d * m.H * m.r + m.d * m.G * m.r + m.d * m.G * m.D + m.H * m.D * m.d
    ffn_params = m.F * m.H + m.F + m.H * m.F + m.H
    attn = 2 * m.H * n * m.r + 2 * m.H * n * m.D + 2 * n * (m.F * m.H + m.H * m.F)
    return LayerCost(
        proj_flops=2 * proj_params,
        attn_flops=attn,
        weight_bytes=bytes_per_el * (proj_params + ffn_params),
        cache_bytes=bytes_per_el * (m.G * n * m.r + m.G * n * m.D),
        logit_bytes=bytes_per_el * m.H * n,
    )


def lisa_decode_kernel_flops(m: ModelShape, n: int, block_n: int = 64) -> int:
    """Attention FLOPs that `lisa_kernels.lisa_decode` executes for one new token at context `n`.

    Per key tile of `block_n` keys: the logits pass runs, once for all heads, W1 [pow2(F), pow2(H)] x
    prev tile and W2 [pow2(H), pow2(F)] x hidden as padded `tl.dot`s and the low-rank delta as
    element-wise multiply-adds over pow2(H) rows and r planes; then each of the G kv-head programs
    of the softmax / P·V pass runs P [pow2(g), block_n] x V tile [block_n, pow2(D)].
    Keys are rounded up to whole tiles. Compare with `lisa_cost(m, n).attn_flops`.
    """
    g = m.H // m.G
    logits_pass = 2 * (2 * pow2(m.F) * pow2(m.H) + pow2(m.H) * m.r)
    pv_pass = m.G * 2 * pow2(g) * pow2(m.D)
    keys = -(-n // block_n) * block_n
    return keys * (logits_pass + pv_pass)
