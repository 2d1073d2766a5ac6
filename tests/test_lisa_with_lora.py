"""LiSA with LoRA in one model by stacking (README "LiSA with LoRA"): train together or one after the other,
save as separate adapters, load back, `disable_adapter`, `unload`; PEFT's mixed models refuse LiSA clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, PeftModelForCausalLM, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from lisa_peft import LisaAttention, LisaConfig
from lisa_peft.integrations.hub.model_card import MODEL_CARD_MARKER
from tests.helpers.tiny_models import tiny_llama

IDS = torch.tensor([[5, 17, 3, 90, 42, 7, 64, 1, 11, 33]])
MLP = ["gate_proj", "up_proj", "down_proj"]


def _lora() -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", target_modules=MLP, init_lora_weights=False)


def _stack(lisa: PeftModel) -> PeftModel:
    return get_peft_model(lisa.get_base_model(), _lora(), adapter_name="mlp")


def _params(model: torch.nn.Module, marker: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if marker in n}


def _step(model: PeftModel, steps: int = 2) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    now = dict(model.named_parameters())
    return any(not torch.equal(before[n], now[n].detach()) for n in before)


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


def test_lisa_and_lora_train_together():
    model = _stack(get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[2, 3, 5]), adapter_name="attn"))
    assert isinstance(model, PeftModelForCausalLM) and list(model.peft_config) == ["attn", "mlp"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lisa_" in n or ".lora_" in n for n in trainable)
    assert any(".lisa_" in n for n in trainable) and any(".lora_" in n for n in trainable)
    lisa_before, lora_before = _params(model, ".lisa_"), _params(model, ".lora_")
    _step(model)
    assert _changed(lisa_before, model) and _changed(lora_before, model)
    assert sum(isinstance(m, LisaAttention) for m in model.modules()) == 5  # layers 2, 3, 5, anchors 1, 4
    assert sum(isinstance(m, LoraLayer) for m in model.modules()) == 3 * 6


def test_lora_trains_after_lisa_with_lisa_frozen(tmp_path):
    lisa = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[2, 3, 5]))
    _step(lisa)  # LiSA first
    lisa.save_pretrained(tmp_path / "lisa")
    frozen = PeftModel.from_pretrained(tiny_llama(2), tmp_path / "lisa", adapter_name="attn")  # inference mode
    model = _stack(frozen)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lisa_" in n)
    lisa_before, lora_before = _params(model, ".lisa_"), _params(model, ".lora_")
    _step(model)
    assert not _changed(lisa_before, model) and _changed(lora_before, model)


@pytest.fixture
def trained(tmp_path: Path) -> tuple[PeftModel, Path]:
    model = _stack(get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[2, 3, 5]), adapter_name="attn"))
    _step(model)
    model.save_pretrained(tmp_path / "saved")
    return model, tmp_path / "saved"


def test_saved_as_separate_adapters_and_loaded_back(trained):
    model, saved = trained
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "attn", "mlp"]
    assert MODEL_CARD_MARKER in (saved / "README.md").read_text()  # the card describes the LiSA adapter
    attn, mlp = load_file(saved / "attn/adapter_model.safetensors"), load_file(saved / "mlp/adapter_model.safetensors")
    assert attn and all(".lisa_" in key for key in attn)
    assert mlp and all(".lora_" in key for key in mlp)
    assert '"peft_type": "LISA"' in (saved / "attn/adapter_config.json").read_text()
    assert '"peft_type": "LORA"' in (saved / "mlp/adapter_config.json").read_text()

    lisa = PeftModel.from_pretrained(tiny_llama(2), saved / "attn", adapter_name="attn")
    loaded = PeftModel.from_pretrained(lisa.get_base_model(), saved / "mlp", adapter_name="mlp")
    assert isinstance(loaded, PeftModelForCausalLM) and list(loaded.peft_config) == ["attn", "mlp"]
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_disable_adapter_gives_the_base_model_and_unload_returns_it(trained):
    model, _ = trained
    base_logits = _logits(tiny_llama(2))
    both = _logits(model)
    assert not torch.equal(both, base_logits)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), base_logits, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model), both, rtol=0, atol=0)  # both back on

    plain = model.unload()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    torch.testing.assert_close(_logits(plain), base_logits, rtol=0, atol=0)


def test_mixed_model_refuses_lisa_and_points_to_stacking():
    with pytest.raises(ValueError, match="LiSA cannot be part of a PeftMixedModel.*stack them"):
        get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[2, 3]), mixed=True)
    mixed = get_peft_model(tiny_llama(2), LoraConfig(target_modules=MLP), mixed=True)
    with pytest.raises(ValueError, match="LiSA with LoRA"):
        mixed.add_adapter("attn", LisaConfig(lisa_layers=[2, 3]))
