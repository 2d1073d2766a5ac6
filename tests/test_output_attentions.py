"""`output_attentions=True` on LiSA models: the base model's structure, entry i = layer i.

Under eager attention every layer returns its probabilities: one entry per layer, in layer order, LiSA
and anchor layers with their own. Under sdpa the base layers return none and transformers records
nothing (it warns); LiSA models record nothing either (bug: the LiSA and anchor layers' probabilities
were recorded alone, so entry i was not layer i). Checked on the PEFT and the compact form.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from peft import get_peft_model

from lisa_peft import LisaConfig
from lisa_peft.tuners.lisa.model import backbone
from tests.helpers.tiny_models import tiny_llama

LAYERS = [2, 3, 5]  # anchors 1 and 4; layer 0 is a plain base layer


def _lisa(attn_implementation: str, compact: bool):
    model = get_peft_model(tiny_llama(2, attn_implementation=attn_implementation), LisaConfig(lisa_layers=LAYERS))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for name, param in model.named_parameters():
            if "lisa_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval().merge_and_unload() if compact else model.eval()


def _attentions(model, input_ids) -> tuple | None:
    with torch.no_grad():
        return model(input_ids, output_attentions=True).attentions


def _layer_outputs(model, input_ids) -> list[torch.Tensor | None]:
    """What each decoder layer's `self_attn` returned as probabilities in an `output_attentions=True` call."""
    seen: dict[int, torch.Tensor | None] = {}
    layers = backbone(model).layers
    handles = [
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[1]))
        for i, layer in enumerate(layers)
    ]
    try:
        _attentions(model, input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return [seen[i] for i in range(len(layers))]


def _structure(attentions: tuple | None) -> int | None:
    return None if attentions is None else len(attentions)


@pytest.mark.parametrize("compact", [False, True], ids=["peft", "compact"])
def test_eager_attentions_are_one_per_layer_in_layer_order(compact, input_ids):
    model = _lisa("eager", compact)
    base = _attentions(tiny_llama(2, attn_implementation="eager"), input_ids)
    attentions = _attentions(model, input_ids)
    assert len(attentions) == len(base) == 6
    for i, (probs, layer_probs) in enumerate(zip(attentions, _layer_outputs(model, input_ids))):
        torch.testing.assert_close(probs, layer_probs, msg=f"entry {i} is not layer {i}")
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 12))
    torch.testing.assert_close(attentions[0], base[0])  # a plain layer, same weights
    torch.testing.assert_close(attentions[1], base[1], atol=1e-6, rtol=1e-5)  # an anchor computes the base attention
    for i in LAYERS:  # LiSA layers have their own scores
        assert not torch.allclose(attentions[i], base[i], atol=1e-3), i


@pytest.mark.parametrize("compact", [False, True], ids=["peft", "compact"])
def test_sdpa_attentions_have_the_base_models_structure(compact, input_ids):
    """sdpa returns no probabilities: transformers records none for the base model, nor for LiSA models."""
    base = _attentions(tiny_llama(2, attn_implementation="sdpa"), input_ids)
    assert not base  # () or None, depending on the transformers release
    assert _structure(_attentions(_lisa("sdpa", compact), input_ids)) == _structure(base)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_disabled_adapter_gives_the_base_models_attentions(attn_implementation, input_ids):
    model = _lisa(attn_implementation, compact=False)
    base = _attentions(tiny_llama(2, attn_implementation=attn_implementation), input_ids)
    with model.disable_adapter():
        attentions = _attentions(model, input_ids)
    assert _structure(attentions) == _structure(base)
    for probs, base_probs in zip(attentions or (), base or ()):
        torch.testing.assert_close(probs, base_probs)
    assert _structure(_attentions(model, input_ids)) == _structure(base)  # and with the adapter again


def test_a_users_hook_still_gets_lisa_probabilities_under_sdpa(input_ids):
    """Only transformers' recording follows the base layers; a tool's own hook on a LiSA layer reads its
    probabilities whatever the attention implementation."""
    model = _lisa("sdpa", compact=False)
    probs = _layer_outputs(model, input_ids)
    assert probs[0] is None  # sdpa
    assert all(p is not None and p.shape == (2, 4, 12, 12) for p in probs[1:])


def test_probabilities_are_kept_only_while_a_call_records_them(input_ids, monkeypatch):
    """Eager: transformers' recording hooks stay installed after an output_attentions=True call; later calls
    must not keep probabilities for them (the row-tiled paths' `need_probs`)."""
    from lisa_peft.tuners.lisa import functional as LF

    need = []
    for name in ("lisa_attention_rows", "full_attention_rows"):
        original = getattr(LF, name)

        def spy(*args, _original=original, **kwargs):
            bound = inspect.signature(_original).bind(*args, **kwargs)
            bound.apply_defaults()
            need.append(bound.arguments["need_probs"])
            return _original(*args, **kwargs)

        monkeypatch.setattr(LF, name, spy)
    model = _lisa("eager", compact=False)
    assert len(_attentions(model, input_ids)) == 6
    assert need and all(need)  # LiSA and anchor layers keep them for the recording
    need.clear()
    with torch.no_grad():
        model(input_ids)
    assert need and not any(need)
