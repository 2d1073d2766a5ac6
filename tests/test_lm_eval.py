"""lm-evaluation-harness: the "hf-lisa" model and `lisa-peft eval` on a local JSONL task, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from peft import PeftModel, get_peft_model

from lisa_peft import LisaConfig
from tests.helpers.tiny_assets import save_tiny_checkpoint

pytest.importorskip("lm_eval")

LISA_LAYERS = [3, 4, 5]
ROWS = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " five", " seven"], "answer": 0},
    {"question": "Fish live in", "choices": [" trees", " water", " clouds"], "answer": 1},
    {"question": "A cat says", "choices": [" moo", " quack", " meow"], "answer": 2},
]
TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny LLaMA folder, a LiSA adapter saved from it, and a 4-example multiple-choice task."""
    root = tmp_path_factory.mktemp("lm_eval")
    base = save_tiny_checkpoint(root / "base")
    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base), LisaConfig(lisa_layers=LISA_LAYERS))
    model.save_pretrained(root / "adapter")
    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    return {"root": root, "base": base, "adapter": root / "adapter", "tasks": tasks}


def test_hf_lisa_is_registered_and_loads_the_adapter(assets):
    from lm_eval.api.registry import get_model

    from lisa_peft.evaluation.lm_eval_model import HFLisaLM

    assert get_model("hf-lisa") is HFLisaLM
    lm = HFLisaLM(pretrained=str(assets["base"]), adapter=str(assets["adapter"]), device="cpu")
    assert isinstance(lm.model, PeftModel) and lm.model.peft_config["default"].peft_type == "LISA"
    assert lm.lisa_layers == LISA_LAYERS
    assert lm.get_model_info()["lisa_layers"] == LISA_LAYERS
    with pytest.raises(ValueError, match="disagree"):
        HFLisaLM(pretrained=str(assets["base"]), adapter=str(assets["adapter"]), peft="other", device="cpu")


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("lisa-peft")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lisa_peft.cli"]


def _eval(assets: dict[str, Path], name: str, adapter: bool) -> tuple[dict, str]:
    """Run `lisa-peft eval` in a subprocess with every Hugging Face network switch off."""
    root = assets["root"]
    out = root / f"{name}.json"
    cmd = _cli() + [
        "eval", "--base", str(assets["base"]), "--tasks", "tiny_mc", "--include-path", str(assets["tasks"]),
        "--no-builtin-tasks", "--batch-size", "2", "--device", "cpu", "--output", str(out), "--log-samples",
    ]
    if adapter:
        cmd += ["--adapter", str(assets["adapter"])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(root / "datasets"))
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    # cwd outside the repository: lm_eval records `git describe` of the working directory
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _loglikelihoods(result: dict) -> list[float]:
    samples = sorted(result["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    return [ll for s in samples for ll, _ in s["filtered_resps"]]


def test_lisa_peft_eval_runs_a_local_task_with_the_adapter(assets):
    lisa, stdout = _eval(assets, "lisa", adapter=True)
    base, _ = _eval(assets, "base", adapter=False)
    assert "tiny_mc" in stdout and "acc" in stdout  # the printed results table
    for result in (lisa, base):
        assert 0.0 <= result["results"]["tiny_mc"]["acc,none"] <= 1.0
        assert len(result["samples"]["tiny_mc"]) == len(ROWS)
    assert lisa["config"]["model"] == "hf-lisa" and lisa["config"]["lisa_layers"] == LISA_LAYERS
    assert "lisa_layers" not in base["config"]
    lisa_ll, base_ll = _loglikelihoods(lisa), _loglikelihoods(base)
    assert len(lisa_ll) == len(base_ll) == 3 * len(ROWS)
    assert max(abs(a - b) for a, b in zip(lisa_ll, base_ll)) > 1e-4  # the adapter changed the model
