"""Training LiSA weights: gradients (with and without checkpointing) and the standard Trainer."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from peft import get_peft_model

from lisa_peft import LisaConfig
from tests.helpers.tiny_models import VOCAB, tiny_llama


def _lisa_grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("share", ["logits", "probs"])
def test_gradient_checkpointing_gives_the_same_gradients(input_ids, use_reentrant, share):
    """A chain of LiSA layers (3 -> 4 -> 5): the FFN of layer 3 gets gradient through the logits
    that layers 4 and 5 read, which checkpointing must not cut."""
    model = get_peft_model(
        tiny_llama(2), LisaConfig(lisa_layers=[3, 4, 5], init_lisa_weights="random", share=share)
    )
    model.train()
    with torch.no_grad():  # make the FFNs non-trivial so every path carries gradient
        for name, param in model.named_parameters():
            if "lisa_ffn" in name:
                param.normal_(std=0.3)
    reference = _lisa_grads(model, input_ids)
    assert all(g.abs().sum() > 0 for g in reference.values())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    checkpointed = _lisa_grads(model, input_ids)
    assert checkpointed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], atol=1e-6, rtol=1e-4, msg=name)


def test_cross_layer_gradient_path_is_real(input_ids):
    """Sanity check of the test above: layer 3's FFN output weights get gradient only via layers 4-5
    when layer 3's own output is cut off from the loss."""
    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[3, 4]))  # identity FFNs pass logits on
    with torch.no_grad():
        model.base_model.model.model.layers[3].self_attn.base_layer.o_proj.weight.zero_()
    grads = _lisa_grads(model, input_ids)
    assert grads["base_model.model.model.layers.3.self_attn.lisa_ffn_down.default.weight"].abs().sum() > 0
    model.set_adapter("default")
    with torch.no_grad():  # cut the chain too: layer 4's FFN no longer reads layer 3's logits
        model.base_model.model.model.layers[4].self_attn.lisa_ffn_down["default"].weight.zero_()
    grads = _lisa_grads(model, input_ids)
    assert grads["base_model.model.model.layers.3.self_attn.lisa_ffn_down.default.weight"].abs().sum() == 0


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        # a learnable pattern: repeated short motifs
        motifs = torch.randint(3, VOCAB, (4, 4), generator=generator)
        picks = torch.randint(0, 4, (n, length // 4), generator=generator)
        self.data = motifs[picks].reshape(n, length)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def _dataset_loss(model, data: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(data, labels=data).loss.item()
    model.train()
    return loss


def _trainer(model, out_dir, max_steps: int, **kwargs) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=8,
        learning_rate=3e-2,
        max_steps=max_steps,
        logging_steps=1,
        save_steps=4,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **kwargs,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_TokenDataset())


def test_trainer_trains_only_lisa_weights_and_loss_falls(tmp_path):
    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[2, 3, 4, 5]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(model, tmp_path, max_steps=12)
    data = _TokenDataset().data
    loss_before = _dataset_loss(model, data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    loss_after = _dataset_loss(model, data)
    assert loss_after < loss_before - 0.05, (loss_before, loss_after, losses)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == ("lisa_" in name), name


def test_trainer_checkpoint_resumes_to_the_same_weights(tmp_path):
    def run(steps_out, resume):
        model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[3, 4]))
        trainer = _trainer(model, steps_out, max_steps=8)
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lisa_" in n}

    straight = run(tmp_path / "a", None)  # saves checkpoint-4 on the way
    checkpoint = tmp_path / "a" / "checkpoint-4"
    assert (checkpoint / "adapter_model.safetensors").exists()
    resumed = run(tmp_path / "b", str(checkpoint))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=1e-5, msg=name)


def test_time_budget_callback_anneals_the_rate_over_the_budget_and_stops_at_its_end(monkeypatch):
    import types

    import lisa_peft.pipeline.training as training_module

    clock = {"now": 100.0}
    monkeypatch.setattr(training_module.time, "monotonic", lambda: clock["now"])
    callback = training_module.TimeBudgetCallback(10.0, anneal=True)
    control = types.SimpleNamespace(should_training_stop=False, should_save=False)
    optimizer = types.SimpleNamespace(param_groups=[{"lr": 1.0}])
    callback.on_train_begin(None, None, control)
    clock["now"] = 105.0  # half the budget: cos factor 0.5
    callback.on_step_end(None, None, control, optimizer=optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5) and not control.should_training_stop
    optimizer.param_groups[0]["lr"] = 1.0  # the Trainer's scheduler sets the rate again every step
    clock["now"] = 110.0
    callback.on_step_end(None, None, control, optimizer=optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert control.should_training_stop and control.should_save
    plain = training_module.TimeBudgetCallback(10.0)
    plain.on_train_begin(None, None, control)
    optimizer.param_groups[0]["lr"] = 1.0
    clock["now"] = 115.0
    plain.on_step_end(None, None, control, optimizer=optimizer)
    assert optimizer.param_groups[0]["lr"] == 1.0
    with pytest.raises(ValueError, match="positive"):
        training_module.TimeBudgetCallback(0)


def test_time_budget_annealing_is_the_learning_rate_the_trainer_logs(tmp_path, monkeypatch):
    """The Trainer logs its scheduler's last rate: with the time budget's cosine that must be the annealed
    rate the optimizer uses, not the constant one (it used to log the recipe's rate at every step)."""
    import lisa_peft.pipeline.training as training_module

    clock = {"now": 0.0}
    monkeypatch.setattr(training_module.time, "monotonic", lambda: clock["now"])

    class Tick(transformers.TrainerCallback):  # one second of "training" per step, read at its end
        def on_step_begin(self, args, state, control, **kwargs):
            clock["now"] += 1.0

    used = []

    class Record(transformers.TrainerCallback):  # the rate the optimizer will use for the next step
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            used.append(optimizer.param_groups[0]["lr"])

    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[3, 4]))
    trainer = _trainer(model, tmp_path, max_steps=6, lr_scheduler_type="constant", save_strategy="no")
    for callback in (Tick(), training_module.TimeBudgetCallback(8.0, anneal=True), Record()):
        trainer.add_callback(callback)
    trainer.train()
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    # rates[k]: the rate of step k + 1 (the first step runs at the recipe's rate, later ones annealed)
    rates = [3e-2] + [3e-2 * 0.5 * (1 + math.cos(math.pi * step / 8.0)) for step in range(1, 7)]
    assert used == pytest.approx(rates[1:])
    # transformers logs the rate a step ran at (5.x) or the one the next step runs at (older releases)
    assert logged == pytest.approx(rates[:6]) or logged == pytest.approx(rates[1:]), logged


@pytest.mark.parametrize("share", ["logits", "probs"])
def test_gradients_without_kept_probabilities_equal_those_with_them(input_ids, share):
    """Training keeps no attention probabilities unless a hook reads them (they are recomputed in the
    backward); the gradients are those of the path that keeps them (a forward hook forces it)."""
    model = get_peft_model(
        tiny_llama(2), LisaConfig(lisa_layers=[2, 3, 5], init_lisa_weights="random", share=share)
    )
    model.train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lisa_ffn" in name:
                param.normal_(std=0.3)
    recomputed = _lisa_grads(model, input_ids)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: seen.append(m) and None)
    try:
        kept = _lisa_grads(model, input_ids)
    finally:
        handle.remove()
    assert seen  # the hook made the layers keep and return their probabilities
    assert kept.keys() == recomputed.keys()
    for name in kept:
        torch.testing.assert_close(recomputed[name], kept[name], atol=1e-6, rtol=1e-5, msg=name)
