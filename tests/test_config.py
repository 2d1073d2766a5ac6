"""LisaConfig validation, defaults and PEFT registration."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import lisa_peft
from lisa_peft import LisaConfig, LisaModel
from tests.helpers.tiny_models import tiny_llama


def test_registration_makes_lisa_a_peft_type():
    assert PeftType("LISA") is PeftType.LISA
    assert "LISA" in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LISA] is LisaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LISA] is LisaModel
    assert LisaConfig(lisa_layers=[2]).peft_type == PeftType.LISA


def test_reimport_is_idempotent():
    members = len(list(PeftType))
    lisa_peft.register_lisa()
    assert len(list(PeftType)) == members
    # A reload creates new classes; run it in a fresh interpreter so this process keeps its classes.
    code = (
        "import importlib, lisa_peft; from peft.utils import PeftType;"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as M;"
        "n = len(list(PeftType)); importlib.reload(lisa_peft); lisa_peft.register_lisa();"
        "assert len(list(PeftType)) == n and list(PeftType).count(PeftType.LISA) == 1;"
        "assert M[PeftType.LISA] is lisa_peft.LisaConfig; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "needs `lisa_layers`"),
        ({"lisa_layers": "8"}, "list of layer indices"),
        ({"lisa_layers": []}, "is empty"),
        ({"lisa_layers": [2, 2.5]}, "integers only"),
        ({"lisa_layers": [3, 4, 3]}, "more than once: [3]"),
        ({"lisa_layers": [0, 3]}, "must keep full attention"),
        ({"lisa_layers": [1, 3]}, "first 2 layers"),
        ({"lisa_layers": [3], "min_full_layers": 0}, "must be >= 1"),
        ({"lisa_layers": [3], "r": 5}, "positive even integer"),
        ({"lisa_layers": [3], "r": 0}, "positive even integer"),
        ({"lisa_layers": [3], "r": -2}, "positive even integer"),
        ({"lisa_layers": [3], "ffn_hidden": 0}, "`ffn_hidden` must be a positive integer"),
        ({"lisa_layers": [3], "share": "attention"}, "`share` must be one of 'logits', 'probs'"),
        ({"lisa_layers": [3], "init_lisa_weights": "zeros"}, "`init_lisa_weights` must be one of"),
        ({"lisa_layers": [3], "kernel": "cuda"}, "`kernel` must be one of"),
        ({"lisa_layers": [3], "lisa_dtype": "int8"}, "`lisa_dtype` must be one of"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError) as info:
        LisaConfig(**kwargs)
    assert message in str(info.value)


def test_lower_min_full_layers_allows_layer_one():
    assert LisaConfig(lisa_layers=[1], min_full_layers=1).lisa_layers == [1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lisa_layers": [6]}, "has 6 layers (0..5)"),
        ({"lisa_layers": [3], "r": 18}, "larger than the head dimension 16"),
    ],
)
def test_model_dependent_errors(kwargs, message):
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_llama(), LisaConfig(**kwargs))
    assert message in str(info.value)


def test_unsupported_architecture_names_supported_ones():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"supports LLaMA-architecture models \(model_type in \['llama'\]\)"):
        get_peft_model(gpt2, LisaConfig(lisa_layers=[3]))


def test_identity_init_needs_wide_enough_ffn():
    with pytest.raises(ValueError, match="ffn_hidden >= 2 \\* num_heads = 8"):
        get_peft_model(tiny_llama(), LisaConfig(lisa_layers=[3], ffn_hidden=6))


def test_defaults_are_resolved_and_saved(tmp_path):
    model = get_peft_model(tiny_llama(num_kv_heads=2), LisaConfig(lisa_layers=[4, 3]))
    config = model.peft_config["default"]
    assert config.lisa_layers == [3, 4]
    assert config.r == 4  # head_dim 16 / 6 = 2.67 -> 4 (even)
    assert config.ffn_hidden == 8  # 2 * H
    assert sorted(config.rotary_planes) == ["3", "4"]
    assert all(len(p) == 2 and len(p[0]) == 2 for p in config.rotary_planes.values())  # [G][r/2]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LISA"
    assert saved["r"] == 4 and saved["rotary_planes"] == config.rotary_planes
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LisaConfig) and loaded.rotary_planes == config.rotary_planes


def test_default_rank_matches_six_fold_compression():
    from lisa_peft.tuners.lisa.model import default_rank

    assert default_rank(128) == 22  # LLaMA-2/3
    assert default_rank(64) == 12  # SmolLM2
    assert all(default_rank(d) % 2 == 0 and default_rank(d) >= d / 6 for d in range(2, 257, 2))


def test_init_lisa_weights_annotation_lists_every_accepted_mode():
    """The type hint (read by IDEs, dataclass tooling and HfArgumentParser) must admit what the config accepts."""
    import typing

    from lisa_peft.tuners.lisa.config import INIT_MODES

    hints = typing.get_type_hints(LisaConfig)
    assert set(typing.get_args(hints["init_lisa_weights"])) == set(INIT_MODES)
