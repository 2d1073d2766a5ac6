"""GrowingLayer: LiSA and anchor layers append into spare room; same contents as transformers' DynamicLayer."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers.cache_utils import DynamicLayer

from lisa_peft import LisaConfig
from lisa_peft.evaluation.memory import stored_cache_bytes
from lisa_peft.tuners.lisa import growing_cache as GC
from lisa_peft.tuners.lisa.transformers_compat import cache_kwargs, output_cache
from tests.helpers.tiny_models import tiny_llama


def _pieces(lengths, batch=2, heads=3, key_dim=4, value_dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, heads, t, key_dim, generator=gen),
             torch.randn(batch, heads, t, value_dim, generator=gen)) for t in lengths]


def _pair(*ops):
    """A DynamicLayer and a GrowingLayer fed the same (update / method) operations; both layers."""
    plain, growing = DynamicLayer(), DynamicLayer()
    growing.__class__ = GC.GrowingLayer
    for op in ops:
        for layer in (plain, growing):
            op(layer)
    return plain, growing


def _append(k, v):
    return lambda layer: layer.update(k, v)


def _assert_same(plain, growing):
    torch.testing.assert_close(growing.keys, plain.keys, rtol=0, atol=0)
    torch.testing.assert_close(growing.values, plain.values, rtol=0, atol=0)
    assert growing.get_seq_length() == plain.get_seq_length()


def test_appends_equal_concatenation_and_reuse_the_buffer():
    pieces = _pieces([5, 1, 1, 1, 3, 1])
    plain, growing = _pair(*(_append(k, v) for k, v in pieces[:2]))
    _assert_same(plain, growing)
    buffer = growing.keys.untyped_storage().data_ptr()
    for k, v in pieces[2:]:  # within the spare room: written in place, no new buffer
        out_k, out_v = growing.update(k, v)
        plain.update(k, v)
        assert out_k is growing.keys and out_v is growing.values
        assert growing.keys.untyped_storage().data_ptr() == buffer
    _assert_same(plain, growing)


def test_first_write_is_exact_and_later_room_is_bounded():
    (k, v), (k1, v1) = _pieces([300, 1])
    _, growing = _pair(_append(k, v))
    assert growing.keys.untyped_storage().nbytes() == growing.keys.nbytes  # a prompt-only cache has no spare room
    growing.update(k1, v1)
    capacity = growing.keys.untyped_storage().nbytes() // (growing.keys.nbytes // 301)
    assert capacity == 301 + max(301 // 8, GC.MIN_SPARE_TOKENS)


def test_growth_past_the_room_copies_everything_held():
    pieces = _pieces([10] + [1] * (GC.MIN_SPARE_TOKENS + 5))
    plain, growing = _pair(*(_append(k, v) for k, v in pieces))
    _assert_same(plain, growing)
    assert growing.get_seq_length() == 10 + GC.MIN_SPARE_TOKENS + 5


@pytest.mark.parametrize(
    "method",
    [
        lambda layer: layer.crop(-3),
        lambda layer: layer.reorder_cache(torch.tensor([1, 0])),
        lambda layer: layer.batch_select_indices(torch.tensor([1])),
        lambda layer: layer.batch_repeat_interleave(2),
    ],
    ids=["crop", "reorder_cache", "batch_select_indices", "batch_repeat_interleave"],
)
def test_dynamic_layer_methods_then_appends_equal_dynamic_layer(method):
    (k0, v0), (k1, v1) = _pieces([6, 1])
    plain, growing = _pair(_append(k0, v0), _append(k1, v1), method)
    _assert_same(plain, growing)
    batch = plain.keys.shape[0]
    for k, v in _pieces([1, 2, 1], batch=batch, seed=1):
        plain.update(k, v)
        growing.update(k, v)
        _assert_same(plain, growing)


def test_reset_drops_the_buffers_and_starts_again():
    (k0, v0), (k1, v1) = _pieces([4, 2])
    plain, growing = _pair(_append(k0, v0), _append(k1, v1), lambda layer: layer.reset(), _append(k1, v1))
    _assert_same(plain, growing)


def test_appending_another_batch_size_names_the_problem():
    (k0, v0), = _pieces([4])
    (k1, v1), = _pieces([1], batch=3)
    _, growing = _pair(_append(k0, v0))
    with pytest.raises(ValueError, match="batch size, heads and head size must match"):
        growing.update(k1, v1)


def _lisa_model(kv_heads):
    return get_peft_model(tiny_llama(kv_heads), LisaConfig(lisa_layers=[2, 3, 5])).eval()


def test_only_lisa_and_anchor_layers_grow_and_decode_equals_full_forward(kv_heads, input_ids):
    model = _lisa_model(kv_heads)  # anchors 1 and 4, LiSA 2, 3, 5
    with torch.no_grad():
        full = model(input_ids).logits
        out = model(input_ids[:, :4], use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        for t in range(4, input_ids.shape[1]):
            out = model(input_ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [DynamicLayer, GC.GrowingLayer, GC.GrowingLayer, GC.GrowingLayer, GC.GrowingLayer, GC.GrowingLayer]
    assert stored_cache_bytes(cache) > sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@pytest.mark.parametrize("generate_kwargs", [{"num_beams": 4, "num_return_sequences": 4},
                                             {"num_return_sequences": 2, "do_sample": True}],
                         ids=["beam_search", "sampling_repeats"])
def test_generate_gives_the_tokens_of_transformers_own_cache_layer(monkeypatch, input_ids, generate_kwargs):
    model = _lisa_model(2)

    def run():
        torch.manual_seed(0)
        with torch.no_grad():
            return model.generate(input_ids, max_new_tokens=16, min_new_tokens=16, **generate_kwargs)

    growing = run()
    monkeypatch.setattr("lisa_peft.tuners.lisa.transformers_compat.grow_in_place", lambda cache, layer_idx: None)
    assert torch.equal(growing, run())
