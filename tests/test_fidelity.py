"""Fidelity metrics (KL, perplexity ratio), zero-shot multiple choice, sampled corpus, cached-teacher distillation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from lisa_peft import LisaConfig
from lisa_peft.evaluation.fidelity import measure_fidelity
from lisa_peft.evaluation.zero_shot import (
    MultipleChoice,
    compare_zero_shot,
    load_multiple_choice_jsonl,
    zero_shot_accuracy,
)
from lisa_peft.pipeline.sampled_corpus import model_fingerprint, sample_windows, sampled_windows
from lisa_peft.pipeline.training import (
    LisaTrainer,
    TokenWindowDataset,
    cache_teacher_topk,
    distillation_kl,
    topk_distillation_kl,
)
from tests.helpers.tiny_assets import char_tokenizer
from tests.helpers.tiny_models import VOCAB, tiny_llama


def _lisa(seed: int = 0, init: str = "random", scramble: bool = True):
    """A tiny LiSA model; `scramble`: LiSA weights random enough that LiSA clearly differs from the base."""
    base = tiny_llama(num_kv_heads=2, num_layers=4, seed=seed)
    model = get_peft_model(base, LisaConfig(lisa_layers=[2, 3], init_lisa_weights=init))
    if scramble:
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lisa_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _windows(n: int = 4, t: int = 16) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(3))


def test_fidelity_is_exactly_the_base_model_when_lisa_equals_base_and_matches_a_direct_computation():
    model = _lisa()
    windows = _windows()
    report = measure_fidelity(model, windows, "random ids")
    with torch.no_grad():
        with model.disable_adapter():
            log_p = model(windows).logits[:, :-1].log_softmax(-1)
        log_q = model(windows).logits[:, :-1].log_softmax(-1)
    y = windows[:, 1:, None]
    assert report.tokens == windows.shape[0] * (windows.shape[1] - 1)
    assert report.base_ppl == pytest.approx(math.exp(-log_p.gather(-1, y).mean().item()), rel=1e-5)
    assert report.lisa_ppl == pytest.approx(math.exp(-log_q.gather(-1, y).mean().item()), rel=1e-5)
    assert report.kl == pytest.approx((log_p.exp() * (log_p - log_q)).sum(-1).mean().item(), rel=1e-4, abs=1e-7)
    assert report.kl > 0 and report.ppl_ratio == pytest.approx(report.lisa_ppl / report.base_ppl)
    assert report.as_dict()["text"] == "random ids"


def test_fidelity_rejects_bad_input():
    model = _lisa()
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        measure_fidelity(model, torch.zeros(5, dtype=torch.long), "x")
    with pytest.raises(TypeError, match="disable_adapter"):
        measure_fidelity(tiny_llama(num_layers=4), _windows(), "x")


def test_topk_kl_equals_the_full_kl_when_k_is_the_whole_vocabulary_and_is_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 40, generator=g) * 3, torch.randn(2, 5, 40, generator=g) * 3
    full = distillation_kl(student, teacher)
    top = teacher.log_softmax(-1).topk(40, -1)
    assert topk_distillation_kl(student, top.values, top.indices).item() == pytest.approx(full.item(), rel=1e-5)
    top8 = teacher.log_softmax(-1).topk(8, -1)
    partial = topk_distillation_kl(student, top8.values, top8.indices).item()
    assert 0 < partial <= full.item() + 1e-6  # coarsening never increases a KL
    assert topk_distillation_kl(teacher, top8.values, top8.indices).item() == pytest.approx(0.0, abs=1e-6)


def test_trainer_with_cached_teacher_computes_the_same_loss_as_with_a_teacher_forward(tmp_path):
    import transformers

    model = _lisa(init="random")
    windows = _windows(8, 12)
    teacher = cache_teacher_topk(model, windows, k=VOCAB)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    with_cache = LisaTrainer(model=model, args=args, train_dataset=TokenWindowDataset(windows, teacher))
    without = LisaTrainer(model=model, args=args, train_dataset=TokenWindowDataset(windows))
    batch_cached = with_cache.data_collator([with_cache.train_dataset[i] for i in range(4)])
    batch_plain = without.data_collator([without.train_dataset[i] for i in range(4)])
    assert with_cache.distill_weight == 1.0  # distillation is the default objective
    loss_cached = with_cache.compute_loss(model, batch_cached)
    loss_plain = without.compute_loss(model, batch_plain)
    assert loss_cached.item() == pytest.approx(loss_plain.item(), rel=1e-4)
    assert loss_cached.item() > 0
    with pytest.raises(ValueError, match="cache_teacher_topk"):
        TokenWindowDataset(windows[:4], teacher)


def test_trainer_train_uses_the_cached_teacher_and_never_runs_a_teacher_forward(tmp_path):
    """Regression: the Trainer's remove_unused_columns dropped the teacher fields, so every step ran a
    full-vocabulary teacher forward (2.7x slower on the demo) while the cache sat unused."""
    import transformers

    model = _lisa(init="random")
    windows = _windows(8, 12)
    dataset = TokenWindowDataset(windows, cache_teacher_topk(model, windows, k=8))

    def no_teacher_forward():
        raise AssertionError("a teacher forward ran although cached teacher outputs were given")

    model.disable_adapter = no_teacher_forward
    trainer = LisaTrainer(
        model=model, train_dataset=dataset,
        args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2,
                                            per_device_train_batch_size=4, save_strategy="no"),
    )
    trainer.train()
    assert trainer.state.global_step == 2


def test_trainer_with_cached_teacher_lowers_the_held_out_kl(tmp_path):
    import transformers

    model = _lisa(init="random")
    for name, p in model.named_parameters():
        p.requires_grad_("lisa_" in name)
    train, held_out = _windows(32, 16), _windows(8, 16).flip(0)
    before = measure_fidelity(model, held_out, "ids").kl
    trainer = LisaTrainer(
        model=model,
        args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=20,
                                            learning_rate=1e-2, per_device_train_batch_size=8, save_strategy="no"),
        train_dataset=TokenWindowDataset(train, cache_teacher_topk(model, train, k=VOCAB)),
    )
    trainer.train()
    assert measure_fidelity(model, held_out, "ids").kl < 0.8 * before


def test_sampled_windows_are_the_models_own_text_are_cached_and_extend_as_a_prefix(tmp_path, monkeypatch):
    import lisa_peft.pipeline.sampled_corpus as sc

    monkeypatch.setattr(sc, "BATCH", 2)
    model, tokenizer = tiny_llama(num_layers=2, vocab_size=len(char_tokenizer()), bos_token_id=1, eos_token_id=2,
                                  pad_token_id=2), char_tokenizer()
    windows = sampled_windows(model, tokenizer, num_sequences=3, seq_len=10, seed=5, cache_dir=tmp_path, progress=False)
    assert windows.shape == (3, 10) and bool((windows[:, 0] == tokenizer.bos_token_id).all())
    assert not bool((windows[:, 1:] == tokenizer.eos_token_id).any())  # EOS suppressed until the window is full
    files = list(tmp_path.glob("samples-*.pt"))
    assert len(files) == 1 and model_fingerprint(model) in files[0].name
    assert torch.load(files[0]).shape == (4, 10)  # whole batches are kept
    assert torch.equal(sampled_windows(model, tokenizer, 3, 10, seed=5, cache_dir=tmp_path, progress=False), windows)
    assert torch.equal(sample_windows(model, tokenizer, 3, 10, seed=5, progress=False), windows)  # deterministic
    longer = sampled_windows(model, tokenizer, 7, 10, seed=5, cache_dir=tmp_path, progress=False)
    assert torch.equal(longer[:3], windows) and torch.equal(longer, sample_windows(model, tokenizer, 7, 10, seed=5,
                                                                                      progress=False))
    assert torch.load(files[0]).shape == (8, 10)
    assert not torch.equal(sample_windows(model, tokenizer, 3, 10, seed=6, progress=False), windows)
    other = tiny_llama(num_layers=2, seed=1, vocab_size=len(tokenizer))
    assert model_fingerprint(other) != model_fingerprint(model)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="seq_len"):
        sample_windows(model, tokenizer, 1, 1)


def _questions() -> list[MultipleChoice]:
    return [
        MultipleChoice("ab", ("cd", "ef", "gh"), 0),
        MultipleChoice("xyz?", ("no", "yes it is"), 1),
        MultipleChoice("q", ("a", "bb", "ccc", "d"), 3),
    ]


def test_zero_shot_scores_each_choice_by_its_continuation_loglikelihood():
    tokenizer = char_tokenizer()
    model = tiny_llama(num_layers=2, vocab_size=len(tokenizer))
    questions = _questions()
    result = zero_shot_accuracy(model, tokenizer, questions, batch_size=3)
    # Independent computation: one unpadded forward per (question, choice).
    correct = correct_norm = 0
    for q in questions:
        scores = []
        for choice in q.choices:
            context = tokenizer(f"Question: {q.question}\nAnswer:", add_special_tokens=False)["input_ids"]
            whole = tokenizer(f"Question: {q.question}\nAnswer: {choice}", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                log_probs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(log_probs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        correct += max(range(len(scores)), key=scores.__getitem__) == q.answer
        correct_norm += max(range(len(scores)), key=lambda i: scores[i] / len(q.choices[i])) == q.answer
    assert result.questions == 3
    assert result.acc == pytest.approx(correct / 3) and result.acc_norm == pytest.approx(correct_norm / 3)


def test_compare_zero_shot_is_identical_for_an_adapter_equal_to_the_base():
    tokenizer = char_tokenizer()
    base = tiny_llama(num_layers=4, vocab_size=len(tokenizer))
    model = get_peft_model(base, LisaConfig(lisa_layers=[2, 3], init_lisa_weights="random"))
    for name, p in model.named_parameters():
        if "lisa_" in name:
            torch.nn.init.zeros_(p)  # delta = 0, FFN = 0: LiSA layers attend uniformly (differs from base)
    results = compare_zero_shot(model, tokenizer, _questions())
    with model.disable_adapter():
        assert zero_shot_accuracy(model, tokenizer, _questions()) == results["base"]
    assert set(results) == {"base", "lisa"}


def test_multiple_choice_file_loading_and_errors(tmp_path):
    good = tmp_path / "arc.jsonl"
    rows = [{"question": "Q1", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"},
            {"question": "Q2", "choices": {"text": ["c", "d", "e"], "label": ["1", "2", "3"]}, "answerKey": "1"}]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loaded = load_multiple_choice_jsonl(good)
    assert loaded == [MultipleChoice("Q1", ("a", "b"), 1), MultipleChoice("Q2", ("c", "d", "e"), 0)]
    assert len(load_multiple_choice_jsonl(good, limit=1)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "C"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not an ARC-style question"):
        load_multiple_choice_jsonl(bad)
    with pytest.raises(FileNotFoundError):
        load_multiple_choice_jsonl(tmp_path / "missing.jsonl")


def test_distillation_helpers_agree_with_torch_kl_div():
    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    expected = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none")
    expected = expected.sum(-1).mean()
    assert distillation_kl(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
