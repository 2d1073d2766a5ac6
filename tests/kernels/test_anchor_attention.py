"""anchor_attention (Triton, interpreted on CPU) against anchor_attention_reference, and the reference
against a naive per-element loop."""

from __future__ import annotations

import math

import pytest
import torch

from lisa_kernels import anchor_attention, anchor_attention_reference
from lisa_kernels._reference import valid_keys


def _qkv(B, H, G, T, N, D, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)
        for shape in ((B, H, T, D), (B, G, N, D), (B, G, N, D))
    )


def naive_anchor(q, k, v, scale, lengths, causal_offset):
    B, H, T, D = q.shape
    G, N = k.shape[1], k.shape[2]
    g = H // G
    qd, kd, vd = q.double().tolist(), k.double().tolist(), v.double().tolist()
    offset = N - T if causal_offset is None else causal_offset
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    logits = torch.zeros(B, H, T, N, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                s = [scale * sum(qd[b][h][t][i] * kd[b][h // g][j][i] for i in range(D)) for j in range(N)]
                logits[b, h, t] = torch.tensor(s, dtype=torch.float64)
                vis = [j for j in range(N) if j <= offset + t and (lengths is None or j < int(lengths[b]))]
                mx = max(s[j] for j in vis)
                e = {j: math.exp(s[j] - mx) for j in vis}
                for d in range(D):
                    out[b, h, t, d] = sum(e[j] * vd[b][h // g][j][d] for j in vis) / sum(e.values())
    return out, logits


@pytest.mark.parametrize(
    "T,N,lengths,offset",
    [(1, 6, [6, 2], None), (4, 6, None, None), (3, 7, [7, 5], 2)],
    ids=["decode-ragged", "causal", "lengths+offset"],
)
def test_reference_matches_naive_loop(T, N, lengths, offset):
    q, k, v = _qkv(2, 4, 2, T, N, 3)
    lens = None if lengths is None else torch.tensor(lengths)
    out, logits = anchor_attention_reference(q, k, v, 0.5, lens, offset)
    n_out, n_logits = naive_anchor(q, k, v, 0.5, lens, offset)
    torch.testing.assert_close(out.double(), n_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.double(), n_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H,G", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa-g6"])
@pytest.mark.parametrize(
    "T,N,lengths,offset",
    [(1, 37, [37, 20], None), (1, 21, None, None), (7, 37, None, None), (5, 40, [40, 30], 7)],
    ids=["decode-ragged", "decode", "prefill", "lengths+offset"],
)
def test_anchor_fp32(H, G, T, N, lengths, offset, device, close, close_visible, tol):
    q, k, v = _qkv(2, H, G, T, N, 8, device=device, seed=H * T + N)
    lens = None if lengths is None else torch.tensor(lengths, device=device)
    out, logits = anchor_attention(q, k, v, 0.35, lens, offset, block_t=4, block_n=16)
    ref_out, ref_logits = anchor_attention_reference(q, k, v, 0.35, lens, offset)
    close(out, ref_out, tol(torch.float32), "out")
    close_visible(logits, ref_logits, valid_keys(2, T, N, device, lens, offset), tol(torch.float32), "logits")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,lengths", [(1, [29, 12]), (9, None)], ids=["decode", "prefill"])
def test_anchor_half_precision(dtype, T, lengths, device, close, close_visible, tol):
    q, k, v = _qkv(2, 4, 2, T, 29, 16, dtype=dtype, device=device, seed=T)
    lens = None if lengths is None else torch.tensor(lengths, device=device)
    out, logits = anchor_attention(q, k, v, 0.25, lens, block_t=4, block_n=16)
    ref_out, ref_logits = anchor_attention_reference(q, k, v, 0.25, lens)
    close(out, ref_out, tol(dtype), "out")
    close_visible(logits, ref_logits, valid_keys(2, T, 29, device, lens), tol(dtype), "logits")


def test_anchor_default_tiles_strided_and_empty_rows(device, close, close_visible, tol):
    # Default tiles; K / V slices of a longer cache; lengths[0] == 0 (no visible key: finite output).
    q, k, v = _qkv(2, 4, 2, 1, 40, 8, device=device, seed=1)
    k, v = k[:, :, :33], v[:, :, :33]
    lens = torch.tensor([0, 33], device=device)
    out, logits = anchor_attention(q, k, v, 0.35, lens)
    ref_out, ref_logits = anchor_attention_reference(q, k, v, 0.35, lens)
    assert torch.isfinite(out).all()
    close(out[1], ref_out[1], tol(torch.float32), "out[1]")
    close_visible(logits, ref_logits, valid_keys(2, 1, 33, device, lens), tol(torch.float32), "logits")


@pytest.mark.parametrize("fn", [anchor_attention, anchor_attention_reference], ids=["kernel", "reference"])
def test_anchor_rejects_bad_inputs(fn):
    q, k, v = _qkv(2, 4, 2, 3, 9, 8)
    cases = [
        ((q[0], k, v), {}, r"q has shape \(4, 3, 8\).*\[B, H, T, D\]"),
        ((q, k[:, :, :, :4], v), {}, r"k has shape \(2, 2, 9, 4\).*\(2, 2, 9, 8\)"),
        ((q, torch.zeros(2, 3, 9, 8), v), {}, r"k has shape \(2, 3, 9, 8\).*divisible"),
        ((q, k, v[:, :, :5]), {}, r"v has shape \(2, 2, 5, 8\).*\(2, 2, 9, 8\)"),
        ((q, k, v), {"lengths": torch.tensor([1])}, r"lengths has shape \(1,\).*\(2\)"),
        ((q, k, v), {"causal_offset": 1.5}, r"causal_offset must be an int"),
        ((torch.zeros(2, 4, 10, 8), k, v), {}, r"T=10 queries cannot exceed N=9"),
    ]
    for (qq, kk, vv), kw, match in cases:
        with pytest.raises(ValueError, match=match):
            fn(qq, kk, vv, 0.5, **kw)
