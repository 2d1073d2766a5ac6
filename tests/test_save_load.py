"""Saving and loading LiSA adapters with PEFT's own APIs."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from lisa_peft import LisaConfig
from tests.helpers.tiny_models import tiny_llama


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _trained_lisa(kv_heads: int = 2, **kwargs):
    model = get_peft_model(tiny_llama(kv_heads), LisaConfig(lisa_layers=[2, 3, 5], **kwargs))
    with torch.no_grad():  # stand-in for training: move every LiSA weight away from its init
        for name, param in model.named_parameters():
            if "lisa_" in name:
                param.add_(torch.randn_like(param) * 0.05)
    return model


def test_save_writes_only_lisa_weights(tmp_path):
    model = _trained_lisa()
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors and all(".lisa_" in key for key in tensors)
    assert {key.split(".self_attn.")[1] for key in tensors} == {
        "lisa_ffn_up.weight", "lisa_ffn_up.bias", "lisa_ffn_down.weight", "lisa_ffn_down.bias",
        "lisa_q_proj.weight", "lisa_k_proj.weight",
    }
    assert sum(t.numel() for t in tensors.values()) == model.get_nb_trainable_parameters()[0]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LISA" and config["lisa_layers"] == [2, 3, 5]


def test_save_then_load_gives_the_same_logits(tmp_path, kv_heads, input_ids):
    model = _trained_lisa(kv_heads, share="probs")
    expected = _logits(model, input_ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(kv_heads), tmp_path)
    assert isinstance(PeftConfig.from_pretrained(tmp_path), LisaConfig)
    torch.testing.assert_close(_logits(loaded, input_ids), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default


def test_load_adapter_adds_a_second_named_adapter(tmp_path, input_ids):
    first = _trained_lisa()
    first.save_pretrained(tmp_path / "a")
    expected_a = _logits(first, input_ids)
    second = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[4, 5], init_lisa_weights="random"))
    expected_b = _logits(second, input_ids)
    second.save_pretrained(tmp_path / "b")

    model = PeftModel.from_pretrained(tiny_llama(2), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.set_adapter("b")
    torch.testing.assert_close(_logits(model, input_ids), expected_b, atol=0, rtol=0)
    model.set_adapter("a")
    torch.testing.assert_close(_logits(model, input_ids), expected_a, atol=0, rtol=0)


def test_auto_peft_model_and_fresh_process_load(tmp_path, input_ids):
    base = tiny_llama(2)
    base.save_pretrained(tmp_path / "base")
    model = _trained_lisa()
    expected = _logits(model, input_ids)
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(_logits(auto, input_ids), expected, atol=0, rtol=0)

    torch.save(input_ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch, lisa_peft; from peft import AutoPeftModelForCausalLM;"
        f"m = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'adapter')!r}).eval();"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r});"
        f"torch.save(m(ids).logits.detach(), {str(tmp_path / 'out.pt')!r})"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=0, rtol=0)
