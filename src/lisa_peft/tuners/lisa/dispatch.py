"""Which implementation computes the attention of LiSA and anchor layers: Triton kernels or PyTorch.

`LisaConfig.kernel` chooses, per adapter:

* `"torch"`: always the PyTorch path (`layer.py` + `functional.py`, the reference).
* `"auto"` (default): the Triton kernels of `lisa_kernels` when the tensors are on CUDA and Triton
  can run (`lisa_kernels.triton_available()`), else the PyTorch path.
* `"triton"`: the Triton kernels, on CPU tensors only under `TRITON_INTERPRET=1` (slow, for tests);
  raises `RuntimeError` naming the fix (`lisa_kernels.require_triton`) when they cannot run.

The kernels are for inference. Whatever the mode, the PyTorch path runs when

1. a gradient is needed: grad mode is on and one of the layer's inputs to the attention (queries,
   keys, values, previous logits, LiSA weights) requires grad -- training, or a forward outside
   `torch.no_grad()` / `torch.inference_mode()` while LiSA weights are trainable (`generate` runs
   under `no_grad`). The kernels have no backward pass; the first forward of reentrant gradient
   checkpointing runs under `no_grad` and may use them, its recompute uses the PyTorch path;
2. the attention mask is one the kernels cannot express (`kernel_plan`);
3. the forward is being traced by `torch.compile` (a compiled static-cache decode step): the mask plan
   reads tensor values, which would break the graph, so compiled code runs the PyTorch path in full.

Masks that run on the kernels (the T queries are the last T of the N keys, as in a KV cache):

* `None`: transformers' sdpa mask when there is no padding (plain causal);
* a 4D mask `[B or 1, 1, T, >=N]`, boolean (True = attend) or additive float whose entries are all
  0 (attend) or <= finfo.min / 2 (masked), such as the eager mask, that equals the plain causal mask;
* decode (T = 1): a row that allows exactly the first `L_b` keys of sequence b (L_b >= 1; right
  padding / ragged lengths), passed to the kernels as `lengths`.

Everything else runs on the PyTorch path: left padding (masked keys at the start of a sequence, what
batched `generate` uses), padding during a prefill (T > 1; the LiSA prefill kernel is causal only),
masks with finite biases or per-head masks, rows that see no key, and 2D (flash-attention) masks,
for which the PyTorch path raises its own error.

The decision compares the mask with the plain causal one once per forward: the layers of one forward
share the same mask object, and the result is remembered for that mask and that forward's
`LisaForwardState` (`_MaskMemo`), so a new forward always looks at its mask again.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch

import lisa_kernels

from .config import KERNEL_MODES


@dataclass(frozen=True)
class KernelPlan:
    """How to call the kernels: `lengths` [B] int (decode: key j valid iff j < lengths[b]) or None (causal)."""

    lengths: torch.Tensor | None = None


def kernel_plan(
    mode: str,
    attention_mask: torch.Tensor | None,
    tensors: Iterable[torch.Tensor],
    num_queries: int,
    num_keys: int,
    owner: object | None = None,
) -> KernelPlan | None:
    """The one place that decides: a `KernelPlan` to run the Triton kernels, or None for the PyTorch path.

    mode: `LisaConfig.kernel`; tensors: the inputs of the attention computation (device and grad
    checks); num_queries / num_keys: T and N of this call; owner: the forward's `LisaForwardState`,
    for which the mask decision is remembered (None: not remembered).
    """
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel must be one of {KERNEL_MODES}, got {mode!r}.")
    if mode == "torch" or torch.compiler.is_compiling():
        return None
    tensors = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None  # the kernels have no backward pass
    if mode == "auto":
        if not (all(t.is_cuda for t in tensors) and lisa_kernels.triton_available()):
            return None
    else:
        lisa_kernels.require_triton()
    return mask_plan(attention_mask, num_queries, num_keys, owner)


def mask_plan(
    attention_mask: torch.Tensor | None, num_queries: int, num_keys: int, owner: object | None = None
) -> KernelPlan | None:
    """A `KernelPlan` when the kernels can express `attention_mask` exactly, else None (see module docstring)."""
    if attention_mask is None:
        return KernelPlan()
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[-1] < num_keys:
        return None
    if owner is None:
        return _plan_for_mask(attention_mask, num_queries, num_keys)
    return _MEMO.get(attention_mask, num_queries, num_keys, owner)


class _MaskMemo:
    """The plan of the last (mask tensor, forward state) pair: all layers of a forward get the same mask."""

    def __init__(self) -> None:
        self._refs: tuple[weakref.ref, weakref.ref] | None = None
        self._sizes: tuple[int, int] | None = None
        self._plan: KernelPlan | None = None

    def get(self, mask: torch.Tensor, num_queries: int, num_keys: int, owner: object) -> KernelPlan | None:
        sizes = (num_queries, num_keys)
        if self._refs is not None and self._refs[0]() is mask and self._refs[1]() is owner and self._sizes == sizes:
            return self._plan
        plan = _plan_for_mask(mask, num_queries, num_keys)
        self._refs, self._sizes, self._plan = (weakref.ref(mask), weakref.ref(owner)), sizes, plan
        return plan


_MEMO = _MaskMemo()


def _plan_for_mask(mask: torch.Tensor, num_queries: int, num_keys: int) -> KernelPlan | None:
    allowed = _allowed(mask[:, 0, -num_queries:, :num_keys])  # [B, T, N] bool, or None
    if allowed is None:
        return None
    keys = torch.arange(num_keys, device=mask.device)
    if num_queries > 1:
        queries = torch.arange(num_keys - num_queries, num_keys, device=mask.device)
        causal = keys[None, :] <= queries[:, None]  # [T, N]
        return KernelPlan() if torch.equal(allowed, causal.expand_as(allowed)) else None
    row = allowed[:, 0]  # [B, N]
    lengths = row.sum(-1)
    if not torch.equal(row, keys[None, :] < lengths[:, None]) or not bool((lengths > 0).all()):
        return None  # not a prefix of the keys (left padding), or no visible key
    if bool((lengths == num_keys).all()):
        return KernelPlan()
    return KernelPlan(lengths=lengths.to(torch.int32))


def _allowed(mask: torch.Tensor) -> torch.Tensor | None:
    """Boolean "may attend" of a bool or additive float mask; None for a float mask with finite biases."""
    if mask.dtype == torch.bool:
        return mask
    allowed = mask == 0
    if not bool((allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
        return None
    return allowed


# ---------------------------------------------------------------------- kernel calls
def anchor_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, plan: KernelPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor attention on the kernel: q [B, H, T, D], k/v [B, G, N, D] -> out [B, H, T, D], logits [B, H, T, N]."""
    return lisa_kernels.anchor_attention(q, k, v, scale, lengths=_lengths(plan, q.shape[0]))


def lisa_kernel(
    prev_logits: torch.Tensor,
    q_r: torch.Tensor,
    k_r: torch.Tensor,
    v: torch.Tensor,
    ffn_up: torch.nn.Linear,
    ffn_down: torch.nn.Linear,
    scale: float,
    share: str,
    plan: KernelPlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LiSA attention on the kernels: `lisa_decode` for T = 1, `lisa_prefill` (causal) for T > 1.

    prev_logits [B, H, T, N], q_r [B, H, T, r], k_r [B, G, N, r], v [B, G, N, D] ->
    out [B, H, T, D] and this layer's pre-mask logits [B, H, T, N], both in v's dtype.
    """
    weights = lisa_kernels.LisaWeights.from_linears(ffn_up, ffn_down)
    if q_r.shape[2] == 1:
        out, logits = lisa_kernels.lisa_decode(
            prev_logits[:, :, 0], q_r[:, :, 0], k_r, v, weights, scale, share, _lengths(plan, q_r.shape[0])
        )
        return out[:, :, None], logits[:, :, None]
    if plan.lengths is not None:  # mask_plan gives lengths for T = 1 only
        raise ValueError("lisa_prefill has no `lengths`: a prefill runs on the kernels with a causal mask only.")
    return lisa_kernels.lisa_prefill(prev_logits, q_r, k_r, v, weights, scale, share)


def _lengths(plan: KernelPlan, batch_size: int) -> torch.Tensor | None:
    """plan.lengths broadcast to [B] (a mask with batch dimension 1 serves every sequence)."""
    if plan.lengths is None or plan.lengths.shape[0] == batch_size:
        return plan.lengths
    return plan.lengths.expand(batch_size).contiguous()
