"""Shared fixtures of the kernel tests.

TRITON_INTERPRET=1 must be in the environment before triton is imported (the interpreter is chosen
when a function is decorated, and transformers imports triton through torch._dynamo): the root
``tests/conftest.py`` sets it first thing; it is set here again for runs of this folder alone.
To run the same tests natively on a GPU, start pytest
with ``TRITON_INTERPRET=0``: the tensors are then created on CUDA.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tolerances (absolute = relative) per dtype of the inputs.  fp32: everything is fp32 in both the
# kernel and the reference, differences are summation order only.  fp16 / bf16: both sides round
# their fp32 results to the output dtype (1 ulp = 2^-10 / 2^-7 relative) and the kernel also
# rounds P to the value dtype before P @ V, as flash attention does.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
# share="probs" logits go through log(relu(A) + 1e-6), which scales A's fp32 rounding by 1/(A + 1e-6).
TOL_PROBS_LOGITS_FP32 = 2e-4


def use_cuda() -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if use_cuda() else "cpu")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Compare in fp32 with atol = rtol = tol; NaN anywhere fails."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    assert not torch.isnan(actual).any(), f"{what}: NaN in kernel output"
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def assert_close_visible(
    actual: torch.Tensor, expected: torch.Tensor, valid: torch.Tensor, tol: float, what: str
) -> None:
    """Logits of the prefill / anchor kernels: equal (as `assert_close`) where `valid` (bool, broadcast
    to their shape: key visible to the query); finite elsewhere (key tiles that no query of a query tile
    sees are written as zeros, not computed)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite kernel logits"
    hidden = ~valid.expand(actual.shape)
    assert_close(actual.masked_fill(hidden, 0), expected.masked_fill(hidden, 0), tol, what)


def make_lisa_inputs(
    B: int,
    H: int,
    G: int,
    N: int,
    r: int,
    D: int,
    T: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random LiSA inputs (decode when T is None, else prefill), F = 2H, values O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype=dtype, device=device)

    F = 2 * H
    q_shape = (B, H, r) if T is None else (B, H, T, r)
    prev_shape = (B, H, N) if T is None else (B, H, T, N)
    return {
        "prev_logits": rnd(*prev_shape, std=2.0),
        "q_r": rnd(*q_shape),
        "k_r": rnd(B, G, N, r),
        "v": rnd(B, G, N, D),
        "w1": rnd(F, H, std=0.7),
        "b1": rnd(F, std=0.3),
        "w2": rnd(H, F, std=0.7),
        "b2": rnd(H, std=0.3) + 1.0,  # keeps most of relu(A) > 0 in share="probs"
    }


def naive_lisa(
    inp: dict[str, torch.Tensor], scale: float, share: str, lengths: torch.Tensor | list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LiSA attention by per-element Python loops in float64 (independent of the reference's einsums).

    Decode (``prev_logits [B, H, N]``): key j is visible iff j < lengths[b] (all N keys when lengths is
    None); prefill (``prev_logits [B, H, T, N]``, no lengths): query t sees key j iff j <= N - T + t.
    Returns float64 out and logits shaped as the kernels' (``[B, H, D]`` / ``[B, H, N]`` for decode).
    """
    decode = inp["prev_logits"].dim() == 3
    prev_t, q_t = (inp[a][:, :, None] if decode else inp[a] for a in ("prev_logits", "q_r"))  # T axis for decode
    B, H, T, N = prev_t.shape
    prev, q = prev_t.double().tolist(), q_t.double().tolist()
    k, v = (inp[a].double().tolist() for a in ("k_r", "v"))
    w1, b1, w2, b2 = (inp[a].double().tolist() for a in ("w1", "b1", "w2", "b2"))
    G, r, D, F = inp["k_r"].shape[1], inp["q_r"].shape[-1], inp["v"].shape[-1], len(b1)
    g = H // G
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    logits = torch.zeros(B, H, T, N, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if decode:
                L = N if lengths is None else int(lengths[b])  # number of visible keys
            else:
                L = N - T + t + 1
            x = [prev[b][h][t][:] for h in range(H)]
            if share == "probs":
                for h in range(H):
                    mx = max(x[h][:L])
                    e = [math.exp(x[h][j] - mx) if j < L else 0.0 for j in range(N)]
                    x[h] = [ej / sum(e) for ej in e]
            for h in range(H):
                s = []
                for j in range(N):
                    a = b2[h] + sum(
                        w2[h][f] * max(b1[f] + sum(w1[f][hh] * x[hh][j] for hh in range(H)), 0.0)
                        for f in range(F)
                    )
                    delta = scale * sum(q[b][h][t][i] * k[b][h // g][j][i] for i in range(r))
                    s.append(math.log(max(a, 0.0) + 1e-6) + delta if share == "probs" else a + delta)
                    logits[b, h, t, j] = s[-1]
                mx = max(s[:L])
                e = [math.exp(s[j] - mx) for j in range(L)]
                for d in range(D):
                    out[b, h, t, d] = sum(e[j] * v[b][h // g][j][d] for j in range(L)) / sum(e)
    if decode:
        return out[:, :, 0], logits[:, :, 0]
    return out, logits


# Test modules get the helpers through fixtures (importing ``conftest`` by name is fragile when
# other test directories have a conftest.py of their own).
@pytest.fixture
def lisa_inputs():
    """Factory ``make_lisa_inputs(B, H, G, N, r, D, T=None, dtype=..., device=..., seed=...)``."""
    return make_lisa_inputs


@pytest.fixture
def naive():
    """``naive(inp, scale, share, lengths=None)``: LiSA decode / prefill by float64 Python loops."""
    return naive_lisa


@pytest.fixture
def close():
    """``close(actual, expected, tol, what)``: assert_close in fp32 with atol = rtol = tol."""
    return assert_close


@pytest.fixture
def close_visible():
    """``close_visible(actual, expected, valid, tol, what)``: logits compared on visible keys only."""
    return assert_close_visible


@pytest.fixture
def tol():
    """``tol(dtype, probs_logits=False)``: the tolerance used for that comparison."""

    def _tol(dtype: torch.dtype, probs_logits: bool = False) -> float:
        if probs_logits and dtype == torch.float32:
            return TOL_PROBS_LOGITS_FP32
        return TOL[dtype]

    return _tol
