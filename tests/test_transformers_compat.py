"""The transformers boundary: the KV cache reaches LiSA layers on every entry point, and a cache that
does not arrive is an error, never silently wrong generation (the transformers 5.24 regression)."""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version
from peft import get_peft_model

from lisa_peft import LisaConfig
from lisa_peft.evaluation.generation_check import CachedGenerationMismatch, verify_cached_generation
from lisa_peft.tuners.lisa import transformers_compat as compat
from lisa_peft.tuners.lisa.layer import LisaAttention
from tests.helpers.tiny_models import tiny_llama


def _lisa_model(kv_heads: int, r: int | None = None):
    return get_peft_model(tiny_llama(kv_heads), LisaConfig(lisa_layers=[2, 3, 5], r=r)).eval()


def _strip_cache_from_lisa_layers(model, also_use_cache: bool) -> list:
    """Simulate a transformers release that passes the cache to attention under a name LiSA does not know
    (what 5.24 did): LiSA and anchor layers see no cache."""

    def hook(module, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        if also_use_cache:
            kwargs.pop("use_cache", None)
        return args, kwargs

    return [
        m.register_forward_pre_hook(hook, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, LisaAttention)
    ]


def test_cache_kwarg_is_the_one_llama_attention_takes():
    import inspect

    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

    for forward in (LlamaAttention.forward, LlamaDecoderLayer.forward):
        assert compat.CACHE_KWARG in inspect.signature(forward).parameters


def test_lisa_layer_refuses_use_cache_without_a_cache(input_ids):
    model = _lisa_model(2)
    handles = _strip_cache_from_lisa_layers(model, also_use_cache=False)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="use_cache=True but received no KV cache"):
            model(input_ids, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()


def test_verify_cached_generation_catches_a_cache_that_never_arrives(input_ids):
    model = _lisa_model(2)
    check = verify_cached_generation(model, input_ids, max_new_tokens=6)
    assert check.tie_flip_step is None and check.steps_compared == 6
    assert check.max_logit_diff_cached_vs_full < 1e-4
    handles = _strip_cache_from_lisa_layers(model, also_use_cache=True)  # LiSA layers decode without their keys
    try:
        with pytest.raises(CachedGenerationMismatch, match="KV-cache path of this model is broken"):
            verify_cached_generation(model, input_ids, max_new_tokens=6)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("r", [None, 16])
def test_continuing_generation_from_a_returned_cache(kv_heads, input_ids, r):
    model = _lisa_model(kv_heads, r)
    with torch.no_grad():
        fresh = model.generate(input_ids, max_new_tokens=6, do_sample=False)
        cache = compat.output_cache(model(input_ids[:, :-1], use_cache=True))  # all but the last prompt token
        continued = model.generate(input_ids, max_new_tokens=6, do_sample=False, **compat.cache_kwargs(cache))
    assert torch.equal(continued, fresh)


def test_beam_search_with_cache_equals_without(kv_heads, input_ids):
    model = _lisa_model(kv_heads)
    with torch.no_grad():
        cached = model.generate(input_ids, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=True)
        uncached = model.generate(input_ids, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_left_padded_batch_passes_the_generation_check(kv_heads):
    model = _lisa_model(kv_heads)
    ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17], [0, 0, 0, 21, 22, 23, 24]])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    check = verify_cached_generation(model, ids, attention_mask=mask, max_new_tokens=6)
    assert check.steps_compared + (check.tie_flip_step is not None) >= 1
    assert check.max_logit_diff_cached_vs_uncached < 1e-4


@pytest.mark.parametrize("version, ok", [("5.24.0", True), ("5.24.3", True), ("5.0.0", True), ("4.57.0", False),
                                         ("5.99.0", False), ("6.0.0", False)])
def test_version_outside_the_tested_range_warns(version, ok, monkeypatch):
    monkeypatch.setattr(compat, "TESTED_TRANSFORMERS_MIN", "5.0.0")
    monkeypatch.setattr(compat, "TESTED_TRANSFORMERS_MAX", "5.24.0")
    if ok:
        assert compat.check_transformers_version(Version(version))
    else:
        with pytest.warns(UserWarning, match="tested with transformers 5.0.0 to 5.24.0"):
            assert not compat.check_transformers_version(Version(version))


def test_installed_transformers_is_in_the_tested_range():
    """CI runs on the locked and the newest releases; both must be inside the declared range."""
    assert compat.check_transformers_version(), compat.TRANSFORMERS_VERSION


def test_output_cache_reads_either_name():
    assert compat.output_cache({"cache": 1}) == 1
    assert compat.output_cache({"past_key_values": 2}) == 2
    assert compat.output_cache({}) is None
