"""`evaluate` metrics shipped in lisa_peft.evaluation.metrics, loaded from their local folders (no Hub)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from lisa_peft import LisaConfig
from lisa_peft.evaluation.metrics import METRICS, metric_path
from lisa_peft.tuners.lisa.layer import LisaAttention
from tests.helpers.tiny_assets import char_tokenizer
from tests.helpers.tiny_models import tiny_llama

evaluate = pytest.importorskip("evaluate")

TEXTS = ["the quick brown fox", "jumps", "over a lazy dog while seven wizards box jugs"]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _llama(tokenizer, seed: int = 0, peaky: bool = False):
    """Tiny LLaMA matching the char tokenizer; `peaky` sharpens attention (random init is near uniform)."""
    model = tiny_llama(2, seed=seed, vocab_size=len(tokenizer), pad_token_id=2, bos_token_id=1, eos_token_id=2)
    if peaky:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(4)
                layer.self_attn.k_proj.weight.mul_(4)
    return model


def _load(name: str, tmp_path: Path):
    return evaluate.load(metric_path(name), cache_dir=str(tmp_path), keep_in_memory=True)


def _ids(tokenizer, text: str, max_length: int | None = None) -> torch.Tensor:
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[:max_length] if max_length else ids])


def test_metric_paths_are_loadable_folders():
    for name in METRICS:
        folder = Path(metric_path(name))
        assert (folder / f"{name}.py").is_file()
    with pytest.raises(ValueError, match="Unknown metric"):
        metric_path("perplexity")


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "lisa"])
def test_perplexity_equals_exp_of_the_model_loss(tokenizer, tmp_path, adapter):
    model = _llama(tokenizer)
    if adapter:
        model = get_peft_model(model, LisaConfig(lisa_layers=[3, 4, 5]))
    metric = _load("lisa_perplexity", tmp_path)
    result = metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, batch_size=2)
    with torch.no_grad():
        expected = [math.exp(model(_ids(tokenizer, t), labels=_ids(tokenizer, t)).loss.item()) for t in TEXTS]
    assert result["perplexities"] == pytest.approx(expected, rel=1e-5)
    assert result["mean_perplexity"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)

    truncated = metric.compute(predictions=TEXTS[2:], model=model, tokenizer=tokenizer, max_length=8)
    ids = _ids(tokenizer, TEXTS[2], max_length=8)
    with torch.no_grad():
        assert truncated["perplexities"][0] == pytest.approx(math.exp(model(ids, labels=ids).loss.item()), rel=1e-5)


def test_perplexity_sees_the_adapter(tokenizer, tmp_path):
    metric = _load("lisa_perplexity", tmp_path)
    model = get_peft_model(_llama(tokenizer, peaky=True), LisaConfig(lisa_layers=[3, 4, 5]))
    lisa = metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer)["perplexities"]
    with model.disable_adapter():
        base = metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer)["perplexities"]
    assert lisa != pytest.approx(base, rel=1e-4)


def test_attention_fidelity_zero_before_lisa_positive_on_lisa_layers(tokenizer, tmp_path):
    model = get_peft_model(_llama(tokenizer, peaky=True), LisaConfig(lisa_layers=[3, 4, 5]))
    attn_before = model.config._attn_implementation
    result = _load("attention_fidelity", tmp_path).compute(
        predictions=TEXTS, model=model, tokenizer=tokenizer, batch_size=2
    )
    js = result["js_per_layer"]
    assert sorted(js) == list(range(6)) and result["lisa_layers"] == [3, 4, 5]
    assert all(js[i] < 1e-9 for i in (0, 1, 2))  # full layers (2 is the anchor) see unchanged inputs
    assert all(js[i] > 1e-4 for i in (3, 4, 5))
    assert result["mean_js_lisa_layers"] == pytest.approx((js[3] + js[4] + js[5]) / 3)
    assert result["num_rows"] == sum(len(t) + 1 for t in TEXTS)
    # the measurement's eager attention / PyTorch LiSA path are switched back afterwards
    assert model.config._attn_implementation == attn_before
    assert all(m.lisa_kernel["default"] == "auto" for m in model.modules() if isinstance(m, LisaAttention))


def test_attention_fidelity_zero_for_a_lisa_layer_equal_to_the_base(tokenizer, tmp_path):
    """r = head_dim with a zero FFN ("random" init) reproduces the base attention exactly."""
    config = LisaConfig(lisa_layers=[3, 4, 5], r=16, init_lisa_weights="random")
    model = get_peft_model(_llama(tokenizer, peaky=True), config)
    result = _load("attention_fidelity", tmp_path).compute(predictions=TEXTS, model=model, tokenizer=tokenizer)
    assert max(result["js_per_layer"].values()) < 1e-9
    assert result["mean_js_lisa_layers"] < 1e-9


def test_attention_fidelity_needs_a_lisa_model(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="LiSA adapter"):
        _load("attention_fidelity", tmp_path).compute(predictions=TEXTS, model=_llama(tokenizer), tokenizer=tokenizer)
