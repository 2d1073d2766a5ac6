"""Every `cache_implementation` of the installed transformers, on LiSA models (PEFT and compact).

Each one either gives the tokens of the dynamic cache (greedy) or is refused before generating with an
error that names what works.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from lisa_peft import LisaConfig
from tests.conftest import tiny_llama

LAYERS = [2, 3, 5]


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
            with pytest.raises(ValueError, match=r"continuous batching.*'dynamic'.*'static'"):
                call()


def test_continuous_batching_runs_the_base_model_with_the_adapter_disabled(input_ids):
    base_tokens = tiny_llama(2).generate_batch(input_ids.tolist(), max_new_tokens=4)
    model = _lisa()
    with model.disable_adapter():
        tokens = model.get_base_model().generate_batch(input_ids.tolist(), max_new_tokens=4)
    assert [t.generated_tokens for t in tokens.values()] == [t.generated_tokens for t in base_tokens.values()]
    model.unload()
    assert "init_continuous_batching" not in vars(model.get_base_model())  # the guard goes with the adapter
