"""Tensor math shared by LiSA and anchor layers (PyTorch reference path).

Shapes follow transformers' LLaMA layout: queries [B, H, T, *], keys/values [B, G, N, *] with
H = G * g query heads per KV head (GQA); query head h reads KV head h // g.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Added to the FFN output before the log in share="probs" mode: log(relu(A) + PROBS_EPS).
PROBS_EPS = 1e-6


def additive_mask(
    attention_mask: torch.Tensor | None, num_queries: int, num_keys: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The mask to add to logits, [B or 1, 1, T, N], with `finfo(dtype).min` where masked.

    `attention_mask` is what transformers hands to an attention module: `None` (plain causal,
    queries at the last T of N positions), a boolean [B, 1, T, >=N] (True = attend) or an
    additive float [B, 1, T, >=N].
    """
    minimum = torch.finfo(dtype).min
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


def grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * q k^T with GQA: q [B, H, T, e], k [B, G, N, e] -> [B, H, T, N] (no K repeat)."""
    b, h, t, e = q.shape
    g = k.shape[1]
    scores = torch.matmul(q.reshape(b, g, (h // g) * t, e), k.transpose(-1, -2))
    return scores.view(b, h, t, k.shape[2]) * scale


def grouped_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """P V with GQA: probs [B, H, T, N], v [B, G, N, D] -> [B, H, T, D] (no V repeat)."""
    b, h, t, n = probs.shape
    g = v.shape[1]
    out = torch.matmul(probs.reshape(b, g, (h // g) * t, n), v)
    return out.view(b, h, t, v.shape[-1])


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """softmax(logits + mask) over keys in float32, cast to `out_dtype` (as eager attention)."""
    return F.softmax(logits.float() + mask.float(), dim=-1).to(out_dtype)


def head_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Head-alignment FFN along the head axis: x [B, H, T, N] -> [B, H, T, N].

    `W2 relu(W1 x[:, :, i, j] + b1) + b2` for every (query i, key j); w1 [F, H], w2 [H, F].
    """
    hidden = torch.einsum("fh,bhtn->bftn", w1, x) + b1[:, None, None]
    return torch.einsum("hf,bftn->bhtn", w2, F.relu(hidden)) + b2[:, None, None]


def combine_scores(aligned: torch.Tensor, delta: torch.Tensor, share: str) -> torch.Tensor:
    """This layer's pre-mask logits from the aligned previous attention and the low-rank delta."""
    if share == "logits":
        return aligned + delta
    return torch.log(F.relu(aligned) + PROBS_EPS) + delta
