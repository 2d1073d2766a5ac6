"""LiSA tuner behaviour: base-exactness when disabled, the LiSA math, PEFT adapter semantics."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from lisa_peft import LisaAttention, LisaConfig
from lisa_peft.evaluation.memory import lisa_parameter_count
from tests.helpers.tiny_models import tiny_llama


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def test_disable_adapter_gives_exactly_the_base_model(kv_heads, input_ids):
    base = tiny_llama(kv_heads)
    reference = _logits(base, input_ids)
    model = get_peft_model(base, LisaConfig(lisa_layers=[2, 3, 5]))
    assert not torch.allclose(_logits(model, input_ids), reference, atol=1e-3)
    with model.disable_adapter():
        assert torch.equal(_logits(model, input_ids), reference)
    assert not torch.allclose(_logits(model, input_ids), reference, atol=1e-3)


@pytest.mark.parametrize("share", ["logits", "probs"])
def test_full_rank_delta_with_zero_ffn_reproduces_base_attention(kv_heads, input_ids, share):
    """r = head_dim keeps every rotary plane, so delta = the base score; a zero FFN adds nothing
    (logits) or a constant (probs): the LiSA model must then equal the base model."""
    base = tiny_llama(kv_heads)
    reference = _logits(base, input_ids)
    model = get_peft_model(base, LisaConfig(lisa_layers=[2, 3, 4, 5], r=16, init_lisa_weights="random", share=share))
    torch.testing.assert_close(_logits(model, input_ids), reference, atol=2e-5, rtol=1e-4)


def _published_logits(model, ids) -> dict[int, torch.Tensor]:
    """Run `model` and return the pre-mask logits each wrapped layer handed on."""
    from lisa_peft.tuners.lisa.state import LisaForwardState

    captured: dict[int, torch.Tensor] = {}
    original = LisaForwardState.publish

    def spy(self, layer_idx, logits, output):
        captured[layer_idx] = logits.detach().clone()
        return original(self, layer_idx, logits, output)

    LisaForwardState.publish = spy
    try:
        _logits(model, ids)
    finally:
        LisaForwardState.publish = original
    return captured


def test_identity_init_adds_previous_logits_to_own_score(input_ids):
    """Identity FFN: S3 = S2 (anchor logits) + delta3; with r = head_dim delta3 is layer 3's own
    base score, which a zero FFN ("random" init) exposes alone."""
    identity = _published_logits(get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[3], r=16)), input_ids)
    zero_ffn = _published_logits(
        get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[3], r=16, init_lisa_weights="random")), input_ids
    )
    assert sorted(identity) == [2, 3] and identity[3].shape == (2, 4, 12, 12)
    torch.testing.assert_close(identity[3], identity[2] + zero_ffn[3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(identity[3], zero_ffn[3], atol=1e-3)


def test_chained_lisa_layers_read_the_previous_lisa_logits(input_ids):
    logits = _published_logits(get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[3, 4], r=16)), input_ids)
    zero = _published_logits(
        get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[3, 4], r=16, init_lisa_weights="random")), input_ids
    )
    # layer 4's hidden input differs between the two models, so compare through layer 3 only
    torch.testing.assert_close(logits[3], logits[2] + zero[3], atol=1e-5, rtol=1e-5)
    assert sorted(logits) == [2, 3, 4]


def test_identity_head_ffn_is_exact():
    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[3]))
    layer = model.base_model.model.model.layers[3].self_attn
    x = torch.randn(2, 4, 5, 7) * 10
    torch.testing.assert_close(layer.align_heads("default", x), x, atol=1e-5, rtol=0)


def test_base_q_and_k_of_lisa_layers_are_unused(input_ids):
    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[3, 4]))
    before = _logits(model, input_ids)
    attn = model.base_model.model.model.layers[4].self_attn.base_layer
    with torch.no_grad():
        attn.q_proj.weight.normal_()
        attn.k_proj.weight.normal_()
    torch.testing.assert_close(_logits(model, input_ids), before, atol=0, rtol=0)
    with torch.no_grad():
        attn.v_proj.weight.normal_()
    assert not torch.allclose(_logits(model, input_ids), before)


def test_only_lisa_weights_train_and_count_is_printed(capsys):
    base = tiny_llama(2)
    model = get_peft_model(base, LisaConfig(lisa_layers=[3, 4]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lisa_" in n for n in trainable)
    n_trainable, n_total = model.get_nb_trainable_parameters()
    expected = lisa_parameter_count(base.config, [3, 4], r=4, ffn_hidden=8)
    assert n_trainable == expected == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in capsys.readouterr().out


def test_unload_restores_the_original_modules(input_ids):
    base = tiny_llama(2)
    originals = [layer.self_attn for layer in base.model.layers]
    reference = _logits(base, input_ids)
    model = get_peft_model(base, LisaConfig(lisa_layers=[3, 4]))
    restored = model.unload()
    assert [layer.self_attn for layer in restored.model.layers] == originals
    assert not any(isinstance(m, LisaAttention) for m in restored.modules())
    assert not restored.model._forward_pre_hooks
    assert torch.equal(_logits(restored, input_ids), reference)


def test_merge_adapter_explains_why_it_cannot_merge_in_place():
    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[3]))
    with pytest.raises(ValueError, match=r"cannot be merged into the base weights.*merge_and_unload\(\) returns"):
        model.merge_adapter()  # merge_and_unload() builds the compact model instead (tests/test_compact.py)


def test_several_named_adapters(input_ids):
    base = tiny_llama(2)
    reference = _logits(base, input_ids)
    model = get_peft_model(base, LisaConfig(lisa_layers=[3, 4]), adapter_name="early")
    model.add_adapter("late", LisaConfig(lisa_layers=[5], init_lisa_weights="random"))
    early = _logits(model, input_ids)
    model.set_adapter("late")
    late = _logits(model, input_ids)
    assert not torch.allclose(early, late)
    layers = model.base_model.model.model.layers
    assert layers[5].self_attn.lisa_roles == {"late": "lisa"}
    assert layers[4].self_attn.lisa_roles == {"early": "lisa", "late": "anchor"}
    # only the active adapter trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".late." in n for n in trainable)
    with pytest.raises(ValueError, match="exactly one LiSA adapter"):
        model.base_model.set_adapter(["early", "late"])
    model.set_adapter("early")
    torch.testing.assert_close(_logits(model, input_ids), early, atol=0, rtol=0)
    model.delete_adapter("late")
    assert "late" not in model.peft_config
    assert layers[4].self_attn.lisa_roles == {"early": "lisa"}
    torch.testing.assert_close(_logits(model, input_ids), early, atol=0, rtol=0)
    with model.disable_adapter():
        assert torch.equal(_logits(model, input_ids), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes_run_and_keep_base_exactness(input_ids, dtype):
    base = tiny_llama(2).to(dtype)
    reference = _logits(base, input_ids)
    model = get_peft_model(base, LisaConfig(lisa_layers=[3, 4]))
    lisa_params = [p for n, p in model.named_parameters() if "lisa_" in n]
    assert {p.dtype for p in lisa_params} == {torch.float32}  # PEFT's autocast_adapter_dtype rule
    out = _logits(model, input_ids)
    assert out.dtype == dtype and torch.isfinite(out).all()
    with model.disable_adapter():
        assert torch.equal(_logits(model, input_ids), reference)


def test_lisa_dtype_overrides_weight_dtype(input_ids):
    base = tiny_llama(2).to(torch.bfloat16)
    model = get_peft_model(base, LisaConfig(lisa_layers=[3, 4], lisa_dtype="bfloat16"))
    assert {p.dtype for n, p in model.named_parameters() if "lisa_" in n} == {torch.bfloat16}
    assert torch.isfinite(_logits(model, input_ids)).all()


def test_padding_mask_matches_unpadded_sequence(kv_heads):
    model = get_peft_model(tiny_llama(kv_heads), LisaConfig(lisa_layers=[2, 3, 4]))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    padded = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    plain = _logits(model, ids)
    left = _logits(model, padded, attention_mask=mask, position_ids=position_ids)
    torch.testing.assert_close(left[:, 2:], plain, atol=1e-5, rtol=1e-4)


def test_eager_and_sdpa_base_attention_agree(input_ids):
    sdpa = get_peft_model(tiny_llama(2, attn_implementation="sdpa"), LisaConfig(lisa_layers=[3, 4]))
    eager = get_peft_model(tiny_llama(2, attn_implementation="eager"), LisaConfig(lisa_layers=[3, 4]))
    torch.testing.assert_close(_logits(sdpa, input_ids), _logits(eager, input_ids), atol=1e-5, rtol=1e-4)


def test_output_attentions_include_lisa_and_anchor_layers(input_ids):
    """transformers records attentions with hooks on the base attention class; LiSA layers must
    appear there with their own probabilities (bug: they were missing, 2 of 6 layers returned)."""
    model = get_peft_model(tiny_llama(2, attn_implementation="eager"), LisaConfig(lisa_layers=[3, 4]))
    with torch.no_grad():
        attentions = model(input_ids, output_attentions=True).attentions
        with model.disable_adapter():
            base_attentions = model(input_ids, output_attentions=True).attentions
    assert len(attentions) == 6 and all(a.shape == (2, 4, 12, 12) for a in attentions)
    torch.testing.assert_close(attentions[2], base_attentions[2], atol=1e-6, rtol=1e-5)  # the anchor
    assert not torch.allclose(attentions[3], base_attentions[3], atol=1e-3)
    torch.testing.assert_close(attentions[3].sum(-1), torch.ones(2, 4, 12))
