"""Static (pre-allocated) KV cache for LiSA models: same tokens and logits as the dynamic cache.

A `StaticLayer` takes its key width from the first update, so LiSA layers keep r-wide keys [B, G, max_len, r];
the slots not written yet are hidden by the mask (`transformers_compat.static_cache_mask` where transformers
passes none). PEFT and compact models, MHA and GQA, both share modes, left padding, step-by-step decoding.
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import get_peft_model
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from lisa_peft import LisaConfig
from lisa_peft.tuners.lisa.transformers_compat import cache_kwargs, output_cache, update_cache
from tests.helpers.tiny_models import tiny_llama

LAYERS = [2, 3, 5]


def _model(kv_heads: int, compact: bool = False, **kwargs):
    model = get_peft_model(tiny_llama(kv_heads), LisaConfig(lisa_layers=LAYERS, **kwargs)).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for name, param in model.named_parameters():
            if "lisa_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.merge_and_unload() if compact else model


@pytest.mark.parametrize("compact", [False, True], ids=["peft", "compact"])
@pytest.mark.parametrize("share", ["logits", "probs"])
def test_static_generate_gives_the_dynamic_tokens(kv_heads, input_ids, compact, share):
    model = _model(kv_heads, compact, share=share)
    batch = torch.tensor([[11, 12, 13, 14, 15, 16, 17], [0, 0, 0, 21, 22, 23, 24]])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        for kwargs in ({"input_ids": input_ids}, {"input_ids": batch, "attention_mask": mask}):
            dynamic = model.generate(**kwargs, max_new_tokens=8, do_sample=False)
            static = model.generate(**kwargs, max_new_tokens=8, do_sample=False, cache_implementation="static")
            assert torch.equal(static, dynamic)


@pytest.mark.parametrize("compact", [False, True], ids=["peft", "compact"])
def test_static_cache_steps_match_the_full_forward(kv_heads, input_ids, compact):
    model = _model(kv_heads, compact)
    config = model.config if compact else model.get_base_model().config
    cache = StaticCache(config=config, max_cache_len=20)
    with torch.no_grad():
        full = model(input_ids).logits
        out = model(input_ids[:, :6], use_cache=True, **cache_kwargs(cache))  # prefill without a mask
        steps = [out.logits]
        for t in range(6, 12):
            out = model(input_ids[:, t : t + 1], use_cache=True, **cache_kwargs(output_cache(out)))
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    for idx, layer in enumerate(cache.layers):  # LiSA layers keep only r = 4 key dims per KV head
        assert tuple(layer.keys.shape) == (2, kv_heads, 20, 4 if idx in LAYERS else 16), idx
        assert tuple(layer.values.shape) == (2, kv_heads, 20, 16)


def test_other_cache_layer_types_are_refused():
    cache = DynamicCache()
    cache.layers.append(DynamicSlidingWindowLayer(sliding_window=4))
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer.*DynamicCache.*StaticCache"):
        update_cache(cache, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 16), 0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs the kernels on CPU tensors under TRITON_INTERPRET=1")
def test_static_decode_runs_on_the_kernels_with_lengths(monkeypatch, input_ids):
    import lisa_kernels

    lengths_seen = []
    original = lisa_kernels.lisa_decode

    def spy(*args, **kwargs):
        lengths_seen.append(args[-1])
        return original(*args, **kwargs)

    monkeypatch.setattr(lisa_kernels, "lisa_decode", spy)
    model = _model(2, kernel="triton")
    with torch.no_grad():
        dynamic = model.generate(input_ids, max_new_tokens=4, do_sample=False)
        lengths_seen.clear()
        static = model.generate(input_ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)
    # the first decode step sees 13 filled slots of the pre-allocated cache, the rest masked as unwritten
    assert lengths_seen[0] is not None and lengths_seen[0].tolist() == [13, 13]


# ---------------------------------------------------------------------------------------------- torch.compile
def _compile_config():
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, backend="eager", mode=None, dynamic=False)  # fullgraph: a break raises
    config._compile_all_devices = True  # transformers compiles on GPUs only by default
    return config


@pytest.mark.parametrize("compact", [False, True], ids=["peft", "compact"])
def test_compiled_static_generate_gives_the_dynamic_tokens(input_ids, compact):
    """transformers' own route: static cache + compiled decode step (fullgraph=True: no graph break)."""
    model = _model(2, compact)
    target = model if compact else model.get_base_model()
    with torch.no_grad():
        dynamic = model.generate(input_ids, max_new_tokens=5, do_sample=False)
        static = model.generate(input_ids, max_new_tokens=5, do_sample=False, cache_implementation="static",
                                compile_config=_compile_config())
    assert hasattr(target, "_compiled_call")  # the decode steps ran compiled
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("kernel", ["auto", "torch", "triton"])
def test_compiled_decode_step_has_no_graph_break(monkeypatch, input_ids, kernel):
    """One decode step under torch.compile(fullgraph=True) equals the eager step; the kernels stay out of the graph."""
    import lisa_kernels

    if kernel == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("kernel='triton' on CPU tensors needs TRITON_INTERPRET=1")
    for name in ("anchor_attention", "lisa_prefill", "lisa_decode"):
        original = getattr(lisa_kernels, name)

        def no_kernel_while_compiling(*args, _original=original, **kwargs):
            assert not torch.compiler.is_compiling(), "a Triton kernel was traced by torch.compile"
            return _original(*args, **kwargs)

        monkeypatch.setattr(lisa_kernels, name, no_kernel_while_compiling)
    model = _model(2, compact=True, kernel=kernel)
    caches = [StaticCache(config=model.config, max_cache_len=16) for _ in range(2)]
    step_kwargs = dict(use_cache=True, position_ids=torch.full((2, 1), 12))
    with torch.no_grad():
        for cache in caches:
            out = model(input_ids, use_cache=True, **cache_kwargs(cache))
        token = out.logits[:, -1:].argmax(-1)
        eager = model(token, **cache_kwargs(caches[0]), **step_kwargs).logits
        compiled = torch.compile(model.__call__, backend="eager", fullgraph=True)
        got = compiled(input_ids=token, **cache_kwargs(caches[1]), **step_kwargs).logits
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-4)
