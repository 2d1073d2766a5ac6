"""benchmarks/costs.py formulas against a hand-computed case (nothing is timed)."""

from __future__ import annotations

from benchmarks.analytic_costs import kernel_table, table
from benchmarks.costs import (
    LLAMA2_7B,
    LLAMA3_8B,
    ModelShape,
    full_attention_cost,
    lisa_cost,
    lisa_decode_kernel_flops,
    low_rank,
)


def test_low_rank_and_ffn_width():
    assert low_rank(128) == 22  # 128 / 6 = 21.3 -> 22 (even)
    assert low_rank(64) == 12  # 10.7 -> 11 -> 12
    assert low_rank(6) == 2  # 1 -> 2
    assert LLAMA2_7B.r == 22 and LLAMA2_7B.F == 64


def test_hand_computed_tiny_model():
    # d = 12, H = 2, G = 1, D = 6 -> r = 2, F = 4; context N = 10; 2-byte elements.
    m = ModelShape("tiny", d=12, H=2, G=1, D=6, layers=1)
    full = full_attention_cost(m, 10)
    # q 12x12 + k 12x6 + v 12x6 + o 12x12 = 432 params -> 864 FLOPs, 864 bytes
    assert full.proj_flops == 864 and full.weight_bytes == 864
    # QK 2*2*10*6 = 240, PV 240
    assert full.attn_flops == 480
    # K + V: 2 * 1 * 10 * 6 elements * 2 bytes
    assert full.cache_bytes == 240 and full.logit_bytes == 0
    assert full.flops == 1344 and full.bytes_read == 1104

    lisa = lisa_cost(m, 10)
    # q_r 12x4 = 48, k_r 12x2 = 24, v 12x6 = 72, o 12x12 = 144 -> 288 params -> 576 FLOPs
    assert lisa.proj_flops == 576
    # QK 2*2*10*2 = 80, PV 240, FFN 2*10*(4*2 + 2*4) = 320
    assert lisa.attn_flops == 640
    # (288 + FFN params 8 + 4 + 8 + 2 = 22) * 2 bytes
    assert lisa.weight_bytes == 620
    # k_r 1*10*2 + V 1*10*6 = 80 elements; previous logits 2*10 elements
    assert lisa.cache_bytes == 160 and lisa.logit_bytes == 40
    assert lisa.bytes_read == 820


def test_gqa_cache_is_smaller_and_table_renders():
    assert full_attention_cost(LLAMA3_8B, 4096).cache_bytes * 4 == full_attention_cost(LLAMA2_7B, 4096).cache_bytes
    text = table((LLAMA2_7B,), [1024])
    lines = text.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| LLaMA-2-7B | 1024 | full |")
    assert "| LLaMA-2-7B | 1024 | LiSA | 22 | 64 |" in lines[3]


def test_decode_kernel_flops_count_the_ffn_once_and_the_padding():
    # tiny: H = 2, G = 1 (g = 2), F = 4, r = 2, D = 6: dot dims pad to 16; N = 10 -> one tile of 64 keys.
    m = ModelShape("tiny", d=12, H=2, G=1, D=6, layers=1)
    assert lisa_decode_kernel_flops(m, 10) == 64 * (2 * (2 * 16 * 16 + 16 * 2) + 1 * 2 * 16 * 16)
    # LLaMA-2-7B (MHA, G = 32, r = 22, F = 64): the FFN once per key, P.V with 16 padded rows per kv head.
    per_key = 2 * (2 * 64 * 32 + 32 * 22) + 32 * 2 * 16 * 128
    assert lisa_decode_kernel_flops(LLAMA2_7B, 4096) == 4096 * per_key
    ratio = lisa_decode_kernel_flops(LLAMA2_7B, 4096) / lisa_cost(LLAMA2_7B, 4096).attn_flops
    assert 7 < ratio < 8.5  # was about 20x while every kv-head program recomputed the FFN
    assert "| LLaMA-2-7B | 4096 |" in kernel_table((LLAMA2_7B,), [4096])
