"""benchmarks/adapter_budget.py: exact safetensors sizes and LiSA budgets on a meta-device model."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from benchmarks.adapter_budget import budget, safetensors_size


def test_safetensors_size_is_exact(tmp_path):
    tensors = {"b.weight": torch.zeros(3, 5), "a.bias": torch.zeros(7, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "x.safetensors")
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    assert safetensors_size(shapes) == (tmp_path / "x.safetensors").stat().st_size


def test_llama2_7b_budget_matches_hand_count():
    b = budget("LLaMA-2-7B", fraction=0.625)
    per_layer = (32 + 32) * 22 * 4096 + (64 * 32 + 64) + (32 * 64 + 32)  # Wq_r, Wk_r, FFN up, FFN down
    assert b["lisa_layers"] == "20/32" and b["trainable"] == 20 * per_layer
    assert b["k_cache_lisa"] / b["k_cache_base"] == (12 * 128 + 20 * 22) / (32 * 128)
