"""The LiSA model card: rendering from the template, YAML metadata, and what save_pretrained writes."""

from __future__ import annotations

import re

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model

from lisa_peft import LisaConfig
from lisa_peft.evaluation.memory import kv_cache_bytes, lisa_parameter_count, llama_parameter_count
from lisa_peft.integrations.hub import model_card
from lisa_peft.integrations.hub.hooks import install_hub_hooks
from lisa_peft.integrations.hub.model_card import MODEL_CARD_MARKER, REPO_ID_PLACEHOLDER, render_model_card
from lisa_peft.integrations.registration import register_lisa
from tests.helpers.tiny_models import tiny_llama, tiny_llama_config

EVAL = {"perplexity": {"value": 31.2, "dataset": "tinyshakespeare (held-out 10%)"}}


def _lisa(layers=(2, 3, 5), **kwargs) -> PeftModel:
    return get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=list(layers), **kwargs))


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_rendered_card_metadata_parses_as_a_hub_model_card():
    text = render_model_card(_lisa(), eval_results=EVAL, license="apache-2.0", repo_id="test-org/tiny-lisa")
    card = ModelCard(text)  # parses the YAML front matter like the Hub client does
    data = card.data
    assert data.library_name == "peft"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"
    assert {"lisa", "peft", "cross-layer-attention"} <= set(data.tags)
    assert data.model_name == "test-org/tiny-lisa"
    (result,) = data.eval_results
    assert (result.metric_type, result.metric_value) == ("perplexity", 31.2)
    assert result.dataset_name == "tinyshakespeare (held-out 10%)"
    assert result.task_type == "text-generation"
    index = data.to_dict()["model-index"]
    assert index[0]["results"][0]["metrics"] == [{"type": "perplexity", "value": 31.2}]


def test_card_body_reports_layer_map_config_memory_and_parameters():
    model = _lisa(share="probs")
    config = model.peft_config["default"]
    text = render_model_card(model, repo_id="test-org/tiny-lisa")
    assert MODEL_CARD_MARKER in text
    assert "FALLAL" in text  # layers 0..5: full, anchor, LiSA, LiSA, anchor, LiSA
    assert "- LiSA layers: 2, 3, 5" in text
    assert "- anchor layers: 1, 4" in text
    assert "- full layers (anchors included): 0, 1, 4" in text
    assert f"| rank `r` per head of the low-rank Q/K | {config.r} (2 rotary planes per KV head) |" in text
    assert "16 / 4 = 4.0x" in text
    assert "`probs`" in text and "`identity`" in text
    kv = kv_cache_bytes(tiny_llama_config(), [2, 3, 5], config.r, 1, 4096, torch.float16)
    assert f"| keys + values | {kv.base:,} bytes" in text and f"| {kv.lisa:,} bytes" in text
    assert f"{100 * (1 - kv.ratio):.1f} %" in text
    n_lisa = lisa_parameter_count(tiny_llama_config(), [2, 3, 5], config.r, config.ffn_hidden)
    assert n_lisa == model.get_nb_trainable_parameters()[0]
    n_base = sum(p.numel() for p in tiny_llama(2).parameters())
    assert f"**{n_lisa:,}** LiSA weights" in text and f"{100 * n_lisa / n_base:.3f} %" in text
    assert f"of the {n_base:,} parameters" in text
    # The usage snippet starts with the import that registers LISA and loads from the repo id.
    snippet = _python_blocks(text)[0]
    assert snippet.startswith("import lisa_peft")
    assert 'PeftModel.from_pretrained(base, "test-org/tiny-lisa")' in snippet
    assert "KeyError: 'LISA'" in text
    assert "## Evaluation" not in text  # no eval results given


def test_card_from_config_and_base_config_matches_card_from_model():
    model = _lisa()
    from_model = render_model_card(model)
    from_config = render_model_card(model.peft_config["default"], tiny_llama_config().to_dict())
    assert from_config == from_model  # the analytic base parameter count equals the real one
    assert f'PeftModel.from_pretrained(base, "{REPO_ID_PLACEHOLDER}")' in from_model


def test_untied_and_tied_parameter_count():
    for tied in (False, True):
        cfg = tiny_llama_config(tie_word_embeddings=tied)
        real = sum(p.numel() for p in tiny_llama(2, tie_word_embeddings=tied).parameters())
        assert llama_parameter_count(cfg) == real


def test_card_text_comes_from_the_template_file(tmp_path, monkeypatch):
    template = tmp_path / "lisa_adapter.md"
    template.write_text("---\n{{ card_data }}\n---\nCUSTOM {{ layers.map_line }} r={{ cfg.r }}\n")
    monkeypatch.setattr(model_card, "template_path", lambda: template)
    text = render_model_card(_lisa())
    assert text.endswith("CUSTOM FALLAL r=4\n")
    assert ModelCard(text).data.library_name == "peft"
    assert model_card.template_path.__module__  # the real one is restored by monkeypatch


def test_hub_base_model_and_demo_alias_in_metadata_and_snippet():
    model = _lisa()
    model.peft_config["default"].base_model_name_or_path = "test-org/tiny-llama"
    card = ModelCard(render_model_card(model))
    assert card.data.base_model == "test-org/tiny-llama"
    assert "base_model:adapter:test-org/tiny-llama" in card.data.tags
    assert 'AutoModelForCausalLM.from_pretrained("test-org/tiny-llama")' in card.text

    model.peft_config["default"].base_model_name_or_path = "smollm2-135m-instruct"
    card = ModelCard(render_model_card(model))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert 'resolve_base_model("smollm2-135m-instruct")' in card.text


def test_local_base_path_is_not_written_as_hub_base_model(tmp_path):
    model = _lisa()
    model.peft_config["default"].base_model_name_or_path = str(tmp_path)
    card = ModelCard(render_model_card(model))
    assert card.data.base_model is None
    assert f"`{tmp_path}` is not a Hub model id" in card.text


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="'value' and 'dataset'"):
        render_model_card(_lisa(), eval_results={"perplexity": 31.2})
    lora = get_peft_model(tiny_llama(2), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="needs a LiSA adapter"):
        render_model_card(lora)
    with pytest.raises(ValueError, match="needs base_model_config"):
        render_model_card(_lisa().peft_config["default"])


def test_save_pretrained_writes_the_lisa_card(tmp_path):
    _lisa().save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert MODEL_CARD_MARKER in text
    assert "Provide a quick summary" not in text  # not PEFT's generic template
    assert {"lisa", "peft", "cross-layer-attention"} <= set(ModelCard(text).data.tags)


def test_save_pretrained_keeps_license_and_eval_results_of_a_previous_card(tmp_path):
    model = _lisa()
    (tmp_path / "README.md").write_text(render_model_card(model, eval_results=EVAL, license="mit"))
    model.save_pretrained(tmp_path)
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.license == "mit"
    assert [(r.metric_type, r.metric_value, r.dataset_name) for r in data.eval_results] == [
        ("perplexity", 31.2, "tinyshakespeare (held-out 10%)")
    ]


def test_save_pretrained_keeps_a_hand_written_card_and_adds_lisa_metadata(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My adapter\n\nHand-written.\n")
    _lisa().save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert "Hand-written." in card.text and MODEL_CARD_MARKER not in card.text
    assert card.data.library_name == "peft" and card.data.license == "mit"
    assert card.data.tags[0] == "mine" and {"lisa", "cross-layer-attention"} <= set(card.data.tags)


def test_save_pretrained_replaces_a_generic_peft_card(tmp_path):
    get_peft_model(tiny_llama(2), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    assert "Provide a quick summary" in (tmp_path / "README.md").read_text()  # LoRA: PEFT's own card
    _lisa().save_pretrained(tmp_path)
    assert MODEL_CARD_MARKER in (tmp_path / "README.md").read_text()


def test_card_failure_never_fails_the_save(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("template exploded")

    monkeypatch.setattr(model_card, "render_model_card", broken)
    with pytest.warns(UserWarning, match="template exploded"):
        _lisa().save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert "Provide a quick summary" in (tmp_path / "README.md").read_text()


def test_hooks_wrap_peft_once_and_delegate_for_other_adapters():
    from peft import PeftModel as PM

    for _ in range(2):
        register_lisa()
        install_hub_hooks()
    card_hook = PM.create_or_update_model_card
    original = card_hook.__lisa_peft_original__
    assert not hasattr(original, "__lisa_peft_original__")  # one level of wrapping only
    assert (original.__module__, original.__qualname__) == ("peft.peft_model", "PeftModel.create_or_update_model_card")
    push_original = PM.push_to_hub.__lisa_peft_original__
    assert push_original.__qualname__ == "PushToHubMixin.push_to_hub"
    lora = get_peft_model(tiny_llama(2), LoraConfig(target_modules=["q_proj"]))
    assert lora.create_or_update_model_card.__func__ is card_hook  # the same hook, which delegates for LoRA


def test_a_trainer_card_is_replaced_keeping_its_license_and_results(tmp_path):
    from transformers.modelcard import AUTOGENERATED_TRAINER_COMMENT

    trainer_card = (
        "---\nlicense: apache-2.0\nlibrary_name: peft\nmodel-index:\n- name: out\n  results:\n  - task:\n"
        "      type: text-generation\n    dataset:\n      name: tiny\n      type: tiny\n    metrics:\n"
        "    - type: loss\n      value: 2.5\n---\n" + AUTOGENERATED_TRAINER_COMMENT + "\n# out\n"
    )
    (tmp_path / "README.md").write_text(trainer_card)
    _lisa().save_pretrained(tmp_path)  # what Trainer.create_model_card triggers through PEFT's card hook
    card = ModelCard.load(tmp_path / "README.md")
    assert MODEL_CARD_MARKER in card.text and "Trainer had access to" not in card.text
    assert card.data.license == "apache-2.0"
    assert [(r.metric_type, r.metric_value, r.dataset_name) for r in card.data.eval_results] == [("loss", 2.5, "tiny")]


def test_card_reports_the_fidelity_figures_the_adapter_carries_and_they_survive_push_rendering():
    model = _lisa()
    model.peft_config["default"].layer_scores = {"fidelity": {
        "text": "Python's pydoc topics (embedded corpus)", "in_domain": False, "tokens": 4080, "kl": 0.0812,
        "ppl_ratio": 1.0734, "base_ppl": 11.761, "lisa_ppl": 12.625, "train_steps": 60,
        "zero_shot": {"task": "arc_easy", "questions": 300, "base_acc_norm": 0.55, "lisa_acc_norm": 0.53,
                      "base_acc": 0.6, "lisa_acc": 0.58},
    }}
    text = render_model_card(model, repo_id="org/x")  # no eval_results given: taken from the adapter config
    assert "per-token KL(base ‖ LiSA) **0.0812** nats" in text and "(ratio **1.0734**)" in text
    assert "Python's pydoc topics (embedded corpus)" in text and "domain\nadaptation" not in text
    results = {r.metric_type: r for r in ModelCard(text).data.eval_results}
    assert results["perplexity_ratio_to_base"].metric_value == 1.0734
    assert results["kl_to_base"].dataset_name == "Python's pydoc topics (embedded corpus)"
    assert results["acc_norm"].metric_value == 0.53 and results["base_acc_norm"].dataset_name == "arc_easy"
    model.peft_config["default"].layer_scores["fidelity"]["in_domain"] = True
    assert "measure domain\nadaptation" in render_model_card(model)
    # explicit eval_results still win, and a card without figures has no fidelity paragraph
    assert "KL(base ‖ LiSA) **" not in render_model_card(model, eval_results=EVAL)
    assert "## Evaluation" not in render_model_card(_lisa())
