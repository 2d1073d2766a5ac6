"""Triton inference kernels of LiSA (cross-layer attention sharing) with PyTorch references.

* :func:`lisa_decode` / :func:`lisa_decode_reference` -- one new token: head FFN + low-rank scores once
  for all heads, then softmax + P·V per kv head (two kernels), returning the output and the pre-mask
  logits for the next LiSA layer.
* :func:`lisa_prefill` / :func:`lisa_prefill_reference` -- T causal queries, one fused kernel.
* :func:`anchor_attention` / :func:`anchor_attention_reference` -- full attention that also returns
  its pre-mask logits (the layers feeding a LiSA layer).

The LiSA functions take the layer's head-FFN weights as one :class:`LisaWeights` ``(w1, b1, w2, b2)``.

The Triton kernels run on NVIDIA GPUs, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before
Triton or this package is imported); the references always run.  See :func:`triton_available`.
"""

from lisa_kernels._triton import require_triton, triton_available
from lisa_kernels._weights import LisaWeights
from lisa_kernels.anchor import anchor_attention
from lisa_kernels.anchor_reference import anchor_attention_reference
from lisa_kernels.decode import lisa_decode
from lisa_kernels.decode_reference import lisa_decode_reference
from lisa_kernels.prefill import lisa_prefill
from lisa_kernels.prefill_reference import lisa_prefill_reference

__all__ = [
    "LisaWeights",
    "anchor_attention",
    "anchor_attention_reference",
    "lisa_decode",
    "lisa_decode_reference",
    "lisa_prefill",
    "lisa_prefill_reference",
    "require_triton",
    "triton_available",
]
