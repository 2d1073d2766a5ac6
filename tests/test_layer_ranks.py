"""Per-layer ranks (`LisaConfig.layer_ranks`, or `r` as a mapping): config checks, weights, cache, kernels,
save/load, the compact model, the Hub and `rank_allocation="sensitivity"` in `lisa_peft.convert`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model

from lisa_peft import LisaConfig, LisaLlamaForCausalLM
from lisa_peft.compact.merge import compact_sizes
from lisa_peft.evaluation.memory import kv_cache_bytes, lisa_parameter_count, model_kv_cache_bytes
from lisa_peft.integrations.hub import check_adapter_compatible
from lisa_peft.integrations.hub.model_card import render_model_card
from lisa_peft.pipeline.convert import allocate_ranks, convert
from lisa_peft.tuners.lisa.model import set_kernel_mode
from lisa_peft.tuners.lisa.transformers_compat import cache_kwargs, output_cache
from tests.helpers.hub_fixtures import hub_client, hub_server  # noqa: F401
from tests.helpers.tiny_models import VOCAB, move_lisa_weights, tiny_llama

LAYERS = [2, 3, 5]
RANKS = {2: 8, 3: 2, 5: 6}  # head_dim 16 -> compression 2x, 8x, 2.7x


def _mixed(kv_heads: int = 2, seed: int = 0, **kwargs):
    """A LiSA PeftModel with a rank per layer whose LiSA weights moved away from their init."""
    model = get_peft_model(tiny_llama(kv_heads), LisaConfig(lisa_layers=LAYERS, layer_ranks=RANKS, **kwargs))
    return move_lisa_weights(model, seed)


def _ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- config
def test_layer_ranks_is_normalized_and_r_as_a_mapping_is_the_same_thing():
    config = LisaConfig(lisa_layers=LAYERS, layer_ranks={5: 6, "2": 8})
    assert config.layer_ranks == {"2": 8, "5": 6}
    as_r = LisaConfig(lisa_layers=LAYERS, r={2: 8, 3: 2, 5: 6})
    assert as_r.layer_ranks == {"2": 8, "3": 2, "5": 6} and as_r.r is None
    assert as_r.ranks() == {2: 8, 3: 2, 5: 6}
    assert LisaConfig(lisa_layers=LAYERS, r=4, layer_ranks={3: 2}).ranks() == {2: 4, 3: 2, 5: 4}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"layer_ranks": {3: 5}}, r"layer_ranks\[3\]` must be a positive even integer"),
        ({"layer_ranks": {3: 0}}, r"layer_ranks\[3\]` must be a positive even integer"),
        ({"layer_ranks": {"three": 4}}, "keys are layer indices"),
        ({"layer_ranks": [4, 4]}, "must be a mapping"),
        ({"layer_ranks": {4: 4}}, r"names layers \[4\] that are not in `lisa_layers`"),
        ({"r": {3: 4}, "layer_ranks": {3: 4}}, "Give per-layer ranks once"),
        ({"rank_allocation": "greedy"}, "`rank_allocation` must be one of 'uniform', 'sensitivity'"),
    ],
)
def test_bad_rank_settings_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LisaConfig(lisa_layers=LAYERS, **kwargs)


def test_injection_refuses_a_rank_wider_than_the_head_and_sensitivity_without_data():
    with pytest.raises(ValueError, match=r"larger than the head dimension 16.*\{3: 18\}"):
        get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=LAYERS, layer_ranks={3: 18}))
    with pytest.raises(ValueError, match="rank_allocation='sensitivity'.*lisa_peft.convert"):
        get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=LAYERS, rank_allocation="sensitivity"))


# ---------------------------------------------------------------------------------------------- the model
def test_each_layer_gets_its_own_width_planes_and_cache(kv_heads):
    model = _mixed(kv_heads)
    config = model.peft_config["default"]
    layers = model.get_base_model().model.layers
    for idx, rank in RANKS.items():
        attn = layers[idx].self_attn
        assert attn.lisa_q_proj["default"].weight.shape == (4 * rank, 64)
        assert attn.lisa_k_proj["default"].weight.shape == (kv_heads * rank, 64)
        assert torch.tensor(config.rotary_planes[str(idx)]).shape == (kv_heads, rank // 2)
    ids = _ids()
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
    for idx, layer in enumerate(cache.layers):
        assert layer.keys.shape[-1] == RANKS.get(idx, 16), idx
        assert layer.values.shape[-1] == 16
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert model_kv_cache_bytes(model, batch_size=2, seq_len=12).lisa == measured


def test_decode_equals_full_forward_and_disabled_adapter_is_the_base(kv_heads):
    model, ids = _mixed(kv_heads), _ids()
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :7], use_cache=True)
        steps, cache = [out.logits], output_cache(out)
        for t in range(7, 12):
            out = model(ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True)
            steps.append(out.logits)
        with model.disable_adapter():
            disabled = model(ids).logits
        base = tiny_llama(kv_heads)(ids).logits
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(disabled, base, atol=0, rtol=0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="kernels on CPU need TRITON_INTERPRET=1")
def test_kernels_follow_each_layers_rank(monkeypatch):
    import lisa_kernels

    calls = []
    for name in ("lisa_prefill", "lisa_decode"):
        original = getattr(lisa_kernels, name)
        monkeypatch.setattr(lisa_kernels, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    model, ids = _mixed(2), _ids(2, 8)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)
        reference = model(ids).logits
        set_kernel_mode(model, "triton")
        actual = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)
        logits = model(ids).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-4)
    assert torch.equal(actual, expected)
    assert calls.count("lisa_prefill") == 2 * len(LAYERS) and calls.count("lisa_decode") == 2 * len(LAYERS)


def test_training_reaches_every_layers_weights():
    model = _mixed(2)
    model.train()
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert {name.split(".")[4] for name in grads} == {str(i) for i in LAYERS}


# ---------------------------------------------------------------------------------------------- save, load, Hub
def test_save_then_load_gives_the_same_logits(tmp_path):
    model, ids = _mixed(2), _ids()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["layer_ranks"] == {"2": 8, "3": 2, "5": 6}
    loaded = PeftModel.from_pretrained(tiny_llama(2), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)


def test_compatibility_check_reads_each_layers_plane_width():
    config = _mixed(2).peft_config["default"]
    check_adapter_compatible(config, tiny_llama(2))
    config.rotary_planes["3"] = [[0, 1], [2, 3]]  # width 2 planes = rank 4, but layer_ranks says 2
    with pytest.raises(ValueError, match=r"rotary_planes\['3'\] is \[2\]\[2\].*needs \[2\]\[1\]"):
        check_adapter_compatible(config, tiny_llama(2))


@pytest.mark.hub
def test_hub_round_trip(hub_client, tmp_path):  # noqa: F811
    model, ids = _mixed(2), _ids()
    with torch.no_grad():
        expected = model(ids).logits
    repo = hub_client.unique_repo_id("ranks")
    model.push_to_hub(repo, private=True)
    assert json.loads(hub_client.read_file(repo, "adapter_config.json"))["layer_ranks"] == {"2": 8, "3": 2, "5": 6}
    assert "2: 8, 3: 2, 5: 6" in hub_client.read_file(repo, "README.md").decode()
    loaded = PeftModel.from_pretrained(tiny_llama(2), repo).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- compact model
def test_compact_model_keeps_each_layers_rank(tmp_path):
    model, ids = _mixed(2), _ids()
    with torch.no_grad():
        expected = model(ids).logits
    compact = model.merge_and_unload()
    assert isinstance(compact, LisaLlamaForCausalLM)
    assert compact.config.lisa_layer_ranks == {"2": 8, "3": 2, "5": 6}
    for idx, rank in RANKS.items():
        assert compact.model.layers[idx].self_attn.lisa_q_proj.weight.shape == (4 * rank, 64)
    sizes = compact_sizes(compact)
    assert sizes.r == pytest.approx(16 / 3) and sizes.qk_compression == pytest.approx(3.0)
    with torch.no_grad():
        torch.testing.assert_close(compact(ids).logits, expected, atol=1e-5, rtol=1e-4)
    compact.save_pretrained(tmp_path)
    assert "3: 2" in (tmp_path / "README.md").read_text()
    reloaded = LisaLlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, compact(ids).logits, atol=0, rtol=0)


def test_compact_config_refuses_a_layer_ranks_that_does_not_fit(tmp_path):
    compact = _mixed(2).merge_and_unload()
    compact.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["lisa_layer_ranks"]["3"] = 4  # the planes saved for layer 3 are [2][1]: rank 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lisa_rotary_planes\['3'\] must be \[2\]\[2\]"):
        LisaLlamaForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- accounting
def test_bytes_and_parameters_follow_each_layers_rank():
    config = tiny_llama(2).config
    kv = kv_cache_bytes(config, LAYERS, RANKS, seq_len=10, dtype=torch.float32, keys_only=True)
    assert kv.lisa == 10 * 2 * 4 * (3 * 16 + 8 + 2 + 6)
    uniform = lisa_parameter_count(config, [2], 8) + lisa_parameter_count(config, [3], 2) + lisa_parameter_count(
        config, [5], 6)
    assert lisa_parameter_count(config, LAYERS, {"2": 8, "3": 2, "5": 6}) == uniform
    card = render_model_card(_mixed(2))
    assert "2-8 per layer" in card and "2: 8, 3: 2, 5: 6" in card and "16 / 5.33 (mean) = 3.0x" in card


# ---------------------------------------------------------------------------------------------- allocation
def test_allocate_ranks_keeps_the_budget_and_bounds():
    assert allocate_ranks({4: 1.0, 5: 1.0, 6: 1.0}, r=8, head_dim=64) == {4: 8, 5: 8, 6: 8}
    ranks = allocate_ranks({4: 0.01, 5: 0.1, 6: 1.0}, r=8, head_dim=64)
    assert sum(ranks.values()) == 24 and ranks[4] == 4 and ranks[6] == 16  # floor r/2, cap 2r
    assert ranks[4] <= ranks[5] <= ranks[6] and all(v % 2 == 0 for v in ranks.values())
    assert allocate_ranks({4: 0.0, 5: 5.0}, r=12, head_dim=16) == {4: 8, 5: 16}  # cap = head_dim


def test_convert_allocates_ranks_by_sensitivity_and_saves_them(tmp_path):
    windows = torch.randint(3, VOCAB, (6, 24), generator=torch.Generator().manual_seed(0))
    config = LisaConfig(lisa_layers=[2, 3, 4, 5], r=4, init_lisa_weights="calibrate", rank_allocation="sensitivity")
    model = convert(tiny_llama(2), None, config, calibration_ids=windows, layerwise_steps=2,
                    sensitivity_fit_steps=2, progress=False)
    saved = model.peft_config["default"]
    ranks = saved.ranks()
    assert sum(ranks.values()) == 4 * 4 and all(2 <= v <= 8 and v % 2 == 0 for v in ranks.values())
    scores = saved.layer_scores["sensitivity_output_kl"]
    assert saved.layer_scores["rank_allocation"]["ranks"] == saved.layer_ranks
    most, least = max(scores, key=scores.get), min(scores, key=scores.get)
    assert ranks[int(most)] >= ranks[int(least)]
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(2), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)
