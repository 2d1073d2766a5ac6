"""Tensor math shared by LiSA and anchor layers (PyTorch reference path).

Shapes follow transformers' LLaMA layout: queries [B, H, T, *], keys/values [B, G, N, *] with
H = G * g query heads per KV head (GQA); query head h reads KV head h // g.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Added to the FFN output before the log in share="probs" mode: log(relu(A) + PROBS_EPS).
PROBS_EPS = 1e-6


def additive_mask(
    attention_mask: torch.Tensor | None, num_queries: int, num_keys: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The mask to add to logits, [B or 1, 1, T, N], with `finfo(dtype).min` where masked (float32's
    minimum for float64; a 0-dim zero when nothing is: a decode step, T = 1, without a mask).

    `attention_mask` is what transformers hands to an attention module: `None` (plain causal,
    queries at the last T of N positions), a boolean [B, 1, T, >=N] (True = attend) or an
    additive float [B, 1, T, >=N].
    """
    # Softmax runs in float32 (`masked_softmax`), where float64's minimum would become -inf and a
    # fully masked row (a left-padding query) NaN: never go below float32's minimum.
    minimum = max(torch.finfo(dtype).min, torch.finfo(torch.float32).min)
    if attention_mask is None and num_queries == 1:
        return torch.zeros((), dtype=dtype, device=device)  # one query at the last position sees every key
    if attention_mask is None:
        query_pos = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
        allowed = torch.arange(num_keys, device=device)[None, :] <= query_pos
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, minimum)[None, None]
    if attention_mask.dim() != 4:
        raise ValueError(
            f"LiSA layers need a 4D attention mask [B, 1, T, N]; got shape {tuple(attention_mask.shape)}. "
            "Use attn_implementation='sdpa' or 'eager' for the base model (flash-attention masks are 2D)."
        )
    attention_mask = attention_mask[..., -num_queries:, :num_keys]
    if attention_mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~attention_mask, minimum)
    return attention_mask.to(dtype).clamp(min=minimum)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., 2k] -> [..., 2k]: (x1, x2) -> (-x2, x1), the pairing transformers' RoPE uses."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def select_rotary(
    position_embeddings: tuple[torch.Tensor, torch.Tensor], rotary_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the kept rotary planes: cos/sin [B, T, D] and index [G, r] -> cos_r/sin_r [B, G, T, r]."""
    cos, sin = position_embeddings
    cos_r = cos[..., rotary_index].permute(0, 2, 1, 3)
    sin_r = sin[..., rotary_index].permute(0, 2, 1, 3)
    return cos_r, sin_r


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [B, G, k*T or T, r] laid out as [first halves of r/2 planes | second halves]."""
    return x * cos + rotate_half(x) * sin


def grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """scale * q k^T with GQA: q [B, H, T, e], k [B, G, N, e] -> [B, H, T, N] (no K repeat); written into
    `out` (a contiguous [B, H, T, N]) when given."""
    b, h, t, e = q.shape
    g, n = k.shape[1], k.shape[2]
    # The scale goes on q ([B, H, T, e]), not on the [B, H, T, N] product: one pass over the scores fewer.
    queries, keys_t = q.reshape(b, g, (h // g) * t, e) * scale, k.transpose(-1, -2)
    if out is None:
        return torch.matmul(queries, keys_t).view(b, h, t, n)
    torch.matmul(queries, keys_t, out=out.view(b, g, (h // g) * t, n))
    return out


def grouped_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """P V with GQA: probs [B, H, T, N], v [B, G, N, D] -> [B, H, T, D] (no V repeat)."""
    b, h, t, n = probs.shape
    g = v.shape[1]
    out = torch.matmul(probs.reshape(b, g, (h // g) * t, n), v)
    return out.view(b, h, t, v.shape[-1])


def softmax_fp32(logits: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """softmax over keys (last axis) in float32, cast to `out_dtype` (as eager attention)."""
    return F.softmax(logits.float(), dim=-1).to(out_dtype)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """softmax(logits + mask) over keys in float32, cast to `out_dtype` (as eager attention)."""
    if mask.dim() == 0:  # `additive_mask`'s "nothing masked" (decode without a mask): skip adding zeros
        return softmax_fp32(logits, out_dtype)
    return F.softmax(logits.float() + mask.float(), dim=-1).to(out_dtype)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype that autocast runs matrix products in on `device_type` now; None when autocast is off there."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled on `device_type` (the recompute functions cast their inputs themselves)."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


class _SoftmaxValuesRecompute(torch.autograd.Function):
    """`grouped_values(masked_softmax(logits, mask, v.dtype), v)` with a backward that recomputes the
    probabilities from the logits instead of saving them.

    Autograd would keep the probabilities [B, H, T, N] of every anchor and LiSA layer until the
    backward, beside the logits, which the next LiSA layer's FFN keeps anyway (its input). This keeps
    only the logits, the mask and V, and recomputes softmax(logits + mask) one layer at a time in the
    backward: a training step holds one [B, H, T, N] tensor per converted layer instead of two.

    Mixed precision: under autocast the product P V runs in autocast's dtype, as autocast would run it
    (`autocast_dtype`, read in the forward, on any device type); the backward, which autocast does not
    cover, runs its products in that same dtype and returns each gradient in its input's dtype.
    """

    @staticmethod
    def forward(ctx, logits, mask, v):  # noqa: ANN001, ANN205 - autograd.Function signature
        ctx.compute_dtype = autocast_dtype(v.device.type) or v.dtype
        ctx.save_for_backward(logits, mask, v)
        with _autocast_off(v.device.type):  # P in V's dtype, then both in the product's (as autocast would)
            dtype = ctx.compute_dtype
            return grouped_values(masked_softmax(logits, mask, v.dtype).to(dtype), v.to(dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        logits, mask, v = ctx.saved_tensors
        dtype = ctx.compute_dtype
        with _autocast_off(v.device.type):
            probs = masked_softmax(logits, mask, torch.float32)  # [B, H, T, N], as the forward computed it
            b, h, t, n = probs.shape
            g = v.shape[1]
            grad_out = grad_out.to(dtype).reshape(b, g, (h // g) * t, -1)
            grad_v = None
            if ctx.needs_input_grad[2]:  # P^T dO per KV head, summed over its g query heads
                p_grouped = probs.to(v.dtype).to(dtype).reshape(b, g, (h // g) * t, n)
                grad_v = torch.matmul(p_grouped.transpose(-1, -2), grad_out).to(v.dtype)
            grad_logits = None
            if ctx.needs_input_grad[0]:  # softmax backward: P * (dP - sum(dP * P))
                d_probs = torch.matmul(grad_out, v.to(dtype).transpose(-1, -2))
                d_probs = d_probs.view(b, h, t, n).to(v.dtype).float()  # through P's casts, as autograd
                row_dot = torch.matmul(d_probs.unsqueeze(-2), probs.unsqueeze(-1)).squeeze(-1)  # [B, H, T, 1]
                grad_logits = d_probs.sub_(row_dot).mul_(probs).to(logits.dtype)
        return grad_logits, None, grad_v


def softmax_values(logits: torch.Tensor, mask: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """P V with P = softmax(logits + mask) (float32 softmax, cast to V's dtype, as `masked_softmax`):
    logits [B, H, T, N], v [B, G, N, D] -> [B, H, T, D] (GQA as `grouped_values`).

    With autograd, the probabilities are recomputed in the backward instead of kept
    (`_SoftmaxValuesRecompute`); the result and the gradients are those of
    `grouped_values(masked_softmax(logits, mask, v.dtype), v)`.
    """
    if torch.is_grad_enabled() and (logits.requires_grad or v.requires_grad):
        return _SoftmaxValuesRecompute.apply(logits, mask, v)
    return grouped_values(masked_softmax(logits, mask, v.dtype), v)


def _head_ffn_hidden(flat: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """relu(W1 x + b1): flat [B, H, P] -> [B, F, P] (bias fused in the GEMM, ReLU in place)."""
    return torch.baddbmm(b1[:, None], w1.expand(flat.shape[0], -1, -1), flat).relu_()


def _head_ffn_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """The head FFN without autograd bookkeeping; written into `out` (a contiguous [B, H, T, N]) when given."""
    b, h, t, n = x.shape
    hidden = _head_ffn_hidden(x.reshape(b, h, t * n), w1, b1)
    if out is None:
        return torch.baddbmm(b2[:, None], w2.expand(b, -1, -1), hidden).view(b, h, t, n)
    torch.baddbmm(b2[:, None], w2.expand(b, -1, -1), hidden, out=out.view(b, h, t * n))
    return out


class _HeadFFNRecompute(torch.autograd.Function):
    """The head FFN with a backward that recomputes the hidden activations instead of saving them.

    Autograd would keep relu(W1 x + b1), [B, F, T, N] (F = 2H by default: twice the layer's logits),
    for every LiSA layer until the backward; this keeps only x (the previous layer's logits, which the
    forward holds anyway) and recomputes the hidden values, one layer at a time, in the backward.

    Mixed precision: under autocast (e.g. float32 LiSA weights, bfloat16 logits) both GEMMs run in
    autocast's dtype, as autocast would run them; the backward, which autocast does not cover, casts
    the saved inputs to that same dtype and returns each gradient in its input's dtype. Without
    autocast the inputs are used as they are.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):  # noqa: ANN001, ANN205 - autograd.Function signature
        ctx.compute_dtype = autocast_dtype(x.device.type)
        ctx.b2_dtype = b2.dtype
        ctx.save_for_backward(x, w1, b1, w2)  # uncast: a cast copy of x would be a second [B, H, T, N]
        with _autocast_off(x.device.type):
            return _head_ffn_forward(*_cast_all(ctx.compute_dtype, x, w1, b1, w2, b2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        saved = ctx.saved_tensors
        x, w1, b1, w2 = _cast_all(ctx.compute_dtype, *saved)
        b, h, t, n = x.shape
        with _autocast_off(x.device.type):
            flat = x.reshape(b, h, t * n)
            hidden = _head_ffn_hidden(flat, w1, b1)  # [B, F, P]
            g = grad.to(hidden.dtype).reshape(b, h, t * n)  # [B, H, P]
            grad_w2 = torch.bmm(g, hidden.transpose(1, 2)).sum(0)
            grad_b2 = g.sum((0, 2))
            d_hidden = torch.bmm(w2.t().expand(b, -1, -1), g).masked_fill_(hidden <= 0, 0)  # through the ReLU
            del hidden
            grad_w1 = torch.bmm(d_hidden, flat.transpose(1, 2)).sum(0)
            grad_b1 = d_hidden.sum((0, 2))
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.bmm(w1.t().expand(b, -1, -1), d_hidden).view(b, h, t, n).to(saved[0].dtype)
        grads = (grad_w1, grad_b1, grad_w2, grad_b2)
        dtypes = (saved[1].dtype, saved[2].dtype, saved[3].dtype, ctx.b2_dtype)
        return (grad_x, *(grad.to(dtype) for grad, dtype in zip(grads, dtypes, strict=True)))


def _cast_all(dtype: torch.dtype | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`tensors` cast to `dtype` (unchanged when None)."""
    return tensors if dtype is None else tuple(t.to(dtype) for t in tensors)


def head_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Head-alignment FFN along the head axis: x [B, H, T, N] -> [B, H, T, N].

    `W2 relu(W1 x[:, :, i, j] + b1) + b2` for every (query i, key j); w1 [F, H], w2 [H, F].

    Two batched GEMMs over the flattened (query, key) axis, each with its bias fused (`baddbmm`) and
    the ReLU in place: per (query, key) pair this reads x once and writes the F hidden values once
    (an einsum formulation materialises permuted copies and adds the biases in separate passes).
    When a gradient is needed, the hidden activations are recomputed in the backward instead of being
    kept (`_HeadFFNRecompute`): a training step holds per LiSA layer the logits and the probabilities,
    not also the F hidden planes.
    `out`: a contiguous [B, H, T, N] to write the result into (inference only: refused when a gradient
    is needed).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, b1, w2, b2)):
        if out is not None:
            raise ValueError("head_ffn(out=...) is for inference; call it without `out` when a gradient is needed.")
        return _HeadFFNRecompute.apply(x, w1, b1, w2, b2)
    return _head_ffn_forward(x, w1, b1, w2, b2, out)


def combine_scores(aligned: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float, share: str) -> torch.Tensor:
    """This layer's pre-mask logits [B, H, T, N]: the aligned previous attention (mapped through
    log(relu(.) + eps) when share="probs") plus the low-rank delta `scale * q k^T` (q [B, H, T, r],
    k [B, G, N, r], GQA as in `grouped_scores`).

    The delta is added by one `baddbmm` (scale and sum fused, no [B, H, T, N] delta tensor); under
    no-grad it is written into `aligned` in place, which must then be a fresh tensor (the FFN output).
    """
    base = aligned if share == "logits" else torch.log(F.relu(aligned) + PROBS_EPS)
    b, h, t, e = q.shape
    g, n = k.shape[1], k.shape[2]
    flat = base.reshape(b * g, (h // g) * t, n)
    queries = q.reshape(b * g, (h // g) * t, e)
    keys_t = k.reshape(b * g, n, e).transpose(1, 2)
    if torch.is_grad_enabled() or not base.is_contiguous():
        return torch.baddbmm(flat, queries, keys_t, alpha=scale).view(b, h, t, n)
    return flat.baddbmm_(queries, keys_t, alpha=scale).view(b, h, t, n)


# Bytes of FFN hidden activations per query tile on the no-grad path (`lisa_attention_rows`).
TILE_HIDDEN_BYTES = 4 * 2**20


def query_tile_rows(num_queries: int, num_keys: int, hidden_features: int, itemsize: int,
                    budget: int | None = None) -> int:
    """Query rows per tile so that one tile's FFN hidden values, [B, F, rows, N], stay within `budget`
    bytes per sequence (default `TILE_HIDDEN_BYTES`; at least one row, at most `num_queries`)."""
    budget = TILE_HIDDEN_BYTES if budget is None else budget
    per_row = max(1, hidden_features * num_keys * itemsize)
    return max(1, min(num_queries, budget // per_row))


def lisa_attention_rows(
    prev: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
    mask: torch.Tensor, scale: float, share: str, rows: int, need_probs: bool = True,
    logits_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A LiSA layer's logits, probabilities [B, H, T, N] and P V [B, H, T, D], `rows` query rows at a time.

    prev [B, H, T, N] (the previous layer's logits), q [B, H, T, r], k [B, G, N, r], v [B, G, N, D],
    mask as `additive_mask` returns it. Each query row depends only on the same row of `prev`, so
    the tiles give the same numbers as one pass over all rows (`head_ffn` + `combine_scores` +
    `masked_softmax` + `grouped_values`). Only the results are full-size: the FFN's hidden values and
    the other temporaries exist for one tile at a time and are small enough for the C allocator to
    reuse the same memory tile after tile. Allocations of tens of MB are fresh pages from the
    kernel every time (glibc serves them with mmap), and touching fresh pages can cost more than the
    arithmetic (docs/inference.md). For inference (no autograd graph through the tiles). need_probs=False: the
    probabilities are not kept (returned as None), as with sdpa, when nothing reads them. logits_out:
    a contiguous [B, H, T, N] tensor to write the logits into (reused memory,
    `LisaForwardState.empty_logits`); a new one if None.
    """
    def scores(tile: slice, tile_mask: torch.Tensor) -> torch.Tensor:
        x = prev[:, :, tile]
        if share == "probs":
            x = masked_softmax(x, tile_mask, q.dtype)
        return combine_scores(head_ffn(x, w1, b1, w2, b2), q[:, :, tile], k, scale, share)

    return _attend_in_rows(scores, prev.shape[2], k.shape[2], q, v, mask, rows, need_probs, logits_out)


def _attend_in_rows(
    scores_of: Callable[[slice, torch.Tensor], torch.Tensor], t: int, n: int, q: torch.Tensor, v: torch.Tensor,
    mask: torch.Tensor, rows: int, need_probs: bool, logits_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The tile loop of `lisa_attention_rows` / `full_attention_rows`: `scores_of(tile, tile_mask)` gives
    the pre-mask logits [B, H, rows, N] of a tile; returns logits (`logits_out` if given), probabilities
    (or None) and P V."""
    b, h = q.shape[:2]
    if logits_out is None:
        logits = torch.empty((b, h, t, n), dtype=q.dtype, device=q.device)
    elif logits_out.shape != (b, h, t, n) or logits_out.dtype != q.dtype or not logits_out.is_contiguous():
        raise ValueError(
            f"logits_out must be a contiguous {q.dtype} tensor of shape {(b, h, t, n)}, got "
            f"{logits_out.dtype} {tuple(logits_out.shape)} (contiguous: {logits_out.is_contiguous()})."
        )
    else:
        logits = logits_out
    probs = torch.empty((b, h, t, n), dtype=v.dtype, device=v.device) if need_probs else None
    outputs = []
    for start in range(0, t, rows):
        tile = slice(start, start + rows)
        tile_mask = mask if mask.dim() == 0 else mask[..., tile, :]
        tile_scores = scores_of(tile, tile_mask)
        logits[:, :, tile] = tile_scores
        tile_probs = masked_softmax(tile_scores, tile_mask, v.dtype)
        if probs is not None:
            probs[:, :, tile] = tile_probs
        outputs.append(grouped_values(tile_probs, v))
    return logits, probs, torch.cat(outputs, dim=2)


def full_attention_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, rows: int,
    need_probs: bool = True, logits_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """An anchor layer's logits, probabilities [B, H, T, N] and P V [B, H, T, D], `rows` query rows at a time.

    q [B, H, T, e], k [B, G, N, e], v [B, G, N, D]; the same numbers as `grouped_scores` +
    `masked_softmax` + `grouped_values` over all rows, with the temporaries (the masked logits) one tile
    at a time, as in `lisa_attention_rows` (need_probs and logits_out as there). For inference.
    """
    return _attend_in_rows(lambda tile, _mask: grouped_scores(q[:, :, tile], k, scale),
                           q.shape[2], k.shape[2], q, v, mask, rows, need_probs, logits_out)
