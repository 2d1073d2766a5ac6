"""Layer choice that accounts for the layers already chosen: lazy greedy search over fitted probe layers."""

from __future__ import annotations

import pytest
import torch

from lisa_peft import LisaConfig
from lisa_peft.pipeline import calibration as C
from lisa_peft.pipeline.convert import (
    _lisa_layer_set,
    _loss_and_output_kl,
    convert,
    greedy_layers,
    layer_sensitivity,
    lazy_greedy,
    lm_loss,
)
from lisa_peft.pipeline.training import teacher_topk
from lisa_peft.tuners.lisa.layer import ROLE_ANCHOR, ROLE_LISA, LisaAttention
from tests.helpers.tiny_models import VOCAB, tiny_llama


def _windows(n: int = 6, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _plain_greedy(single: dict[int, float], score, count: int) -> list[int]:
    chosen: list[int] = []
    for _ in range(count):
        rest = [i for i in single if i not in chosen]
        chosen.append(min(rest, key=lambda i: (score(chosen + [i]), i)))
    return chosen


def test_lazy_greedy_avoids_neighbours_that_are_cheap_alone_and_matches_plain_greedy():
    """Adjacent picks cost extra (a LiSA layer reading a LiSA layer's logits): the three cheapest alone are
    2, 3, 4; greedy takes 2, 4, 6, like a search that measures every candidate at every step, in fewer
    evaluations; the score after each pick is the chosen prefix's score."""
    single = {2: 0.1, 3: 0.1, 4: 0.12, 5: 0.3, 6: 0.35, 7: 0.5}
    calls = []

    def score(layers: list[int]) -> float:
        calls.append(tuple(layers))
        s = sorted(layers)
        return sum(single[i] for i in s) + sum(0.5 for a, b in zip(s, s[1:]) if b == a + 1)

    result = lazy_greedy(single, score, 3)
    measured = len(calls)
    assert result["order"] == [2, 4, 6] == _plain_greedy(single, score, 3)
    plain_calls = sum(len(single) - j for j in range(3))
    assert result["evaluations"] == measured < plain_calls
    for j, value in enumerate(result["score"]):
        assert value == pytest.approx(score(result["order"][: j + 1]))
    assert lazy_greedy(single, score, 10)["order"][:3] == [2, 4, 6]  # more than there are: all of them


@pytest.fixture(scope="module")
def probed():
    torch.manual_seed(0)
    model = tiny_llama(2)
    with torch.no_grad():  # sharp attention, so that a LiSA layer changes the output
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    ids = _windows()
    inputs = C.capture_attention_inputs(model, ids, progress=False)
    config = LisaConfig(lisa_layers="auto", target_fraction=0.5)
    probes: dict[int, LisaAttention] = {}
    scores = layer_sensitivity(model, inputs, ids, config, False, fit_steps=5, probes=probes)
    return model, ids, config, probes, scores


def test_a_layer_set_chains_the_probes_behind_one_anchor_and_restores_the_model(probed):
    model, ids, config, probes, _ = probed
    before = lm_loss(model, ids)
    layers = model.model.layers
    originals = [layer.self_attn for layer in layers]
    with _lisa_layer_set(model, {3: probes[3], 4: probes[4]}, config):
        roles = [getattr(layer.self_attn, "lisa_roles", {}).get("probe") for layer in layers]
        assert roles == [None, None, ROLE_ANCHOR, ROLE_LISA, ROLE_LISA, None]
        assert lm_loss(model, ids) != before
    assert [layer.self_attn for layer in layers] == originals and not model.model._forward_pre_hooks
    with pytest.raises(RuntimeError), _lisa_layer_set(model, {3: probes[3]}, config):
        raise RuntimeError("a failure inside")
    assert [layer.self_attn for layer in layers] == originals and lm_loss(model, ids) == before


def test_greedy_layers_score_what_they_report(probed):
    """The first pick's increase is the probe's own score; every reported score is the chosen prefix's KL,
    measured again here; together the layers cost more than the sum of their scores alone."""
    model, ids, config, probes, scores = probed
    result = greedy_layers(model, probes, scores["output_kl"], ids, config, 3, by="output_kl", progress=False)
    order = result["order"]
    assert len(order) == len(set(order)) == 3 and set(order) <= set(probes)
    assert result["score"][0] == pytest.approx(scores["output_kl"][order[0]], rel=1e-3)
    teacher = teacher_topk(model, ids)
    for j in range(3):
        with _lisa_layer_set(model, {i: probes[i] for i in order[: j + 1]}, config):
            _, kl = _loss_and_output_kl(model, ids, teacher)
        assert result["score"][j] == pytest.approx(kl, rel=1e-3)
    assert result["score"][-1] != pytest.approx(sum(scores["output_kl"][i] for i in order), rel=1e-3)
    with pytest.raises(ValueError, match="by='kl'"):
        greedy_layers(model, probes, scores["kl"], ids, config, 3, by="kl")


def test_convert_with_greedy_search_records_and_uses_its_choice():
    config = LisaConfig(lisa_layers="auto", target_fraction=0.5, init_lisa_weights="calibrate")
    peft_model = convert(tiny_llama(2), None, config, calibration_ids=_windows(), layerwise_steps=0,
                         sensitivity_fit_steps=2, layer_search="greedy", progress=False)
    saved = peft_model.peft_config["default"]
    search = saved.layer_scores["layer_search"]
    assert search["by"] == "loss" and sorted(search["order"]) == saved.lisa_layers and len(saved.lisa_layers) == 3
    assert len(search["score"]) == 3 and search["evaluations"] >= 2
    with torch.no_grad():
        assert torch.isfinite(peft_model(_windows(2, 12, seed=3)).logits).all()
    with pytest.raises(ValueError, match="layer_search='greedyy': choose 'single' or 'greedy'"):
        convert(tiny_llama(2), None, config, calibration_ids=_windows(), layer_search="greedyy")
