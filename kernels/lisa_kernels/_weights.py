"""The weights of one LiSA layer that the kernels, the references and the checks take as one argument."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LisaWeights(NamedTuple):
    """Head-alignment FFN of a LiSA layer, ``A = w2 relu(w1 x + b1) + b2`` along the H heads of ``x``.

    w1 [F, H], b1 [F], w2 [H, F], b2 [H] (any floating dtype; the kernels compute in fp32).
    """

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    @classmethod
    def from_linears(cls, up: torch.nn.Linear, down: torch.nn.Linear) -> LisaWeights:
        """From the FFN's ``up`` (H -> F) and ``down`` (F -> H) linear layers, both with a bias."""
        return cls(up.weight, up.bias, down.weight, down.bias)

    def contiguous(self) -> LisaWeights:
        """The same weights, each made contiguous (the kernels index them as dense row-major)."""
        return LisaWeights(*(t.contiguous() for t in self))
