"""The README's Quick start and compact-model blocks, the runnable examples of docs/ and the package docstring
example run as written (tests/test_docs.py checks that every other code block in README.md and docs/ parses)."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import lisa_peft

ROOT = Path(__file__).resolve().parents[1]


def _section_code(title: str, document: str = "README.md") -> str:
    """The first python block after the heading `## {title}` of `document` (a path relative to the root)."""
    text = (ROOT / document).read_text()
    assert f"## {title}\n" in text, f"{document} has no section {title!r}"
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"{document} section {title!r} has no python block"
    return match.group(1)


def _quick_start_code() -> str:
    return _section_code("Quick start")


def test_readme_quick_start_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_quick_start_code(), "README.md", "exec"), namespace)
    assert "trainable params" in capsys.readouterr().out
    assert (tmp_path / "runs/readme-adapter/adapter_model.safetensors").exists()
    assert namespace["out"].shape == (1, 24)
    assert type(namespace["reloaded"].peft_config["default"]).__name__ == "LisaConfig"


def test_readme_lisa_with_lora_example_runs(tmp_path, monkeypatch):
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_section_code("LiSA with LoRA", "docs/training.md"), "docs/training.md", "exec"), namespace)
    assert sorted(p.name for p in (tmp_path / "runs/lisa-lora").iterdir()) == ["README.md", "attn", "mlp"]
    plain = namespace["plain"]
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())  # no LiSA or LoRA module left
    with torch.no_grad():
        torch.testing.assert_close(plain(namespace["ids"]).logits, namespace["base_logits"], rtol=0, atol=0)


def test_readme_compact_path_runs(tmp_path, monkeypatch):
    """The three-line compact path (merge, save, load), continuing the Quick start, gives the PeftModel's logits."""
    import torch

    monkeypatch.chdir(tmp_path)
    compact_code = _section_code("Deploying: the compact model")
    assert len(compact_code.strip().splitlines()) == 3
    namespace: dict = {}
    exec(compile(_quick_start_code(), "README.md", "exec"), namespace)
    exec(compile(compact_code, "README.md", "exec"), namespace)
    assert type(namespace["loaded"]).__name__ == "LisaLlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(namespace["loaded"](namespace["ids"]).logits,
                                   namespace["model"](namespace["ids"]).logits, atol=1e-5, rtol=0)


def test_readme_first_lines_give_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0] == "# lisa-peft"
    commands = [line for line in lines[2:4] if line.startswith("- ")]
    assert len(commands) == 2 and "bash scripts/run_tests.sh" in commands[1]


def test_package_docstring_example():
    result = doctest.testmod(lisa_peft, verbose=False)
    assert result.attempted >= 4 and result.failed == 0


def test_readme_fidelity_example_runs(tmp_path, monkeypatch):
    """The fidelity / zero-shot example of docs/evaluation.md, on a tiny model with a char tokenizer."""
    import json
    import textwrap

    from peft import get_peft_model

    from lisa_peft import LisaConfig
    from tests.helpers.tiny_assets import char_tokenizer, sample_text
    from tests.helpers.tiny_models import tiny_llama

    monkeypatch.chdir(tmp_path)
    question = {"question": "Which?", "choices": {"text": ["a b", "c"], "label": ["A", "B"]}, "answerKey": "A"}
    (tmp_path / "arc_easy.jsonl").write_text(json.dumps(question) + "\n")
    tokenizer = char_tokenizer()
    lisa_model = get_peft_model(tiny_llama(num_layers=4, vocab_size=len(tokenizer), max_position_embeddings=512),
                                LisaConfig(lisa_layers=[2, 3]))
    namespace = {"lisa_model": lisa_model, "tokenizer": tokenizer, "text": sample_text(8000)}
    code = textwrap.dedent(_section_code("Fidelity and zero-shot", "docs/evaluation.md"))
    exec(compile(code, "docs/evaluation.md", "exec"), namespace)
    assert namespace["report"].tokens == 16 * 255 and namespace["report"].ppl_ratio > 0
    assert set(namespace["compare_zero_shot"](lisa_model, tokenizer, namespace["questions"])) == {"base", "lisa"}
