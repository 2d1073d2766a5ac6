"""The PyTorch path's head-alignment FFN equals the per-(query, key) MLP of the spec, values and gradients."""

import pytest
import torch

from lisa_peft.tuners.lisa import functional as LF


def _per_pair_mlp(x, w1, b1, w2, b2):
    """Independent formulation: the FFN applied to the head vector of each (b, query, key) pair."""
    heads_last = x.permute(0, 2, 3, 1)  # [B, T, N, H]
    hidden = torch.relu(heads_last @ w1.T + b1)
    return (hidden @ w2.T + b2).permute(0, 3, 1, 2)


def test_head_ffn_matches_per_pair_mlp_with_gradients():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    shapes = ((12, 6), (12,), (6, 12), (6,))
    params = [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    got = LF.head_ffn(x, *params)
    want = _per_pair_mlp(x, *params)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    grads_got = torch.autograd.grad(got, [x, *params], upstream)
    grads_want = torch.autograd.grad(want, [x, *params], upstream)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_head_ffn_accepts_non_contiguous_input():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 6, generator=gen).transpose(2, 3)  # [2, 4, 6, 8], not contiguous
    params = [torch.randn(*s, generator=gen) for s in ((8, 4), (8,), (4, 8), (4,))]
    torch.testing.assert_close(LF.head_ffn(x, *params), _per_pair_mlp(x, *params), rtol=1e-5, atol=1e-5)


def test_head_ffn_backward_recomputes_instead_of_saving_the_hidden_planes():
    """gradcheck of the recomputing backward, and autograd keeps only [B, H, T, N]-sized tensors for it."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    shapes = ((6, 3), (6,), (3, 6), (3,))
    params = [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(LF.head_ffn, (x, *params))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        LF.head_ffn(x, *params)
    assert max(saved) == x.numel()  # no [B, F, T, N] hidden tensor is saved (F = 6 > H = 3)


def test_head_ffn_without_grad_needs_no_autograd_graph():
    x = torch.randn(1, 3, 4, 4)
    params = [torch.randn(*s, requires_grad=True) for s in ((6, 3), (6,), (3, 6), (3,))]
    with torch.no_grad():
        out = LF.head_ffn(x, *params)
    assert out.grad_fn is None


def _explicit_scores(aligned, q, k, scale, share):
    """Independent: repeat each KV head's keys for its query heads, then the spec's combination."""
    keys = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [B, H, N, r]: query head h reads kv head h // g
    delta = scale * torch.einsum("bhtr,bhnr->bhtn", q, keys)
    base = aligned if share == "logits" else torch.log(torch.relu(aligned) + LF.PROBS_EPS)
    return base + delta


@pytest.mark.parametrize("share", ["logits", "probs"])
@pytest.mark.parametrize("grad", [False, True])
def test_combine_scores_gqa_matches_explicit_delta(share, grad):
    gen = torch.Generator().manual_seed(3)
    aligned = torch.randn(2, 6, 5, 7, generator=gen, dtype=torch.float64)
    q = torch.randn(2, 6, 5, 4, generator=gen, dtype=torch.float64, requires_grad=grad)
    k = torch.randn(2, 3, 7, 4, generator=gen, dtype=torch.float64)  # G = 3 KV heads, 2 query heads each
    want = _explicit_scores(aligned, q, k, 0.3, share)
    with torch.set_grad_enabled(grad):
        got = LF.combine_scores(aligned.clone(), q, k, 0.3, share)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if grad:
        upstream = torch.randn(want.shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(torch.autograd.grad(got, q, upstream)[0], torch.autograd.grad(want, q, upstream)[0])


def test_decode_step_without_mask_sees_every_key():
    mask = LF.additive_mask(None, 1, 5, torch.float32, torch.device("cpu"))
    assert mask.dim() == 0 and mask.item() == 0
    logits = torch.randn(2, 3, 1, 5)
    torch.testing.assert_close(LF.masked_softmax(logits, mask, torch.float32), logits.softmax(-1))
    causal = LF.additive_mask(None, 2, 5, torch.float32, torch.device("cpu"))  # T > 1: last row sees all, first not
    assert causal.shape == (1, 1, 2, 5) and causal[0, 0, 0, -1] < -1e30 and (causal[0, 0, 1] == 0).all()
