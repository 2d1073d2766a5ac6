"""Calibration (planes, least-squares FFN, layer-wise stage), automatic layers, lisa_peft.convert."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from lisa_peft import LisaConfig
from lisa_peft.pipeline import calibration as C
from lisa_peft.pipeline.convert import choose_layers, convert
from tests.helpers.tiny_models import VOCAB, tiny_llama


def _windows(n: int = 6, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _peaky_llama(seed: int = 0):
    """A tiny random LLaMA with sharp attention (random init attends almost uniformly)."""
    model = tiny_llama(2, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return model


def test_capture_matches_the_model_and_base_logits_match_eager_attention():
    model = tiny_llama(2, attn_implementation="eager")
    ids = _windows(3, 10)
    inputs = C.capture_attention_inputs(model, ids, batch_size=2, progress=False)
    assert sorted(inputs.hidden) == list(range(6)) and inputs.hidden[3].shape == (3, 10, 64)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    attn = model.model.layers[3].self_attn
    logits = C.base_logits(attn, inputs.hidden[3], inputs.rope(3))
    probs = torch.softmax(logits + C.causal_mask(10, logits.device), dim=-1)
    torch.testing.assert_close(probs, attentions[3], atol=1e-5, rtol=1e-4)


def test_activation_planes_find_the_dominant_plane():
    model = tiny_llama(2)
    attn = model.model.layers[3].self_attn
    with torch.no_grad():  # plane 5 of every head (dims 5 and 13) gets 20x larger q and k rows
        for proj in (attn.q_proj, attn.k_proj):
            w = proj.weight.view(-1, 16, 64)
            w[:, [5, 13]] *= 20
    inputs = C.capture_attention_inputs(model, _windows(), progress=False)
    planes = C.activation_planes(attn, inputs, 3, num_planes=2)
    assert planes.shape == (2, 2) and (planes == 5).any(dim=1).all()


def test_least_squares_ffn_recovers_a_known_head_mixing():
    """If target = M prev + delta exactly, the fitted FFN reproduces M prev (row-centred)."""
    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[3]))
    layer = model.base_model.model.model.layers[3].self_attn
    inputs = C.capture_attention_inputs(model.get_base_model(), _windows(), progress=False)
    hidden, rope = inputs.hidden[3], inputs.position_embeddings
    prev = torch.randn(6, 4, 24, 24)
    mixing = torch.randn(4, 4)
    with torch.no_grad():
        q_r, k_r = layer.lisa_projections("default", hidden, C._batched(rope, 6))
        delta = torch.matmul(q_r.reshape(6, 2, 2 * 24, 4), k_r.transpose(-1, -2)).view(6, 4, 24, 24) * 0.25
    target = torch.einsum("gh,bhtn->bgtn", mixing, prev) + delta
    C.fit_head_ffn(layer, "default", prev, target, hidden, rope, ridge=0.0)
    got = layer.align_heads("default", prev)
    valid = torch.ones(24, 24, dtype=torch.bool).tril()
    centre = lambda x: C._centre_rows(x, valid)  # noqa: E731
    torch.testing.assert_close(centre(got), centre(target - delta), atol=1e-3, rtol=1e-3)


def test_linear_ffn_init_of_a_wider_ffn_is_exact_and_all_its_units_can_learn():
    """ffn_hidden > 2H: the calibrated init is still exactly m @ x + bias, and the extra units get gradient
    (with all-zero extra units ReLU passes none, and they would stay dead forever)."""
    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[3], ffn_hidden=12))
    layer = model.base_model.model.model.layers[3].self_attn
    m, bias = torch.randn(4, 4), torch.randn(4)
    with torch.no_grad():
        C.set_linear_ffn(layer, "default", m, bias)
    prev = torch.randn(2, 4, 5, 5)
    out = layer.align_heads("default", prev)
    torch.testing.assert_close(out, torch.einsum("gh,bhtn->bgtn", m, prev) + bias[:, None, None], atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    down = layer.lisa_ffn_down["default"].weight
    assert down.grad[:, 8:].abs().sum() > 0


def test_layerwise_stage_lowers_attention_kl():
    model = _peaky_llama()
    config = LisaConfig(lisa_layers=[3, 4], init_lisa_weights="calibrate")
    peft_model = convert(model, None, config, calibration_ids=_windows(), layerwise_steps=40, layerwise_lr=1e-2,
                         progress=False)
    scores = peft_model.peft_config["default"].layer_scores
    for layer in ("3", "4"):
        record = scores["layers"][layer]
        assert record["kl_layerwise"] < 0.7 * record["kl_init"], record
    assert sorted(peft_model.peft_config["default"].rotary_planes) == ["3", "4"]


def test_get_peft_model_refuses_what_needs_data():
    with pytest.raises(ValueError, match="Use lisa_peft.convert.*or init_lisa_weights=.identity. here"):
        get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[3], init_lisa_weights="calibrate"))
    with pytest.raises(ValueError, match="Use lisa_peft.convert"):
        get_peft_model(tiny_llama(2), LisaConfig(lisa_layers="auto", target_fraction=0.5))
    with pytest.raises(ValueError, match="target_fraction` in \\(0, 1\\)"):
        LisaConfig(lisa_layers="auto")


def test_loss_sensitivity_runs_the_model_with_exactly_one_lisa_layer():
    """The probe layer must change the model's loss; the model is restored afterwards."""
    from lisa_peft.pipeline.convert import layer_sensitivity, lm_loss

    model = _peaky_llama()
    ids = _windows()
    before = lm_loss(model, ids)
    inputs = C.capture_attention_inputs(model, ids, progress=False)
    scores = layer_sensitivity(model, inputs, ids, LisaConfig(lisa_layers="auto", target_fraction=0.5), False)
    assert all(abs(v) > 1e-6 for v in scores["loss"].values())
    assert lm_loss(model, ids) == before
    assert not model.model._forward_pre_hooks


def test_fitted_probe_scores_the_output_kl_and_fits_before_scoring():
    """output_kl is the model's own top-k KL to the base (> 0 with a LiSA layer in); a fitted probe has a
    lower attention KL than the calibrated init it starts from; the model is restored afterwards."""
    from lisa_peft.pipeline.convert import layer_sensitivity, lm_loss

    model = _peaky_llama()
    ids = _windows()
    before = lm_loss(model, ids)
    inputs = C.capture_attention_inputs(model, ids, progress=False)
    config = LisaConfig(lisa_layers="auto", target_fraction=0.5)
    init = layer_sensitivity(model, inputs, ids, config, False)
    fitted = layer_sensitivity(model, inputs, ids, config, False, fit_steps=30, fit_lr=1e-2)
    assert sorted(init) == sorted(fitted) == ["kl", "loss", "output_kl"]
    assert all(v > 1e-6 for v in init["output_kl"].values())
    assert all(fitted["kl"][i] < init["kl"][i] for i in init["kl"]), (init["kl"], fitted["kl"])
    assert lm_loss(model, ids) == before


def test_convert_selects_layers_by_the_named_score_and_refuses_unknown_ones():
    config = LisaConfig(lisa_layers="auto", target_fraction=0.5, init_lisa_weights="calibrate")
    peft_model = convert(tiny_llama(2), None, config, calibration_ids=_windows(), layerwise_steps=0,
                         progress=False, select_layers_by="output_kl", sensitivity_fit_steps=2)
    saved = peft_model.peft_config["default"]
    scores = saved.layer_scores["sensitivity_output_kl"]
    assert sorted(map(int, sorted(scores, key=scores.get)[:3])) == saved.lisa_layers
    with pytest.raises(ValueError, match="select_layers_by='kl'.*'loss' or 'output_kl'"):
        convert(tiny_llama(2), None, config, calibration_ids=_windows(), select_layers_by="kl")


def test_choose_layers_takes_the_least_sensitive():
    scores = {2: 0.9, 3: 0.1, 4: 0.5, 5: 0.2, 6: 0.3}
    assert choose_layers(scores, num_layers=10, fraction=0.3) == [3, 5, 6]
    assert choose_layers(scores, num_layers=10, fraction=0.01) == [3]


def test_auto_layers_are_resolved_scored_saved_and_reloadable(tmp_path):
    model = tiny_llama(2)
    config = LisaConfig(lisa_layers="auto", target_fraction=0.5, init_lisa_weights="calibrate")
    stages = []
    peft_model = convert(model, None, config, calibration_ids=_windows(), layerwise_steps=3, progress=False,
                         stage_callback=lambda stage, m: stages.append(stage) or len(stages))
    saved = peft_model.peft_config["default"]
    assert len(saved.lisa_layers) == 3 and min(saved.lisa_layers) >= 2
    sensitivity = saved.layer_scores["sensitivity_loss"]
    assert sorted(map(int, sensitivity)) == sorted(map(int, saved.layer_scores["sensitivity_kl"])) == [2, 3, 4, 5]
    chosen = sorted(sensitivity, key=sensitivity.get)[:3]
    assert sorted(map(int, chosen)) == saved.lisa_layers
    assert stages == ["init", "layerwise"] and saved.layer_scores["stages"] == {"init": 1, "layerwise": 2}
    ids = _windows(2, 12, seed=5)
    with torch.no_grad():
        expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(2), tmp_path)
    assert reloaded.peft_config["default"].lisa_layers == saved.lisa_layers
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=0, rtol=0)


def test_probs_mode_calibrates_too():
    config = LisaConfig(lisa_layers=[4], share="probs", init_lisa_weights="calibrate")
    peft_model = convert(_peaky_llama(), None, config, calibration_ids=_windows(), layerwise_steps=20,
                         layerwise_lr=1e-2, progress=False)
    record = peft_model.peft_config["default"].layer_scores["layers"]["4"]
    assert record["kl_layerwise"] < record["kl_init"]


def test_teacher_topk_caps_k_at_the_vocabulary():
    """A tiny vocabulary (VOCAB < 64) must not make the probe's top-64 teacher fail."""
    from lisa_peft.pipeline.training import teacher_topk

    teacher = teacher_topk(tiny_llama(2), _windows(2, 8), k=VOCAB + 10)
    assert teacher.logprobs.shape == (2, 8, VOCAB) and teacher.ids.shape == (2, 8, VOCAB)
