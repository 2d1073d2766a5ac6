"""Compressed KV cache of LiSA layers: shapes, decode == full forward, generation, byte counts."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import DynamicCache, LlamaConfig

from lisa_peft import LisaConfig
from lisa_peft.evaluation.memory import kv_cache_bytes, model_kv_cache_bytes, stored_cache_bytes
from lisa_peft.tuners.lisa.transformers_compat import cache_kwargs, output_cache
from tests.helpers.tiny_models import tiny_llama


def _lisa_model(kv_heads: int, **kwargs):
    return get_peft_model(tiny_llama(kv_heads), LisaConfig(lisa_layers=[2, 3, 5], **kwargs)).eval()


def test_lisa_layers_cache_only_low_rank_keys(kv_heads, input_ids):
    model = _lisa_model(kv_heads)
    with torch.no_grad():
        cache = output_cache(model(input_ids, use_cache=True))
    assert isinstance(cache, DynamicCache)
    shapes = [(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in cache.layers]
    for idx, (keys, values) in enumerate(shapes):
        assert values == (2, kv_heads, 12, 16)
        assert keys == ((2, kv_heads, 12, 4) if idx in (2, 3, 5) else (2, kv_heads, 12, 16)), idx


@pytest.mark.parametrize("share", ["logits", "probs"])
def test_decode_steps_match_full_forward(kv_heads, input_ids, share):
    model = _lisa_model(kv_heads, share=share)
    with torch.no_grad():
        full = model(input_ids).logits
        out = model(input_ids[:, :6], use_cache=True)
        steps = [out.logits]
        cache = output_cache(out)
        for t in range(6, 12):  # one token at a time
            out = model(input_ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_greedy_generation_with_cache_equals_recomputation(kv_heads, input_ids):
    model = _lisa_model(kv_heads)
    with torch.no_grad():
        cached = model.generate(input_ids, max_new_tokens=10, do_sample=False, use_cache=True)
        recomputed = model.generate(input_ids, max_new_tokens=10, do_sample=False, use_cache=False)
    assert cached.shape == (2, 22)
    assert torch.equal(cached, recomputed)


def test_left_padded_batch_generates_like_single_sequences(kv_heads):
    model = _lisa_model(kv_heads)
    long = torch.tensor([[11, 12, 13, 14, 15, 16, 17]])
    short = torch.tensor([[21, 22, 23, 24]])
    batch = torch.tensor([[11, 12, 13, 14, 15, 16, 17], [0, 0, 0, 21, 22, 23, 24]])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
        alone_long = model.generate(long, max_new_tokens=6, do_sample=False)
        alone_short = model.generate(short, max_new_tokens=6, do_sample=False)
    assert torch.equal(together[0, 7:], alone_long[0, 7:])
    assert torch.equal(together[1, 7:], alone_short[0, 4:])


def test_kv_cache_bytes_formula():
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32)
    lisa = list(range(8, 28))  # 20 of 32 layers
    sizes = kv_cache_bytes(config, lisa, batch_size=1, seq_len=4096, dtype=torch.float16)
    per_layer_full = 2 * 32 * 128 * 4096 * 2  # K and V, fp16
    assert sizes.base == 32 * per_layer_full
    assert sizes.lisa == 12 * per_layer_full + 20 * 32 * 4096 * 2 * (22 + 128)
    keys = kv_cache_bytes(config, lisa, seq_len=4096, keys_only=True)
    assert keys.lisa / keys.base == pytest.approx((12 * 128 + 20 * 22) / (32 * 128))


def test_model_kv_cache_bytes_matches_a_real_cache(input_ids):
    model = _lisa_model(2)
    with torch.no_grad():
        cache = output_cache(model(input_ids, use_cache=True))
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    reported = model_kv_cache_bytes(model, batch_size=2, seq_len=12)
    assert reported.lisa == measured
    with model.disable_adapter(), torch.no_grad():
        base_cache = output_cache(model(input_ids, use_cache=True))
    assert reported.base == sum(layer.keys.nbytes + layer.values.nbytes for layer in base_cache.layers)


def test_half_precision_base_caches_lisa_keys_and_values_in_its_dtype(input_ids):
    """bf16 base with fp32 LiSA weights (PEFT's default): the real cache holds bf16 only, and its bytes are
    what model_kv_cache_bytes reports (bug: k_r was cached in fp32 and so was V, 1.125x the base's cache)."""
    model = get_peft_model(tiny_llama(2).to(torch.bfloat16), LisaConfig(lisa_layers=[2, 3, 5])).eval()
    assert {p.dtype for n, p in model.named_parameters() if "lisa_" in n} == {torch.float32}
    with torch.no_grad():
        cache = output_cache(model(input_ids, use_cache=True))
        with model.disable_adapter():
            base_cache = output_cache(model(input_ids, use_cache=True))
    dtypes = {t.dtype for layer in cache.layers for t in (layer.keys, layer.values)}
    assert dtypes == {t.dtype for layer in base_cache.layers for t in (layer.keys, layer.values)} == {torch.bfloat16}
    stored, base_stored = stored_cache_bytes(cache), stored_cache_bytes(base_cache)
    reported = model_kv_cache_bytes(model, batch_size=2, seq_len=12)
    assert (stored, base_stored) == (reported.lisa, reported.base)
    # per token and KV head: full layers K + V = 16 + 16, LiSA layers k_r + V = 4 + 16 (3 of 6 layers each)
    assert stored / base_stored == pytest.approx((3 * 32 + 3 * 20) / (6 * 32))


def test_half_precision_cached_decode_matches_full_forward(input_ids):
    """The low-rank keys are rounded to the cache dtype with or without a cache, so decoding step by
    step gives the full forward's logits up to bf16 summation order."""
    model = get_peft_model(tiny_llama(2).to(torch.bfloat16), LisaConfig(lisa_layers=[2, 3, 5])).eval()
    with torch.no_grad():
        full = model(input_ids).logits.float()
        out = model(input_ids[:, :6], use_cache=True)
        steps, cache = [out.logits], output_cache(out)
        for t in range(6, 12):
            out = model(input_ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1).float(), full, atol=3e-2, rtol=3e-2)
