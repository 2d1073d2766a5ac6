"""Optional Triton import and the availability checks shared by every kernel module.

The package must stay importable without Triton (the PyTorch references are always usable),
so the kernel modules import ``triton`` / ``tl`` from here.  When Triton is missing, ``tl`` is a
stand-in whose ``constexpr`` makes the kernel signatures parse and ``triton.jit`` returns the
function unchanged; the public wrappers call :func:`require_triton` before any launch.
"""

from __future__ import annotations

import os
from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised in a subprocess test
    HAS_TRITON = False

    class _MissingTriton:
        """Stand-in for ``triton`` / ``triton.language`` when Triton is not installed."""

        class constexpr:  # mirrors ``tl.constexpr``
            def __init__(self, value: Any = None) -> None:
                self.value = value

        @staticmethod
        def jit(fn: Any = None, **_: Any) -> Any:
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 if n <= 1 else 1 << (n - 1).bit_length()

    triton = _MissingTriton()  # type: ignore[assignment]
    tl = _MissingTriton()  # type: ignore[assignment]

__all__ = ["HAS_TRITON", "interpreting", "require_triton", "tl", "triton", "triton_available"]

_FIX = (
    "install triton and run on an NVIDIA GPU, or set TRITON_INTERPRET=1 for the (slow) CPU "
    "interpreter, or use kernel='torch'"
)


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` (must be set before ``triton`` / these modules are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch is a hard dependency
        return False


def triton_available() -> bool:
    """True when Triton is importable and there is a CUDA device or ``TRITON_INTERPRET=1``."""
    return HAS_TRITON and (_cuda_available() or interpreting())


def require_triton() -> None:
    """Raise ``RuntimeError`` naming the fix when the Triton kernels cannot run here."""
    if not HAS_TRITON:
        raise RuntimeError(
            f"The LiSA Triton kernels need the `triton` package, which is not installed: {_FIX}."
        )
    if not (_cuda_available() or interpreting()):
        raise RuntimeError(
            f"The LiSA Triton kernels need a CUDA GPU (none is available) or TRITON_INTERPRET=1: {_FIX}."
        )


def is_interpreted(kernel: Any) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` function) was decorated under ``TRITON_INTERPRET=1``."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_launch(kernel: Any, **tensors: Any) -> None:
    """Raise ``RuntimeError`` unless ``kernel`` can be launched here on ``tensors``.

    Checks that Triton is usable (:func:`require_triton`), that Triton's own standard library
    (``tl.sum``, ``tl.zeros``...) and our kernels were decorated in the same mode (the interpreter
    is chosen when a function is decorated, so TRITON_INTERPRET=1 must be set before ``triton``
    -- which torch may import -- and this package are imported), and that compiled kernels get
    CUDA tensors.
    """
    require_triton()
    interpreted = is_interpreted(kernel)
    if interpreted != is_interpreted(tl.zeros):
        raise RuntimeError(
            "TRITON_INTERPRET was changed between importing triton and importing lisa_kernels "
            f"(triton's standard library is {'' if is_interpreted(tl.zeros) else 'not '}interpreted, "
            f"the lisa_kernels kernels are {'' if interpreted else 'not '}): set TRITON_INTERPRET=1 "
            "in the environment before anything imports triton or torch, or unset it on a GPU."
        )
    if interpreted:
        return
    for name, t in tensors.items():
        if t is not None and t.device.type != "cuda":
            raise RuntimeError(
                f"{name} is on device {t.device}; the compiled Triton kernels need CUDA tensors: {_FIX}."
            )


def pow2(n: int, floor: int = 16) -> int:
    """Next power of two >= n, at least ``floor`` (``tl.dot`` needs every dim >= 16 on GPU)."""
    p = 1
    while p < n:
        p *= 2
    return max(floor, p)


def row_blocks(group: int, T: int, block_t: int) -> tuple[int, int, int]:
    """Tile of query rows for the prefill / anchor kernels: (BLOCK_G, BLOCK_T, REP).

    A program owns the g query heads of one kv head times BLOCK_T queries; its rows are
    ``gi * BLOCK_T + t``.  BLOCK_G = next power of two >= g and BLOCK_G * BLOCK_T >= 16 so that the
    row dimension of every ``tl.dot`` is >= 16.  REP = max(1, 16 // BLOCK_G) is the padding factor
    used to give the head-FFN output layer a >= 16-row ``tl.dot`` when g is small.
    """
    block_g = pow2(group, floor=1)
    block_t = min(pow2(block_t, floor=1), pow2(T, floor=1))
    block_t = max(block_t, 16 // block_g if block_g < 16 else 1)
    return block_g, block_t, max(1, 16 // block_g)
