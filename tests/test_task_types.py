"""LiSA under every LLaMA head: the task type picks PEFT's wrapper, classification heads train and save as in LoRA
(`modules_to_save`), and the causal-LM default on a model that cannot generate names the task type to set."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from lisa_peft import LisaConfig
from lisa_peft.tuners.lisa.checkpoint import LisaCheckpointError
from tests.helpers.tiny_models import tiny_llama, tiny_llama_config

LAYERS = [2, 3, 5]
IDS = torch.tensor([[5, 17, 3, 90, 42, 7, 64, 11], [9, 8, 31, 4, 77, 12, 50, 6]])

# model class, task type, PeftModel class, head module (None: no head), output field
HEADS = [
    (transformers.LlamaForSequenceClassification, "SEQ_CLS", "PeftModelForSequenceClassification", "score", "logits"),
    (transformers.LlamaForTokenClassification, "TOKEN_CLS", "PeftModelForTokenClassification", "score", "logits"),
    (transformers.LlamaForQuestionAnswering, "QUESTION_ANS", "PeftModelForQuestionAnswering", "qa_outputs",
     "start_logits"),
    (transformers.LlamaModel, "FEATURE_EXTRACTION", "PeftModelForFeatureExtraction", None, "last_hidden_state"),
]
HEAD_IDS = ["seq_cls", "token_cls", "question_ans", "feature_extraction"]


def _base(model_cls: type, seed: int = 0, head_seed: int | None = None) -> torch.nn.Module:
    """A tiny model of `model_cls`; `head_seed` re-draws the task head (a fresh head, as from_pretrained gives)."""
    torch.manual_seed(seed)
    model = model_cls(tiny_llama_config(2, num_labels=3)).eval()
    if head_seed is not None:
        torch.manual_seed(head_seed)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features in (2, 3):
                module.reset_parameters()
    return model


def _labels(model_cls: type) -> dict[str, torch.Tensor]:
    if model_cls is transformers.LlamaForSequenceClassification:
        return {"labels": torch.tensor([0, 2])}
    if model_cls is transformers.LlamaForTokenClassification:
        return {"labels": torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1]] * 2)}
    if model_cls is transformers.LlamaForQuestionAnswering:
        return {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 5])}
    return {}


def _loss(model_cls: type, output) -> torch.Tensor:
    return output.loss if model_cls is not transformers.LlamaModel else output.last_hidden_state.pow(2).mean()


def _train_step(model: torch.nn.Module, model_cls: type) -> None:
    """Two SGD steps on everything trainable."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        _loss(model_cls, model(input_ids=IDS, **_labels(model_cls))).backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def _output(model: torch.nn.Module, field: str) -> torch.Tensor:
    return getattr(model(input_ids=IDS), field)


@pytest.mark.parametrize(("model_cls", "task_type", "wrapper", "head", "field"), HEADS, ids=HEAD_IDS)
def test_each_head_trains_saves_and_reloads(tmp_path, model_cls, task_type, wrapper, head, field):
    model = get_peft_model(_base(model_cls), LisaConfig(lisa_layers=LAYERS, task_type=task_type))
    assert type(model).__name__ == wrapper
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lisa_ffn_up." in n for n in trainable) and not any(".q_proj." in n for n in trainable)
    head_params = {n for n in trainable if "lisa_" not in n}
    if head is None:
        assert head_params == set()
    else:  # the head trains as LoRA's does: a modules_to_save copy
        assert head_params and all(f"{head}.modules_to_save.default." in n for n in head_params)
        assert head in model.peft_config["default"].modules_to_save
    head_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in head_params}
    _train_step(model, model_cls)
    for name, before in head_before.items():
        assert not torch.equal(model.get_parameter(name), before), f"{name} did not train"
    expected = _output(model, field)

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    if head is not None:
        assert any(k.startswith(f"base_model.model.{head}.") for k in saved)
    fresh = _base(model_cls, head_seed=123)  # same body, another random head
    assert not torch.allclose(_output(fresh, field), expected)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(does not use|does not know).*")
        loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert type(loaded).__name__ == wrapper
    torch.testing.assert_close(_output(loaded, field), expected, atol=1e-6, rtol=0)


def test_seq_cls_adapter_through_transformers_load_adapter(tmp_path):
    """transformers' `base.load_adapter` path: the head loads (no unused-tensor warning); a file without the
    head is refused instead of leaving it at its random init."""
    model = get_peft_model(_base(transformers.LlamaForSequenceClassification),
                           LisaConfig(lisa_layers=LAYERS, task_type="SEQ_CLS"))
    _train_step(model, transformers.LlamaForSequenceClassification)
    expected = _output(model, "logits")
    model.save_pretrained(tmp_path)
    base = _base(transformers.LlamaForSequenceClassification, head_seed=123)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(does not use|does not know).*")
        base.load_adapter(str(tmp_path))
    torch.testing.assert_close(_output(base, "logits"), expected, atol=1e-6, rtol=0)

    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if ".score." not in k}, path, metadata={"format": "pt"})
    with pytest.raises(LisaCheckpointError, match=r"modules_to_save.*missing.*score\.weight"):
        _base(transformers.LlamaForSequenceClassification).load_adapter(str(tmp_path))
    with pytest.raises(KeyError, match="score"):  # PEFT's own loader refuses it too
        PeftModel.from_pretrained(_base(transformers.LlamaForSequenceClassification), tmp_path)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
@pytest.mark.parametrize(("model_cls", "expected"), [(h[0], h[1]) for h in HEADS], ids=HEAD_IDS)
def test_causal_lm_task_type_on_another_model_names_the_task_type(model_cls, expected, task_type):
    with pytest.raises(ValueError, match=rf"{model_cls.__name__} is not a causal language model.*"
                                         rf"task_type='{expected}'"):
        get_peft_model(_base(model_cls), LisaConfig(lisa_layers=LAYERS, task_type=task_type))


def test_loading_a_causal_lm_adapter_onto_a_classifier_names_the_task_type(tmp_path):
    get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=LAYERS)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="task_type='SEQ_CLS'"):
        PeftModel.from_pretrained(_base(transformers.LlamaForSequenceClassification), tmp_path)


def test_causal_lm_default_still_gives_the_causal_lm_wrapper():
    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=LAYERS))
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert model.generate(IDS[:1], max_new_tokens=2, do_sample=False).shape == (1, 10)


@pytest.mark.parametrize(("model_cls", "task_type"), [(h[0], h[1]) for h in HEADS], ids=HEAD_IDS)
def test_merge_and_unload_of_a_non_causal_lm_is_a_clear_error(model_cls, task_type):
    model = get_peft_model(_base(model_cls), LisaConfig(lisa_layers=LAYERS, task_type=task_type))
    with pytest.raises(ValueError, match=rf"{model_cls.__name__} \(task_type='{task_type}'\), which has no compact"):
        model.merge_and_unload()


def test_modules_to_save_on_a_causal_lm_merges_its_trained_copy():
    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=LAYERS, modules_to_save=["lm_head"]))
    _train_step_lm(model)
    compact = model.merge_and_unload()
    torch.testing.assert_close(_output(compact, "logits"), _output(model, "logits"), atol=1e-5, rtol=0)
    assert not torch.equal(compact.lm_head.weight, tiny_llama(2).lm_head.weight)


def test_modules_to_save_of_a_tied_head_is_not_merged_silently():
    model = get_peft_model(tiny_llama(2, tie_word_embeddings=True),
                           LisaConfig(lisa_layers=LAYERS, modules_to_save=["lm_head"]))
    _train_step_lm(model)
    with pytest.raises(ValueError, match=r"ties \['lm_head.weight'\].*modules_to_save=\['lm_head'\]"):
        model.merge_and_unload()


def _train_step_lm(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.eval()
