"""Input validation shared by the LiSA kernels and their PyTorch references.

Every check raises ``ValueError`` naming the bad argument, its shape and the expected shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lisa_kernels._weights import LisaWeights

SHARE_MODES = ("logits", "probs")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LisaDims:
    """Sizes of one LiSA call: batch B, heads H, kv heads G, queries T, keys N, rank r, head dim D, FFN F."""

    B: int
    H: int
    G: int
    T: int
    N: int
    r: int
    D: int
    F: int

    @property
    def group(self) -> int:
        """Query heads per kv head, g = H // G."""
        return self.H // self.G


def _tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _shape(name: str, x: torch.Tensor, expected: tuple[int | None, ...], names: str) -> None:
    """Check ``x.shape`` against ``expected`` (None = any size); ``names`` spells the dims, e.g. 'B, H, N'."""
    ok = x.dim() == len(expected) and all(e is None or s == e for s, e in zip(x.shape, expected))
    if not ok:
        exp = ", ".join("?" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected [{names}] = ({exp})")


def _float(name: str, x: torch.Tensor) -> None:
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"{name} must be a floating point tensor, got dtype {x.dtype} (shape {tuple(x.shape)})"
        )


def _bad_v_dtype(v: torch.Tensor) -> None:
    raise ValueError(f"v must be float32, float16 or bfloat16, got dtype {v.dtype} (shape {tuple(v.shape)})")


def check_share(share: object) -> str:
    if share not in SHARE_MODES:
        raise ValueError(f"share must be one of {SHARE_MODES}, got {share!r}")
    return str(share)


def check_scale(scale: object) -> float:
    try:
        return float(scale)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a real number, got {scale!r}") from None


def check_lengths(lengths: torch.Tensor | None, B: int) -> None:
    if lengths is None:
        return
    lengths = _tensor("lengths", lengths)
    _shape("lengths", lengths, (B,), "B")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor of shape ({B},), got dtype {lengths.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_weights(weights: object) -> LisaWeights:
    """``weights`` is a :class:`LisaWeights` of four tensors (their shapes are checked with the inputs)."""
    if not isinstance(weights, LisaWeights):
        raise ValueError(
            f"weights must be lisa_kernels.LisaWeights(w1, b1, w2, b2) (the head FFN), got {type(weights).__name__}: "
            "pass LisaWeights(w1, b1, w2, b2) where the four tensors were passed separately"
        )
    for name, x in weights._asdict().items():
        _tensor(name, x)
    return weights


def check_lisa_inputs(
    prev_logits: torch.Tensor,
    q_r: torch.Tensor,
    k_r: torch.Tensor,
    v: torch.Tensor,
    weights: LisaWeights,
    share: str,
    lengths: torch.Tensor | None = None,
    *,
    prefill: bool,
) -> LisaDims:
    """Validate a LiSA decode (``prefill=False``) or prefill call and return its sizes."""
    prev_logits = _tensor("prev_logits", prev_logits)
    for name, x in (("q_r", q_r), ("k_r", k_r), ("v", v)):
        _tensor(name, x)
    w1, b1, w2, b2 = check_weights(weights)
    check_share(share)
    if prefill:
        if prev_logits.dim() != 4:
            raise ValueError(
                f"prev_logits has shape {tuple(prev_logits.shape)}, expected [B, H, T, N] (4 dims)"
            )
        B, H, T, N = prev_logits.shape
    else:
        if prev_logits.dim() != 3:
            raise ValueError(f"prev_logits has shape {tuple(prev_logits.shape)}, expected [B, H, N] (3 dims)")
        B, H, N = prev_logits.shape
        T = 1
    if q_r.dim() != (4 if prefill else 3):
        names = "B, H, T, r" if prefill else "B, H, r"
        ndim = len(names.split(","))
        raise ValueError(f"q_r has shape {tuple(q_r.shape)}, expected [{names}] ({ndim} dims)")
    r = int(q_r.shape[-1])
    if prefill:
        _shape("q_r", q_r, (B, H, T, r), "B, H, T, r")
    else:
        _shape("q_r", q_r, (B, H, r), "B, H, r")
    if r <= 0 or r % 2:
        raise ValueError(f"q_r has shape {tuple(q_r.shape)}: the low rank r={r} must be even and positive")
    if k_r.dim() != 4:
        raise ValueError(f"k_r has shape {tuple(k_r.shape)}, expected [B, G, N, r] = ({B}, ?, {N}, {r})")
    G = int(k_r.shape[1])
    _shape("k_r", k_r, (B, G, N, r), "B, G, N, r")
    if G == 0 or H % G:
        raise ValueError(
            f"k_r has shape {tuple(k_r.shape)}: the number of query heads H={H} (from prev_logits) "
            f"must be divisible by the number of kv heads G={G}"
        )
    if v.dim() != 4:
        raise ValueError(f"v has shape {tuple(v.shape)}, expected [B, G, N, D] = ({B}, {G}, {N}, ?)")
    D = int(v.shape[-1])
    _shape("v", v, (B, G, N, D), "B, G, N, D")
    if D == 0:
        raise ValueError(f"v has shape {tuple(v.shape)}: head dim D must be positive")
    if w1.dim() != 2:
        raise ValueError(f"w1 has shape {tuple(w1.shape)}, expected [F, H] = (?, {H})")
    F = int(w1.shape[0])
    _shape("w1", w1, (F, H), "F, H")
    _shape("b1", b1, (F,), "F")
    _shape("w2", w2, (H, F), "H, F")
    _shape("b2", b2, (H,), "H")
    if prefill and T > N:
        raise ValueError(
            f"prev_logits has shape {tuple(prev_logits.shape)}: T={T} queries cannot exceed N={N} keys "
            "(the queries sit at the last T key positions)"
        )
    if N == 0 or B == 0 or H == 0:
        raise ValueError(f"prev_logits has shape {tuple(prev_logits.shape)}: B, H and N must be positive")
    for name, x in (("prev_logits", prev_logits), ("q_r", q_r), ("k_r", k_r), ("w1", w1), ("b1", b1),
                    ("w2", w2), ("b2", b2)):
        _float(name, x)
    if v.dtype not in FLOAT_DTYPES:
        _bad_v_dtype(v)
    check_lengths(lengths, B)
    check_same_device(prev_logits=prev_logits, q_r=q_r, k_r=k_r, v=v, **weights._asdict(), lengths=lengths)
    return LisaDims(B=B, H=H, G=G, T=T, N=N, r=r, D=D, F=F)


def check_anchor_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None,
    causal_offset: int | None,
) -> LisaDims:
    """Validate an anchor (full attention) call and return its sizes (r and F are 0)."""
    q, k, v = _tensor("q", q), _tensor("k", k), _tensor("v", v)
    if q.dim() != 4:
        raise ValueError(f"q has shape {tuple(q.shape)}, expected [B, H, T, D] (4 dims)")
    B, H, T, D = q.shape
    if k.dim() != 4:
        raise ValueError(f"k has shape {tuple(k.shape)}, expected [B, G, N, D] = ({B}, ?, ?, {D})")
    G, N = int(k.shape[1]), int(k.shape[2])
    _shape("k", k, (B, G, N, D), "B, G, N, D")
    if G == 0 or H % G:
        raise ValueError(
            f"k has shape {tuple(k.shape)}: the number of query heads H={H} (from q) must be divisible by "
            f"the number of kv heads G={G}"
        )
    _shape("v", v, (B, G, N, D), "B, G, N, D")
    if min(B, H, T, D, N) == 0:
        raise ValueError(f"q has shape {tuple(q.shape)} and k {tuple(k.shape)}: all sizes must be positive")
    _float("q", q)
    _float("k", k)
    if v.dtype not in FLOAT_DTYPES:
        _bad_v_dtype(v)
    if causal_offset is None and T > N:
        raise ValueError(
            f"q has shape {tuple(q.shape)}: T={T} queries cannot exceed N={N} keys when causal_offset "
            "is None (the queries sit at the last T key positions)"
        )
    if causal_offset is not None and (isinstance(causal_offset, bool) or not isinstance(causal_offset, int)):
        raise ValueError(f"causal_offset must be an int or None, got {causal_offset!r}")
    check_lengths(lengths, B)
    check_same_device(q=q, k=k, v=v, lengths=lengths)
    return LisaDims(B=B, H=H, G=G, T=T, N=N, r=0, D=D, F=0)
