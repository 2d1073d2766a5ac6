"""Loading never silently changes the model: each broken adapter is refused (or warned about) on every
loading path a user takes. Paths: `PeftModel.from_pretrained`, `PeftModel.load_adapter`,
`AutoPeftModelForCausalLM.from_pretrained`, transformers' `base.load_adapter`, `lisa_peft.from_pretrained`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from peft import AutoPeftModelForCausalLM, PeftModel, PeftModelForCausalLM, get_peft_model
from safetensors.torch import load_file, save, save_file

import lisa_peft
from lisa_peft import LisaAttention, LisaConfig
from lisa_peft.integrations.hub import InvalidAdapterConfigError, UnsafeAdapterFormatError
from lisa_peft.tuners.lisa.checkpoint import LisaCheckpointError
from tests.helpers.tiny_models import tiny_llama

IDS = torch.tensor([[5, 17, 3, 90, 42, 7, 64, 1]])
WEIGHTS = "adapter_model.safetensors"
FFN_UP = "base_model.model.model.layers.3.self_attn.lisa_ffn_up.weight"


def _base(base_dir: Path) -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny_llama(2).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def good_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = get_peft_model(_base(base_dir), LisaConfig(lisa_layers=[2, 3, 5]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lisa_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    path = tmp_path_factory.mktemp("good")
    model.save_pretrained(path)
    return path


def _peft_from_pretrained(adapter: Path, base_dir: Path, good: Path) -> torch.nn.Module:
    return PeftModel.from_pretrained(_base(base_dir), adapter)


def _peft_load_adapter(adapter: Path, base_dir: Path, good: Path) -> torch.nn.Module:
    model = PeftModel.from_pretrained(_base(base_dir), good, adapter_name="first")
    model.load_adapter(adapter, adapter_name="second")
    model.set_adapter("second")
    return model


def _auto_peft(adapter: Path, base_dir: Path, good: Path) -> torch.nn.Module:
    return AutoPeftModelForCausalLM.from_pretrained(adapter)


def _transformers_load_adapter(adapter: Path, base_dir: Path, good: Path) -> torch.nn.Module:
    base = _base(base_dir)
    base.load_adapter(str(adapter))
    return base


def _lisa_from_pretrained(adapter: Path, base_dir: Path, good: Path) -> torch.nn.Module:
    return lisa_peft.from_pretrained(adapter)


PATHS: dict[str, Callable[[Path, Path, Path], torch.nn.Module]] = {
    "PeftModel.from_pretrained": _peft_from_pretrained,
    "PeftModel.load_adapter": _peft_load_adapter,
    "AutoPeftModelForCausalLM": _auto_peft,
    "transformers load_adapter": _transformers_load_adapter,
    "lisa_peft.from_pretrained": _lisa_from_pretrained,
}


@pytest.fixture(params=list(PATHS), ids=list(PATHS))
def load(request, base_dir, good_dir) -> Callable[[Path], torch.nn.Module]:
    return lambda adapter: PATHS[request.param](adapter, base_dir, good_dir)


def _variant(good: Path, tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    path = tmp_path / "variant"
    shutil.copytree(good, path)
    if edit is not None:
        tensors = load_file(path / WEIGHTS)
        edit(tensors)
        save_file(tensors, path / WEIGHTS)
    return path


def _drop(tensors):
    del tensors[FFN_UP]


def _reshape(tensors):
    tensors[FFN_UP] = tensors[FFN_UP][:, :-1].contiguous()


def _integer(tensors):
    tensors[FFN_UP] = tensors[FFN_UP].to(torch.int32)


def _nan(tensors):
    tensors[FFN_UP][0, 0] = float("nan")


def _inf(tensors):
    tensors[FFN_UP][1, 1] = float("-inf")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop, "missing: model.layers.3.self_attn.lisa_ffn_up.weight"),
        (_reshape, r"lisa_ffn_up.weight has shape \[8, 3\], the model needs \[8, 4\]"),
        (_integer, "lisa_ffn_up.weight is torch.int32"),
        (_nan, "NaN or inf values in model.layers.3.self_attn.lisa_ffn_up.weight"),
        (_inf, "NaN or inf values in model.layers.3.self_attn.lisa_ffn_up.weight"),
    ],
    ids=["missing", "shape", "dtype", "nan", "inf"],
)
def test_broken_tensors_are_refused_naming_file_tensor_and_fix(load, good_dir, tmp_path, edit, message):
    adapter = _variant(good_dir, tmp_path, edit)
    with pytest.raises(LisaCheckpointError, match=message) as err:
        load(adapter)
    assert str(adapter / WEIGHTS) in str(err.value)
    assert "model.save_pretrained" in str(err.value)  # the fix


def test_pickle_only_folder_is_refused_without_unpickling(load, good_dir, tmp_path, monkeypatch):
    adapter = _variant(good_dir, tmp_path)
    (adapter / WEIGHTS).unlink()
    torch.save({"not_lisa": torch.ones(2)}, adapter / "adapter_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("adapter_model.bin was unpickled"))
    with pytest.raises(UnsafeAdapterFormatError, match="only adapter_model.bin") as err:
        load(adapter)
    assert "save_pretrained" in str(err.value)


def test_unknown_tensors_warn_naming_them_and_the_rest_loads(load, base_dir, good_dir, tmp_path):
    def add(tensors):
        tensors["base_model.model.model.layers.2.self_attn.lisa_extra.weight"] = torch.ones(3)

    adapter = _variant(good_dir, tmp_path, add)
    with pytest.warns(UserWarning, match=r"does not use; they were ignored: .*lisa_extra.weight"):
        model = load(adapter)
    expected = _logits(PeftModel.from_pretrained(_base(base_dir), good_dir))
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)


def test_unknown_config_keys_warn_naming_them(load, good_dir, tmp_path):
    adapter = _variant(good_dir, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lisa_rank_typo": 8}))
    with pytest.warns(UserWarning, match=r"a LiSA config does not know; they were ignored: \['lisa_rank_typo'\]"):
        load(adapter)


def test_config_that_is_not_json_is_a_clear_error(load, good_dir, tmp_path):
    adapter = _variant(good_dir, tmp_path)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LISA", ')
    with pytest.raises(InvalidAdapterConfigError, match="is not valid JSON") as err:
        load(adapter)
    assert str(adapter / "adapter_config.json") in str(err.value)
    assert isinstance(err.value, json.JSONDecodeError)  # code that caught PEFT's error still does


def test_a_refused_load_adapter_leaves_the_model_as_it_was(base_dir, good_dir, tmp_path):
    broken = _variant(good_dir, tmp_path, _drop)
    model = PeftModel.from_pretrained(_base(base_dir), good_dir, adapter_name="first")
    before = _logits(model)
    with pytest.raises(LisaCheckpointError):
        model.load_adapter(broken, adapter_name="second")
    assert list(model.peft_config) == ["first"]
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)

    base = _base(base_dir)
    plain = _logits(base)
    with pytest.raises(LisaCheckpointError):
        base.load_adapter(str(broken))
    assert not any(isinstance(m, LisaAttention) for m in base.modules())
    assert not getattr(base, "_hf_peft_config_loaded", False)
    torch.testing.assert_close(_logits(base), plain, rtol=0, atol=0)
    base.load_adapter(str(good_dir))  # and the good adapter still loads afterwards
    assert any(isinstance(m, LisaAttention) for m in base.modules())
    loaded = _logits(base)
    with pytest.raises(ValueError, match="already exists"):  # transformers' refusal; the loaded adapter stays
        base.load_adapter(str(broken))
    torch.testing.assert_close(_logits(base), loaded, rtol=0, atol=0)


def test_good_adapter_loads_identically_on_every_path_without_warnings(load, base_dir, good_dir):
    expected = _logits(PeftModel.from_pretrained(_base(base_dir), good_dir))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(does not use|does not know).*")
        model = load(good_dir)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)


@pytest.mark.hub
def test_hub_repos_are_checked_on_every_path(hub_client, base_dir, good_dir, monkeypatch):
    config = (good_dir / "adapter_config.json").read_bytes()
    tensors = load_file(good_dir / WEIGHTS)
    _drop(tensors)
    broken = hub_client.unique_repo_id("broken")
    hub_client.make_repo(broken, {"adapter_config.json": config, WEIGHTS: save(tensors)})
    pickle_only = hub_client.unique_repo_id("pickle")
    hub_client.make_repo(pickle_only, {"adapter_config.json": config, "adapter_model.bin": b"never unpickled"})
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("adapter_model.bin was unpickled"))
    for path in PATHS.values():
        with pytest.raises(LisaCheckpointError, match="missing: model.layers.3.self_attn.lisa_ffn_up.weight"):
            path(broken, base_dir, good_dir)
        with pytest.raises(UnsafeAdapterFormatError, match="only adapter_model.bin"):
            path(pickle_only, base_dir, good_dir)


# ---------------------------------------------------------------------------------------------- task type
def test_task_type_defaults_to_causal_lm():
    config = LisaConfig(lisa_layers=[2, 3])
    assert config.task_type == "CAUSAL_LM"
    assert isinstance(get_peft_model(tiny_llama(2), config), PeftModelForCausalLM)


def test_old_adapter_with_null_task_type_loads_as_causal_lm(base_dir, good_dir, tmp_path):
    adapter = _variant(good_dir, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"  # what save_pretrained writes now
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "task_type": None}))
    loaded = [PeftModel.from_pretrained(_base(base_dir), adapter), AutoPeftModelForCausalLM.from_pretrained(adapter),
              lisa_peft.from_pretrained(adapter)]
    for model in loaded:
        assert type(model) is PeftModelForCausalLM
    out = model.generate(input_ids=IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, IDS.shape[1] + 3)


def test_pipeline_runs_an_old_adapter_saved_with_null_task_type(tmp_path):
    from tests.helpers.tiny_assets import char_tokenizer, save_tiny_checkpoint

    base_dir = save_tiny_checkpoint(tmp_path / "base")
    auto = transformers.AutoModelForCausalLM
    model = get_peft_model(auto.from_pretrained(base_dir), LisaConfig(lisa_layers=[2, 3]))
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    (tmp_path / "adapter/adapter_config.json").write_text(json.dumps({**config, "task_type": None}))
    loaded = PeftModel.from_pretrained(auto.from_pretrained(base_dir), tmp_path / "adapter")
    pipe = transformers.pipeline("text-generation", model=loaded, tokenizer=char_tokenizer())
    assert type(pipe.model).__name__ == "PeftModelForCausalLM"  # a class pipeline lists for text-generation
    text = pipe("abc", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("abc") and len(text) > 3


# ---------------------------------------------------------------------------------------------- merging
def test_weighted_adapters_and_merging_raise_lisa_specific_errors():
    model = get_peft_model(tiny_llama(2), LisaConfig(lisa_layers=[2, 3]))
    with pytest.raises(ValueError, match="add_weighted_adapter cannot combine LiSA adapters: a LiSA adapter is not"):
        model.add_weighted_adapter(["default"], [1.0], "mix")
    # merge_and_unload() returns the compact model (tests/test_compact.py); merging in place cannot work.
    with pytest.raises(ValueError, match="LiSA adapters cannot be merged into the base weights"):
        model.merge_adapter()
