"""What an adapter trades (`lisa_peft.evaluation.operating_point`): figures that agree with the real compact
model and cache, the one-line description, and `lisa-peft analyze --adapter`."""

from __future__ import annotations

import dataclasses
import json

import torch
import transformers
from peft import get_peft_model

from lisa_peft import LisaConfig
from lisa_peft.cli import main
from lisa_peft.compact.merge import parameter_bytes
from lisa_peft.evaluation.memory import model_kv_cache_bytes
from lisa_peft.evaluation.operating_point import model_operating_point, operating_point
from tests.helpers.tiny_models import tiny_llama


def _model(**kwargs):
    return get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[2, 3, 5], **kwargs)).eval()


def test_figures_agree_with_the_compact_model_and_the_cache():
    model = _model(layer_ranks={3: 2})
    point = model_operating_point(model)
    kv = model_kv_cache_bytes(model, batch_size=1, seq_len=1, dtype=torch.float16)
    assert (point.kv_bytes_per_token_base, point.kv_bytes_per_token_lisa) == (kv.base, kv.lisa)
    assert point.ranks == {2: 4, 3: 2, 5: 4} and point.qk_compression == 16 / (10 / 3)
    assert point.fraction == 0.5 and point.key_cache_saving > 0 and point.parameter_saving > 0
    # from the configs alone (no weights) the figures are the same
    from_configs = operating_point(model.peft_config["default"], tiny_llama(2).config)
    assert dataclasses.asdict(from_configs) == dataclasses.asdict(point)
    assert point.parameters_base == sum(p.numel() for p in tiny_llama(2).parameters())
    assert point.parameters_compact * 4 == parameter_bytes(model.merge_and_unload())  # float32 weights


def test_description_names_every_trade_and_the_recorded_fidelity():
    model = _model(r=8)
    config = model.peft_config["default"]
    config.layer_scores = {"fidelity": {"text": "pydoc", "ppl_ratio": 1.0312, "kl": 0.0415, "zero_shot": {
        "task": "arc_easy", "lisa_acc_norm": 0.41, "base_acc_norm": 0.43}}}
    line = model_operating_point(model).describe()
    assert line.startswith("3 of 6 layers LiSA (50%) · Q/K compression 2x (r = 8 of head_dim 16)")
    assert "KV cache -" in line and "compact model parameters -" in line
    assert "held-out perplexity ratio 1.031, KL 0.0415 on pydoc" in line
    assert "arc_easy acc_norm 0.410 (base 0.430)" in line


def test_cli_analyze_adapter_reads_configs_only(tmp_path, capsys):
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    tiny_llama(2).save_pretrained(base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)  # the adapter records this folder
    model = get_peft_model(base, LisaConfig(lisa_layers=[2, 3, 5]))
    model.save_pretrained(adapter_dir)
    assert main(["analyze", "--adapter", str(adapter_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("3 of 6 layers LiSA (50%)") and str(out / "operating_point.json") in printed
    saved = json.loads((out / "operating_point.json").read_text())
    assert saved["lisa_layers"] == 3 and saved["ranks"] == {"2": 4, "3": 4, "5": 4} and saved["qk_compression"] == 4
    assert main(["analyze", "--adapter", str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "lisa-peft analyze:" in capsys.readouterr().err


def test_rank_text_and_the_demo_row_name_uniform_and_per_layer_ranks():
    from lisa_peft.evaluation.operating_point import rank_text
    from lisa_peft.pipeline.demo import _compression_row

    assert rank_text({2: 16, 3: 16}) == "16"
    assert rank_text({2: 8, 3: 2, 5: 6}) == "2-8 per layer, mean 5.33"
    row = _compression_row(model_operating_point(_model(layer_ranks={3: 2})).as_dict())
    assert row == [("Q/K compression of the LiSA layers (head_dim / r)",
                    "4.80x (r = 2-4 per layer, mean 3.33, head_dim 16)")]
    assert _compression_row(None) == []
