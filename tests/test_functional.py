"""The PyTorch path's head-alignment FFN equals the per-(query, key) MLP of the method (docs/method.md), values
and gradients."""

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
    """Independent: repeat each KV head's keys for its query heads, then the method's combination."""
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


@pytest.mark.parametrize("share", ["logits", "probs"])
@pytest.mark.parametrize("mask_kind", ["causal", "padding", "none"])
def test_attention_in_row_tiles_equals_one_pass(share, mask_kind):
    """`lisa_attention_rows` (inference, a few query rows at a time) gives what the one-pass composition gives."""
    gen = torch.Generator().manual_seed(4)
    b, h, g, t, n, r, d = 2, 6, 3, 7, 9, 4, 5  # T = 7 queries at the last 7 of N = 9 keys, GQA
    prev = torch.randn(b, h, t, n, generator=gen, dtype=torch.float64)
    q = torch.randn(b, h, t, r, generator=gen, dtype=torch.float64)
    k = torch.randn(b, g, n, r, generator=gen, dtype=torch.float64)
    v = torch.randn(b, g, n, d, generator=gen, dtype=torch.float64)
    w1, b1, w2, b2 = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((12, h), (12,), (h, 12), (h,)))
    if mask_kind == "padding":  # left padding: the first sequence's first 3 keys are padding
        allowed = torch.ones(b, 1, t, n, dtype=torch.bool).tril(n - t)
        allowed[0, ..., :3] = False
        mask = LF.additive_mask(allowed, t, n, torch.float64, prev.device)
    else:
        mask = LF.additive_mask(None, 1 if mask_kind == "none" else t, n, torch.float64, prev.device)
        if mask_kind == "none":
            prev, q = prev[:, :, -1:], q[:, :, -1:]  # a decode step: one query, nothing masked
    ffn_in = prev if share == "logits" else LF.masked_softmax(prev, mask, prev.dtype)
    want_logits = LF.combine_scores(LF.head_ffn(ffn_in, w1, b1, w2, b2), q, k, 0.4, share)
    want_probs = LF.masked_softmax(want_logits, mask, v.dtype)
    want_out = LF.grouped_values(want_probs, v)
    for rows in (1, 2, 3, prev.shape[2]):
        logits, probs, out = LF.lisa_attention_rows(prev, q, k, v, w1, b1, w2, b2, mask, 0.4, share, rows)
        torch.testing.assert_close(logits, want_logits, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(probs, want_probs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)


def test_query_tile_rows_stay_within_the_budget():
    assert LF.query_tile_rows(256, 4096, 18, 4, budget=4 * 2**20) == 14  # 14 * 18 * 4096 * 4 B <= 4 MiB
    assert LF.query_tile_rows(256, 16, 18, 4, budget=4 * 2**20) == 256  # never more rows than queries
    assert LF.query_tile_rows(256, 10**9, 18, 4, budget=4 * 2**20) == 1  # at least one row


def test_fully_masked_float64_row_is_finite():
    """A left-padding query sees no key; in float64 the mask used to become -inf in the float32 softmax (NaN)."""
    allowed = torch.zeros(1, 1, 1, 4, dtype=torch.bool)
    mask = LF.additive_mask(allowed, 1, 4, torch.float64, torch.device("cpu"))
    probs = LF.masked_softmax(torch.randn(1, 2, 1, 4, dtype=torch.float64), mask, torch.float64)
    assert torch.isfinite(probs).all()


def test_full_attention_in_row_tiles_equals_one_pass():
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 6, 7, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 3, 9, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, 9, 5, generator=gen, dtype=torch.float64)
    allowed = torch.ones(2, 1, 7, 9, dtype=torch.bool).tril(2)
    allowed[1, ..., :2] = False
    mask = LF.additive_mask(allowed, 7, 9, torch.float64, q.device)
    want_logits = LF.grouped_scores(q, k, 0.5)
    want_probs = LF.masked_softmax(want_logits, mask, v.dtype)
    for rows in (1, 3, 7):
        logits, probs, out = LF.full_attention_rows(q, k, v, mask, 0.5, rows)
        torch.testing.assert_close(logits, want_logits, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(probs, want_probs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, LF.grouped_values(want_probs, v), rtol=1e-12, atol=1e-12)


def _explicit_softmax_values(logits, mask, v):
    """Independent: repeat each KV head's values for its query heads, softmax of the masked logits."""
    g = logits.shape[1] // v.shape[1]
    probs = torch.softmax(logits + mask, dim=-1)
    return probs @ v.repeat_interleave(g, dim=1)


@pytest.mark.parametrize("kv_heads", [6, 2], ids=["mha", "gqa"])
def test_softmax_values_matches_explicit_attention_with_gradients(kv_heads):
    """The recomputing backward gives autograd's gradients (left padding and a causal mask, GQA; float32,
    the precision of the softmax in both)."""
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 6, 5, 7, generator=gen, requires_grad=True)
    v = torch.randn(2, kv_heads, 7, 4, generator=gen, requires_grad=True)
    allowed = torch.ones(2, 1, 5, 7, dtype=torch.bool).tril(2)
    allowed[1, ..., :3] = False  # second sequence left-padded: its first query sees no key
    mask = LF.additive_mask(allowed, 5, 7, torch.float32, logits.device)
    got = LF.softmax_values(logits, mask, v)
    want = _explicit_softmax_values(logits, mask, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    upstream = torch.randn(got.shape, generator=gen)
    for g, w in zip(torch.autograd.grad(got, [logits, v], upstream), torch.autograd.grad(want, [logits, v], upstream)):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_softmax_values_saves_the_logits_not_the_probabilities():
    logits = torch.randn(1, 4, 6, 6, requires_grad=True)
    v = torch.randn(1, 2, 6, 3, requires_grad=True)
    mask = LF.additive_mask(None, 6, 6, torch.float32, logits.device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LF.softmax_values(logits, mask, v)
    assert [t.data_ptr() for t in saved] == [logits.data_ptr(), mask.data_ptr(), v.data_ptr()]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LF.grouped_values(LF.masked_softmax(logits, mask, v.dtype), v)
    assert any(t.shape == logits.shape and t.data_ptr() != logits.data_ptr() for t in saved)  # the old way


def test_softmax_values_in_bfloat16_matches_the_unfused_ops():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(1, 4, 8, 8, generator=gen).to(torch.bfloat16).requires_grad_()
    v = torch.randn(1, 2, 8, 4, generator=gen).to(torch.bfloat16).requires_grad_()
    mask = LF.additive_mask(None, 8, 8, torch.bfloat16, logits.device)
    got = LF.softmax_values(logits, mask, v)
    want = LF.grouped_values(LF.masked_softmax(logits, mask, v.dtype), v)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    upstream = torch.randn(got.shape, generator=gen).to(torch.bfloat16)
    for g, w in zip(torch.autograd.grad(got, [logits, v], upstream), torch.autograd.grad(want, [logits, v], upstream)):
        assert g.dtype == w.dtype == torch.bfloat16
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_head_ffn_and_grouped_scores_write_into_out_with_the_same_numbers():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 6, 1, 7, generator=gen)
    w1, b1, w2, b2 = (torch.randn(*s, generator=gen) for s in ((12, 6), (12,), (6, 12), (6,)))
    out = torch.empty(2, 6, 1, 7)
    assert LF.head_ffn(x, w1, b1, w2, b2, out=out) is out
    assert torch.equal(out, LF.head_ffn(x, w1, b1, w2, b2))
    q, k = torch.randn(2, 6, 1, 4, generator=gen), torch.randn(2, 3, 7, 4, generator=gen)
    scores = torch.empty(2, 6, 1, 7)
    assert LF.grouped_scores(q, k, 0.5, out=scores) is scores
    assert torch.equal(scores, LF.grouped_scores(q, k, 0.5))


def test_head_ffn_refuses_out_when_a_gradient_is_needed():
    x = torch.randn(1, 2, 1, 3, requires_grad=True)
    w1, b1, w2, b2 = torch.randn(4, 2), torch.randn(4), torch.randn(2, 4), torch.randn(2)
    with pytest.raises(ValueError, match="for inference"):
        LF.head_ffn(x, w1, b1, w2, b2, out=torch.empty(1, 2, 1, 3))
