"""Taking LiSA out of a model restores its decoder stack exactly: every way out goes through one teardown."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from lisa_peft import LisaConfig
from lisa_peft.tuners.lisa.model import backbone, remove_lisa_adapter
from tests.helpers.tiny_models import tiny_llama


def stack_state(model: torch.nn.Module) -> dict:
    """What LiSA's injection changes on the decoder stack and the model: instance attributes and pre-hooks."""
    stack = backbone(model)
    return {
        "stack attributes": sorted(key for key in stack.__dict__ if not key.startswith("_")),
        "stack private attributes": sorted(key for key in stack.__dict__ if key.startswith("_lisa")),
        "stack forward is the class's": "forward" not in stack.__dict__,
        "stack pre-hooks": len(stack._forward_pre_hooks),
        "model guard": "init_continuous_batching" in model.__dict__,
    }


@pytest.mark.parametrize("way_out", ["remove_lisa_adapter", "unload", "merge_and_unload"])
def test_every_way_out_restores_the_decoder_stack_as_it_was(way_out: str) -> None:
    base = tiny_llama()
    before = stack_state(base)
    ids = torch.randint(3, 64, (1, 12))
    with torch.no_grad():
        expected = base(ids).logits
    model = get_peft_model(base, LisaConfig(lisa_layers=[3, 4, 5]))
    assert stack_state(base) != before  # the injection did install its hooks
    if way_out == "remove_lisa_adapter":
        remove_lisa_adapter(model.base_model.model, "default")
        restored = base
    elif way_out == "unload":
        restored = model.unload()
    else:
        compact = model.merge_and_unload()
        assert compact is not base
        restored = model.unload()
    assert stack_state(restored) == before
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, expected)
