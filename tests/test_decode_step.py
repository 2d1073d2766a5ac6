"""The lean decode step (`tuners/lisa/decode_step.py`): the general path's numbers, taken only where it applies."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from lisa_peft import LisaConfig
from lisa_peft.tuners.lisa import decode_step
from lisa_peft.tuners.lisa.transformers_compat import cache_kwargs, output_cache
from tests.helpers.tiny_models import tiny_llama


def _model(kv_heads: int, dtype: torch.dtype = torch.float32, **kwargs):
    base = tiny_llama(kv_heads).to(dtype)
    config = LisaConfig(lisa_layers=[2, 3, 5], r=8, init_lisa_weights="random", **kwargs)
    return get_peft_model(base, config).eval()


def _decode(model, ids: torch.Tensor, prompt: int = 6):
    """Logits of a `prompt`-token prefill and then one token at a time, and the final cache."""
    with torch.no_grad():
        out = model(ids[:, :prompt], use_cache=True)
        steps, cache = [out.logits], output_cache(out)
        for t in range(prompt, ids.shape[1]):
            out = model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True)
            steps.append(out.logits)
    return torch.cat(steps, dim=1), cache


@pytest.fixture
def step_calls(monkeypatch):
    """Counts of the lean step per layer role; `calls["off"] = True` sends every call to the general path."""
    calls = {"anchor": 0, "lisa": 0, "off": False}
    applies = decode_step.applies

    def spy(*args, **kwargs):
        return not calls["off"] and applies(*args, **kwargs)

    for role in ("anchor", "lisa"):
        real = getattr(decode_step, f"{role}_step")

        def counted(*args, _real=real, _role=role, **kwargs):
            calls[_role] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(decode_step, f"{role}_step", counted)
    monkeypatch.setattr(decode_step, "applies", spy)
    return calls


@pytest.mark.parametrize("share", ["logits", "probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lean_step_gives_the_general_paths_logits_and_cache_bit_for_bit(kv_heads, input_ids, share, dtype, step_calls):
    # r = 8 < head_dim 16 with a random FFN: a wrong KV group, rotary plane or FFN bias would show.
    model = _model(kv_heads, dtype, share=share)
    step_calls["off"] = True
    expected, expected_cache = _decode(model, input_ids)
    step_calls["off"] = False
    actual, cache = _decode(model, input_ids)
    # layers 1 (anchor of 2) and 4 (anchor of 5) and LiSA 2, 3, 5, over 6 decode steps
    assert step_calls["anchor"] == 2 * 6 and step_calls["lisa"] == 3 * 6
    assert torch.equal(actual, expected)
    for got, want in zip(cache.layers, expected_cache.layers):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)


def test_lean_step_equals_the_full_forward(kv_heads, input_ids, step_calls):
    model = _model(kv_heads)
    with torch.no_grad():
        full = model(input_ids).logits
    decoded, _ = _decode(model, input_ids)
    assert step_calls["lisa"] == 3 * 6
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-4)


def test_lean_step_is_not_taken_for_prefill_masks_autograd_or_read_probabilities(input_ids, step_calls):
    model = _model(2)
    with torch.no_grad():
        out = model(input_ids[:, :6], use_cache=True)  # prefill: T > 1
        assert step_calls["lisa"] == 0
        cache = output_cache(out)
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 0] = 0  # a padded position: transformers hands the layers a mask
        model(input_ids[:, 6:7], attention_mask=mask, **cache_kwargs(cache), use_cache=True)
        assert step_calls["lisa"] == 0
    out = model(input_ids[:, 7:8], **cache_kwargs(cache), use_cache=True)  # autograd on
    assert step_calls["lisa"] == 0 and out.logits.requires_grad
    with torch.no_grad():
        model(input_ids[:, 8:9], **cache_kwargs(cache), use_cache=True)
        assert step_calls["lisa"] == 3
        out = model(input_ids[:, 9:10], **cache_kwargs(cache), use_cache=True, output_attentions=True)
        # sdpa: transformers records no attentions of the base layers, nor of LiSA layers (entry i must be
        # layer i, tests/test_output_attentions.py), so nothing reads the probabilities: the lean step
        assert step_calls["lisa"] == 6 and not out.attentions
        # transformers' recording hooks stay installed but read nothing now: the lean step again
        # (before the fix every later call of the process took the general path and kept probabilities)
        model(input_ids[:, 10:11], **cache_kwargs(cache), use_cache=True)
        assert step_calls["lisa"] == 9


def test_a_users_forward_hook_on_an_attention_module_gets_the_probabilities(input_ids, step_calls):
    model = _model(2)
    seen = []
    lisa_attention = model.base_model.model.model.layers[3].self_attn
    lisa_attention.base_layer.register_forward_hook(lambda module, args, output: seen.append(output[1]))
    with torch.no_grad():
        cache = output_cache(model(input_ids[:, :6], use_cache=True))
        model(input_ids[:, 6:7], **cache_kwargs(cache), use_cache=True)
    assert step_calls["lisa"] == 2  # layers 2 and 5; layer 3 took the general path for the hook
    assert seen[-1].shape == (2, 4, 1, 7)
    torch.testing.assert_close(seen[-1].sum(-1), torch.ones(2, 4, 1))


def test_lean_step_is_not_taken_without_a_cache(input_ids, step_calls):
    model = _model(2)
    with torch.no_grad():
        model(input_ids[:, :1], use_cache=False)
    assert step_calls == {"anchor": 0, "lisa": 0, "off": False}
