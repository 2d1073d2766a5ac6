"""Inference computes LiSA layers a few query rows at a time (`functional.lisa_attention_rows`): the model's
outputs, attentions and cache equal those of the one-pass computation that training uses."""

from __future__ import annotations

import inspect

import pytest
import torch
from peft import get_peft_model

from lisa_peft import LisaConfig
from lisa_peft.tuners.lisa import functional as LF
from lisa_peft.tuners.lisa.transformers_compat import output_cache
from tests.helpers.tiny_models import VOCAB, tiny_llama


def _spy_on_tiles(monkeypatch) -> list[tuple[str, dict]]:
    """Record (function name, bound arguments) of every call of the two row-tiled attention functions."""
    calls = []
    for name in ("lisa_attention_rows", "full_attention_rows"):
        original = getattr(LF, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            bound = inspect.signature(_original).bind(*args, **kwargs)
            bound.apply_defaults()
            calls.append((_name, bound.arguments))
            return _original(*args, **kwargs)

        monkeypatch.setattr(LF, name, counted)
    return calls


def _model(kv_heads: int, share: str):
    base = tiny_llama(kv_heads, attn_implementation="eager")  # output_attentions records probabilities (eager)
    model = get_peft_model(base, LisaConfig(lisa_layers=[2, 3, 5], share=share)).eval()
    gen = torch.Generator().manual_seed(5)
    for name, param in model.named_parameters():  # a non-trivial FFN and delta (identity init hides row mix-ups)
        if "lisa_" in name:
            param.data.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model


@pytest.mark.parametrize("share", ["logits", "probs"])
def test_row_tiles_equal_the_one_pass_forward(kv_heads, share, monkeypatch):
    model = _model(kv_heads, share)
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    kwargs = dict(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=True)
    with torch.enable_grad():  # the one-pass path (what training runs)
        want = model(**kwargs)
    tiles = _spy_on_tiles(monkeypatch)
    monkeypatch.setattr(LF, "TILE_HIDDEN_BYTES", 1)  # one query row per tile
    with torch.no_grad():
        got = model(**kwargs)
    assert {name for name, _ in tiles} == {"lisa_attention_rows", "full_attention_rows"}  # LiSA layers, anchors
    assert {args["rows"] for _, args in tiles} == {1}
    assert all(args["need_probs"] for _, args in tiles)  # output_attentions hooks read them
    torch.testing.assert_close(got.logits, want.logits.detach(), atol=1e-5, rtol=1e-4)
    assert len(got.attentions) == len(want.attentions) == 6
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b.detach(), atol=1e-5, rtol=1e-4)
    for layer, ref in zip(output_cache(got).layers, output_cache(want).layers):
        torch.testing.assert_close(layer.keys, ref.keys.detach(), atol=1e-5, rtol=1e-4)


def test_inference_keeps_no_probabilities_that_nothing_reads(monkeypatch):
    model = _model(2, "logits")
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.enable_grad():
        want = model(input_ids=ids).logits.detach()
    tiles = _spy_on_tiles(monkeypatch)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert tiles and not any(args["need_probs"] for _, args in tiles)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    seen = []
    attn = model.get_base_model().model.layers[3].self_attn  # a LiSA layer
    handle = attn.base_layer.register_forward_hook(lambda module, args, output: seen.append(output[1]))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    assert seen and seen[0] is not None and seen[0].shape == (1, 4, 9, 9)  # a hook reads them: kept
