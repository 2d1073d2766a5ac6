"""Every `cache_implementation` of the installed transformers, on LiSA models (PEFT and compact).

Each one either gives the tokens of the dynamic cache (greedy) or is refused before generating with an
error that names what works. Where the base model cannot run one here either (the offloaded caches need
CUDA), the test checks that the base fails and skips with its error. `OUTCOMES` must name every
implementation transformers offers, so a new one fails here until someone decides what LiSA does with it.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import DynamicCache
from transformers.cache_utils import QuantizedCache
from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS

from lisa_peft import LisaConfig
from lisa_peft.evaluation.memory import stored_cache_bytes
from lisa_peft.tuners.lisa.transformers_compat import cache_kwargs
from tests.helpers.tiny_models import tiny_llama

LAYERS = [2, 3, 5]
WORKS, NEEDS_CUDA, REFUSED = "works", "needs CUDA", "refused"
OUTCOMES = {
    "dynamic": WORKS,
    "dynamic_full": WORKS,  # transformers 5.0: a dynamic cache without sliding layers
    "static": WORKS,
    "sliding_window": WORKS,  # deprecated aliases of "static" (LLaMA has no sliding layers)
    "hybrid": WORKS,
    "hybrid_chunked": WORKS,
    "quantized": WORKS,
    "offloaded": NEEDS_CUDA,
    "offloaded_static": NEEDS_CUDA,
    "offloaded_hybrid": NEEDS_CUDA,
    "offloaded_hybrid_chunked": NEEDS_CUDA,
    "paged": REFUSED,  # continuous batching (generate_batch, transformers serve)
}
# Exact quantization (2 values per group): the test of the plumbing, whose tokens must equal the dynamic cache's.
LOSSLESS_QUANTO = {"backend": "quanto", "q_group_size": 2, "residual_length": 4}


def _lisa(compact: bool = False, **kwargs):
    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=LAYERS, **kwargs)).eval()
    with torch.no_grad():  # non-trivial LiSA weights: identity init would hide mix-ups
        generator = torch.Generator().manual_seed(3)
        for name, param in model.named_parameters():
            if "lisa_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.merge_and_unload() if compact else model


def _generate(model, input_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=input_ids, max_new_tokens=8, do_sample=False, **kwargs)


def _implementation_kwargs(name: str) -> dict:
    if name == "quantized":
        pytest.importorskip("optimum.quanto", reason="the quantized cache needs optimum-quanto (base model too)")
        return {"cache_implementation": name, "cache_config": LOSSLESS_QUANTO}
    return {"cache_implementation": name}


def test_every_cache_implementation_of_transformers_has_an_outcome():
    unknown = sorted(set(ALL_CACHE_IMPLEMENTATIONS) - set(OUTCOMES))
    assert not unknown, f"transformers offers cache implementations that LiSA was not checked with: {unknown}"


_INSTALLED = [name for name in OUTCOMES if name in ALL_CACHE_IMPLEMENTATIONS]


@pytest.mark.parametrize("compact", [False, True], ids=["peft", "compact"])
@pytest.mark.parametrize("name", [n for n in _INSTALLED if OUTCOMES[n] == WORKS])
def test_cache_implementation_gives_the_dynamic_tokens(name, compact, input_ids):
    kwargs = _implementation_kwargs(name)
    base = tiny_llama(2)
    assert torch.equal(_generate(base, input_ids, **kwargs), _generate(base, input_ids))  # the base runs it here
    model = _lisa(compact)
    assert torch.equal(_generate(model, input_ids, **kwargs), _generate(model, input_ids))


@pytest.mark.parametrize("compact", [False, True], ids=["peft", "compact"])
def test_static_cache_with_prefill_chunks_gives_the_dynamic_tokens(compact, input_ids):
    """transformers allocates a chunked-prefill static cache ahead at the base head size for every layer;
    LiSA layers' r-wide keys did not fit (bug: index_copy_ "must have same slice shapes")."""
    kwargs = {"cache_implementation": "static", "prefill_chunk_size": 4}
    base = tiny_llama(2)
    try:
        base_tokens = _generate(base, input_ids, **kwargs)
    except Exception as error:  # transformers 5.0's chunked static prefill overruns the cache (IndexError)
        pytest.skip(f"the base model cannot run it with this transformers either: {type(error).__name__}: {error}")
    assert torch.equal(base_tokens, _generate(base, input_ids))
    model = _lisa(compact)
    assert torch.equal(_generate(model, input_ids, **kwargs), _generate(model, input_ids))


@pytest.mark.parametrize("name", [n for n in _INSTALLED if OUTCOMES[n] == NEEDS_CUDA])
def test_offloaded_caches_give_the_dynamic_tokens_on_cuda(name, input_ids):
    base = tiny_llama(2)
    if not torch.cuda.is_available():
        with pytest.raises(Exception) as error:  # noqa: PT011  (whatever the base fails with)
            _generate(base, input_ids, cache_implementation=name)
        pytest.skip(f"cache_implementation={name!r} needs CUDA; the base model fails here too: {error.value!r}")
    base, ids = base.cuda(), input_ids.cuda()
    assert torch.equal(_generate(base, ids, cache_implementation=name), _generate(base, ids))
    for compact in (False, True):
        model = _lisa(compact).cuda()
        assert torch.equal(_generate(model, ids, cache_implementation=name), _generate(model, ids)), compact


# ---------------------------------------------------------------------------------------- continuous batching
@pytest.mark.parametrize("compact", [False, True], ids=["peft", "compact"])
def test_continuous_batching_is_refused_before_generating(compact, input_ids, monkeypatch):
    """Bug: generate(cache_implementation="paged") returned the prompt alone; the error was only logged."""
    from transformers.generation.continuous_batching import continuous_api

    def no_manager(*args, **kwargs):
        raise AssertionError("a continuous batching manager was created")

    model = _lisa(compact)
    target = model if compact else model.get_base_model()
    with monkeypatch.context() as patch:
        patch.setattr(continuous_api, "ContinuousBatchingManager", no_manager)
        for call in (
            lambda: _generate(model, input_ids, cache_implementation="paged"),
            lambda: target.generate_batch(input_ids.tolist(), max_new_tokens=4),
            lambda: model.generate_batch(input_ids.tolist(), max_new_tokens=4),
            lambda: target.init_continuous_batching(),
        ):
            with pytest.raises(ValueError, match=r"continuous batching.*'dynamic'.*'static'.*'quantized'"):
                call()


def test_continuous_batching_is_left_to_the_base_model_with_the_adapter_disabled(monkeypatch):
    from transformers.generation.continuous_batching import continuous_api

    class Manager:  # stands in for transformers' manager (which would start a generation thread)
        def __init__(self, model, **kwargs):
            self.model = model

    monkeypatch.setattr(continuous_api, "ContinuousBatchingManager", Manager)
    model = _lisa()
    target = model.get_base_model()
    with model.disable_adapter():
        assert target.init_continuous_batching().model is target
    with pytest.raises(ValueError, match="continuous batching"):
        target.init_continuous_batching()
    model.unload()
    assert "init_continuous_batching" not in vars(target)  # the guard goes with the adapter
    assert target.init_continuous_batching().model is target


# --------------------------------------------------------------------------------------------- quantized cache
def test_quanto_group_size_that_does_not_tile_low_rank_keys_is_refused(input_ids):
    """optimum-quanto's default q_group_size=64 does not divide G * r = 8 of the LiSA layers: it would fail on
    some sequence lengths only; refused on the first LiSA layer of the prefill, naming a size that works."""
    pytest.importorskip("optimum.quanto")
    model = _lisa()
    with pytest.raises(ValueError, match=r"layer 2 has q_group_size=64.*2 KV heads x r = 4 = 8.*'q_group_size': 8"):
        _generate(model, input_ids, cache_implementation="quantized")
    tokens = _generate(model, input_ids, cache_implementation="quantized", cache_config={"q_group_size": 8})
    assert tokens.shape == (2, 20)


def _teacher_forced_logits(model, tokens: torch.Tensor, cache, prompt: int) -> torch.Tensor:
    """Logits [B, T - prompt + 1, V] of the prompt's last position and of each later token fed one at a time."""
    with torch.no_grad():
        out = model(tokens[:, :prompt], use_cache=True, **cache_kwargs(cache))
        logits = [out.logits[:, -1:]]
        for t in range(prompt, tokens.shape[1]):
            logits.append(model(tokens[:, t : t + 1], use_cache=True, **cache_kwargs(cache)).logits)
    return torch.cat(logits, dim=1)


def test_int4_quantized_cache_stays_close_to_the_dynamic_cache(input_ids):
    """4-bit keys and values (groups of 8, 4 positions kept in full precision): LiSA's logits move as little
    from the dynamic cache's as the base model's do."""
    pytest.importorskip("optimum.quanto")
    drift = {}
    for name, model in (("base", tiny_llama(2)), ("lisa", _lisa())):
        config = getattr(model, "get_base_model", lambda m=model: m)().config
        tokens = _generate(model, input_ids)
        quantized = QuantizedCache(backend="quanto", config=config, nbits=4, q_group_size=8, residual_length=4)
        want = _teacher_forced_logits(model, tokens, DynamicCache(config=config), 12)
        got = _teacher_forced_logits(model, tokens, quantized, 12)
        assert any(layer._quantized_keys is not None for layer in quantized.layers)
        drift[name] = (got - want).abs().max().item()
    assert 0 < drift["lisa"] < 4 * drift["base"] + 1e-3, drift


def test_lisa_and_int4_cache_savings_multiply(input_ids):
    """Bytes held after a 96-token prompt: LiSA's smaller keys and quanto's int4 storage multiply."""
    pytest.importorskip("optimum.quanto")
    prompt = torch.randint(3, 96, (1, 96), generator=torch.Generator().manual_seed(1))
    held = {}
    for name, model in (("base", tiny_llama(2)), ("lisa", _lisa())):
        config = getattr(model, "get_base_model", lambda m=model: m)().config
        for kind in ("dynamic", "int4"):
            cache = DynamicCache(config=config) if kind == "dynamic" else QuantizedCache(
                backend="quanto", config=config, nbits=4, q_group_size=8, residual_length=128)
            with torch.no_grad():
                model(prompt, use_cache=True, **cache_kwargs(cache))
            held[name, kind] = stored_cache_bytes(cache)
            if name == "lisa" and kind == "int4":  # a LiSA layer's r = 4 keys are quantized as they are
                assert cache.layers[3]._quantized_keys.dequantize().shape == (1, 2, 96, 4)
    # fp32, per layer and position: keys 2 x 16 and values 2 x 16 (LiSA layers: keys 2 x 4) ...
    assert held["base", "dynamic"] == 6 * 96 * (32 + 32) * 4
    assert held["lisa", "dynamic"] == (3 * 96 * (32 + 32) + 3 * 96 * (8 + 32)) * 4
    # ... int4: 8 entries in 4 bytes plus an fp32 scale and shift per group of 8 = 12 bytes instead of 32
    assert held["base", "int4"] * 32 == held["base", "dynamic"] * 12
    assert held["lisa", "int4"] * 32 == held["lisa", "dynamic"] * 12
    assert held["lisa", "int4"] / held["base", "dynamic"] == pytest.approx(
        held["lisa", "dynamic"] / held["base", "dynamic"] * held["base", "int4"] / held["base", "dynamic"])
