"""lisa_decode (Triton, interpreted on CPU) against lisa_decode_reference, and the reference
against a naive per-element loop."""

from __future__ import annotations

import pytest
import torch

from lisa_kernels import LisaWeights, lisa_decode, lisa_decode_reference

ARGS = ("prev_logits", "q_r", "k_r", "v")


def _call(fn, inp, scale, share, lengths=None, **kw):
    weights = LisaWeights(*(inp[a] for a in LisaWeights._fields))
    return fn(*(inp[a] for a in ARGS), weights, scale, share, lengths, **kw)


@pytest.mark.parametrize("share", ["logits", "probs"])
@pytest.mark.parametrize("lengths", [None, [5, 3]])
def test_reference_matches_naive_loop(share, lengths, lisa_inputs, naive):
    inp = lisa_inputs(B=2, H=4, G=2, N=5, r=2, D=3)
    lens = None if lengths is None else torch.tensor(lengths)
    out, logits = _call(lisa_decode_reference, inp, 0.4, share, lens)
    n_out, n_logits = naive(inp, 0.4, share, lens)
    torch.testing.assert_close(out.double(), n_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.double(), n_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H,G", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa-g6"])
@pytest.mark.parametrize("share", ["logits", "probs"])
@pytest.mark.parametrize("lengths", [None, [37, 20]], ids=["full", "ragged"])
def test_decode_fp32(H, G, share, lengths, device, lisa_inputs, close, tol):
    # N = 37 is not a multiple of the 16-key tile; 2 key splits per (batch, kv head).
    inp = lisa_inputs(B=2, H=H, G=G, N=37, r=6, D=8, device=device, seed=H + G)
    lens = None if lengths is None else torch.tensor(lengths, device=device)
    out, logits = _call(lisa_decode, inp, 0.35, share, lens, block_n=16, num_splits=2)
    ref_out, ref_logits = _call(lisa_decode_reference, inp, 0.35, share, lens)
    close(out, ref_out, tol(torch.float32), "out")
    close(logits, ref_logits, tol(torch.float32, share == "probs"), "logits")


@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode_key_splits(num_splits, device, lisa_inputs, close, tol):
    inp = lisa_inputs(B=1, H=4, G=2, N=70, r=4, D=16, device=device, seed=3)
    lens = torch.tensor([61], device=device)
    block_n = None if num_splits is None else 16  # None: the default tiling (64 keys, auto splits)
    out, logits = _call(lisa_decode, inp, 0.25, "logits", lens, block_n=block_n, num_splits=num_splits)
    ref_out, ref_logits = _call(lisa_decode_reference, inp, 0.25, "logits", lens)
    close(out, ref_out, tol(torch.float32), "out")
    close(logits, ref_logits, tol(torch.float32), "logits")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("share", ["logits", "probs"])
def test_decode_half_precision(dtype, share, device, lisa_inputs, close, tol):
    inp = lisa_inputs(B=2, H=4, G=2, N=29, r=6, D=8, dtype=dtype, device=device, seed=7)
    lens = torch.tensor([29, 11], device=device)
    out, logits = _call(lisa_decode, inp, 0.35, share, lens, block_n=16)
    ref_out, ref_logits = _call(lisa_decode_reference, inp, 0.35, share, lens)
    close(out, ref_out, tol(dtype), "out")
    close(logits, ref_logits, tol(dtype), "logits")


def test_decode_mixed_dtypes_and_strided_inputs(device, lisa_inputs, close, tol):
    # bf16 caches that are slices of a longer preallocated cache, fp32 prev_logits / weights,
    # q_r transposed: the kernel takes strides, nothing is made contiguous.
    B, H, G, N, Nmax, r, D = 2, 4, 2, 21, 32, 4, 8
    inp = lisa_inputs(B=B, H=H, G=G, N=Nmax, r=r, D=D, device=device, seed=11)
    inp["k_r"] = inp["k_r"].to(torch.bfloat16)[:, :, :N]
    inp["v"] = inp["v"].to(torch.bfloat16)[:, :, :N]
    inp["prev_logits"] = inp["prev_logits"][:, :, :N]
    inp["q_r"] = inp["q_r"][:, :, :r].transpose(0, 1).contiguous().transpose(0, 1)
    assert not inp["v"].is_contiguous() and not inp["q_r"].is_contiguous()
    for share in ("logits", "probs"):
        out, logits = _call(lisa_decode, inp, 0.5, share, None, block_n=16)
        ref_out, ref_logits = _call(lisa_decode_reference, inp, 0.5, share, None)
        close(out, ref_out, tol(torch.bfloat16), f"out ({share})")
        close(logits, ref_logits, tol(torch.bfloat16), f"logits ({share})")


@pytest.mark.parametrize("share", ["logits", "probs"])
def test_decode_empty_sequence_has_no_nan(share, device, lisa_inputs, close, tol):
    # lengths[0] == 0: that row's output is not meaningful but must be finite; its logits (pre-mask)
    # are still defined, and the other sequence is unaffected.
    inp = lisa_inputs(B=2, H=2, G=1, N=18, r=2, D=4, device=device, seed=5)
    lens = torch.tensor([0, 18], device=device)
    out, logits = _call(lisa_decode, inp, 0.5, share, lens, block_n=16)
    ref_out, ref_logits = _call(lisa_decode_reference, inp, 0.5, share, lens)
    assert torch.isfinite(out).all() and torch.isfinite(logits).all()
    close(out[1], ref_out[1], tol(torch.float32), "out[1]")
    close(logits, ref_logits, tol(torch.float32, share == "probs"), "logits")


def _bad(inp, **changes):
    new = dict(inp)
    new.update(changes)
    return new


@pytest.mark.parametrize("fn", [lisa_decode, lisa_decode_reference], ids=["kernel", "reference"])
def test_decode_rejects_bad_inputs(fn, lisa_inputs):
    inp = lisa_inputs(B=2, H=4, G=2, N=9, r=4, D=8)
    cases = [
        (_bad(inp, prev_logits=torch.zeros(2, 4, 9, 1)), None, "logits", r"prev_logits has shape \(2, 4, 9, 1\)"),
        (_bad(inp, q_r=torch.zeros(2, 3, 4)), None, "logits", r"q_r has shape \(2, 3, 4\).*\(2, 4, 4\)"),
        (_bad(inp, q_r=torch.zeros(2, 4, 3)), None, "logits", r"q_r has shape \(2, 4, 3\).*r=3 must be even"),
        (_bad(inp, k_r=torch.zeros(2, 3, 9, 4)), None, "logits", r"k_r has shape \(2, 3, 9, 4\).*divisible"),
        (_bad(inp, k_r=torch.zeros(2, 2, 8, 4)), None, "logits", r"k_r has shape \(2, 2, 8, 4\).*\(2, 2, 9, 4\)"),
        (_bad(inp, v=torch.zeros(2, 2, 10, 8)), None, "logits", r"v has shape \(2, 2, 10, 8\).*\(2, 2, 9, 8\)"),
        (_bad(inp, w1=torch.zeros(8, 5)), None, "logits", r"w1 has shape \(8, 5\).*\[F, H\] = \(8, 4\)"),
        (_bad(inp, b1=torch.zeros(7)), None, "logits", r"b1 has shape \(7,\).*\(8\)"),
        (_bad(inp, w2=torch.zeros(4, 7)), None, "logits", r"w2 has shape \(4, 7\).*\(4, 8\)"),
        (_bad(inp, b2=torch.zeros(3)), None, "logits", r"b2 has shape \(3,\).*\(4\)"),
        (inp, None, "prob", r"share must be one of"),
        (inp, torch.tensor([3, 4, 5]), "logits", r"lengths has shape \(3,\).*\(2\)"),
        (inp, torch.tensor([3.0, 4.0]), "logits", r"lengths must be an integer tensor"),
    ]
    for bad, lens, share, match in cases:
        with pytest.raises(ValueError, match=match):
            _call(fn, bad, 0.5, share, lens)


@pytest.mark.parametrize("fn", [lisa_decode, lisa_decode_reference], ids=["kernel", "reference"])
def test_decode_refuses_weights_that_are_not_lisa_weights(fn, lisa_inputs):
    # The head FFN travels as one LisaWeights; a plain tuple or a lone tensor names the fix.
    inp = lisa_inputs(B=2, H=4, G=2, N=9, r=4, D=8)
    for weights, got in (((inp["w1"], inp["b1"], inp["w2"], inp["b2"]), "tuple"), (inp["w1"], "Tensor")):
        with pytest.raises(ValueError, match=rf"weights must be lisa_kernels.LisaWeights\(w1, b1, w2, b2\).*got {got}"):
            fn(*(inp[a] for a in ARGS), weights, 0.5)
