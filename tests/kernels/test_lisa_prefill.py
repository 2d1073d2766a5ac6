"""lisa_prefill (Triton, interpreted on CPU) against lisa_prefill_reference, and the reference
against a naive per-element loop."""

from __future__ import annotations

import pytest
import torch

from lisa_kernels import LisaWeights, lisa_decode, lisa_prefill, lisa_prefill_reference
from lisa_kernels._reference import valid_keys

ARGS = ("prev_logits", "q_r", "k_r", "v")


def _call(fn, inp, scale, share, **kw):
    weights = LisaWeights(*(inp[a] for a in LisaWeights._fields))
    return fn(*(inp[a] for a in ARGS), weights, scale, share, **kw)


@pytest.mark.parametrize("share", ["logits", "probs"])
def test_reference_matches_naive_loop(share, lisa_inputs, naive):
    inp = lisa_inputs(B=1, H=4, G=2, N=6, r=2, D=3, T=3)
    out, logits = _call(lisa_prefill_reference, inp, 0.4, share)
    n_out, n_logits = naive(inp, 0.4, share)
    torch.testing.assert_close(out.double(), n_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.double(), n_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "H,G,T,N",
    [(4, 4, 7, 37), (4, 2, 20, 20), (6, 1, 5, 19), (2, 2, 1, 23)],
    ids=["mha-T7-N37", "gqa-T=N", "mqa-g6", "T1"],
)
@pytest.mark.parametrize("share", ["logits", "probs"])
def test_prefill_fp32(H, G, T, N, share, device, lisa_inputs, close, close_visible, tol):
    # 16-key tiles (N not a multiple), 4-query tiles: several query tiles, causal tail tiles.
    inp = lisa_inputs(B=2, H=H, G=G, N=N, r=6, D=8, T=T, device=device, seed=T + N)
    out, logits = _call(lisa_prefill, inp, 0.3, share, block_t=4, block_n=16)
    ref_out, ref_logits = _call(lisa_prefill_reference, inp, 0.3, share)
    close(out, ref_out, tol(torch.float32), "out")
    close_visible(logits, ref_logits, valid_keys(2, T, N, device), tol(torch.float32, share == "probs"), "logits")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("share", ["logits", "probs"])
def test_prefill_half_precision(dtype, share, device, lisa_inputs, close, close_visible, tol):
    inp = lisa_inputs(B=1, H=4, G=2, N=21, r=4, D=8, T=9, dtype=dtype, device=device, seed=2)
    out, logits = _call(lisa_prefill, inp, 0.3, share, block_t=4, block_n=16)
    ref_out, ref_logits = _call(lisa_prefill_reference, inp, 0.3, share)
    close(out, ref_out, tol(dtype), "out")
    close_visible(logits, ref_logits, valid_keys(1, 9, 21, device), tol(dtype), "logits")


def test_prefill_default_tiles_and_strided_inputs(device, lisa_inputs, close, close_visible, tol):
    # Default block sizes; k_r / v are slices of a longer cache, prev_logits a slice over keys.
    B, H, G, T, N, Nmax = 1, 4, 2, 6, 13, 24
    inp = lisa_inputs(B=B, H=H, G=G, N=Nmax, r=4, D=8, T=T, device=device, seed=9)
    inp["k_r"], inp["v"] = inp["k_r"][:, :, :N], inp["v"][:, :, :N]
    inp["prev_logits"] = inp["prev_logits"][..., :N]
    out, logits = _call(lisa_prefill, inp, 0.3, "probs")
    ref_out, ref_logits = _call(lisa_prefill_reference, inp, 0.3, "probs")
    close(out, ref_out, tol(torch.float32), "out")
    close_visible(logits, ref_logits, valid_keys(B, T, N, device), tol(torch.float32, True), "logits")


@pytest.mark.parametrize("share", ["logits", "probs"])
def test_prefill_last_query_equals_decode(share, device, lisa_inputs, close, tol):
    # The last prefill query sees all N keys, exactly like a decode step without lengths.
    inp = lisa_inputs(B=2, H=4, G=2, N=18, r=4, D=8, T=5, device=device, seed=4)
    out, logits = _call(lisa_prefill, inp, 0.3, share, block_t=4, block_n=16)
    dec = {a: inp[a][:, :, -1] if a in ("prev_logits", "q_r") else inp[a] for a in inp}
    d_out, d_logits = _call(lisa_decode, dec, 0.3, share, lengths=None, block_n=16)
    close(out[:, :, -1], d_out, tol(torch.float32), "out")
    close(logits[:, :, -1], d_logits, tol(torch.float32, share == "probs"), "logits")


def test_prefill_writes_zeros_for_key_tiles_no_query_of_the_tile_sees(device, lisa_inputs):
    # T = N = 32, 4-query and 16-key tiles: query tile [0, 4) sees keys 0..3, so key tile [16, 32) is skipped.
    inp = lisa_inputs(B=1, H=4, G=2, N=32, r=4, D=8, T=32, device=device, seed=5)
    _, logits = _call(lisa_prefill, inp, 0.3, "logits", block_t=4, block_n=16)
    _, ref_logits = _call(lisa_prefill_reference, inp, 0.3, "logits")
    assert (logits[:, :, :16, 16:] == 0).all()  # never computed
    assert (ref_logits[:, :, :16, 16:] != 0).all()
    assert (logits[:, :, 3, 4:16] != 0).all()  # a partly visible tile is computed whole


@pytest.mark.parametrize("fn", [lisa_prefill, lisa_prefill_reference], ids=["kernel", "reference"])
def test_prefill_rejects_bad_inputs(fn, lisa_inputs):
    inp = lisa_inputs(B=1, H=4, G=2, N=9, r=4, D=8, T=3)
    cases = [
        ({"prev_logits": torch.zeros(1, 4, 9)}, "logits", r"prev_logits has shape \(1, 4, 9\).*\[B, H, T, N\]"),
        ({"q_r": torch.zeros(1, 4, 2, 4)}, "logits", r"q_r has shape \(1, 4, 2, 4\).*\(1, 4, 3, 4\)"),
        ({"q_r": torch.zeros(1, 4, 3, 5), "k_r": torch.zeros(1, 2, 9, 5)}, "logits", r"r=5 must be even"),
        ({"k_r": torch.zeros(1, 3, 9, 4)}, "logits", r"k_r has shape \(1, 3, 9, 4\).*divisible"),
        ({"v": torch.zeros(1, 2, 9)}, "logits", r"v has shape \(1, 2, 9\)"),
        ({"prev_logits": torch.zeros(1, 4, 10, 9), "q_r": torch.zeros(1, 4, 10, 4)}, "logits",
         r"T=10 queries cannot exceed N=9"),
        ({}, "both", r"share must be one of"),
    ]
    for changes, share, match in cases:
        with pytest.raises(ValueError, match=match):
            _call(fn, {**inp, **changes}, 0.5, share)
