"""scripts/gpu_check.sh and benchmarks/gpu_check.py on CPU: the no-GPU dry run, and each stage at a tiny size."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import build_model, main, parse_variant, report, summarize, time_variants, train_steps

ROOT = Path(__file__).resolve().parent.parent


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or bool(glob.glob("/dev/nvidia[0-9]*"))


@pytest.mark.skipif(_has_gpu(), reason="a GPU machine: the script would run the real check, not the dry run")
def test_dry_run_without_gpu_skips_cleanly_with_one_json(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_SITE": str(site)}
    # A relative output folder is taken from the caller's working directory, not the repository root.
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "results"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    (result,) = (tmp_path / "results").glob("gpu_check-*.json")
    payload = json.loads(result.read_text())
    assert payload["skipped"] == "no CUDA device"
    assert payload["passed"] is None and payload["stages"] == {}
    assert not site.exists()  # nothing installed on the skip path


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: a tiny model gains nothing from more, and the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny", device="cpu", dtype="float32")


def test_timings_stage_on_cpu_torch_and_base(tmp_path):
    out = tmp_path / "timings.json"
    rc = main(["timings", "--shape", "tiny", "--device", "cpu", "--tokens", "8", "--new-tokens", "2",
               "--repeats", "1", "--variants", "torch", "base", "--out", str(out)])
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["passed"] and payload["lisa_layers"] == [2, 3]
    (row,) = payload["rows"]
    for name in ("torch", "base"):
        var = row["variants"][name]
        assert var["prefill_s"]["n"] == 1 and var["prefill_s"]["min"] <= var["prefill_s"]["median"] > 0
        assert var["decode_tokens_per_s"] > 0 and var["logits_finite"]
        assert not any(var["kernel_calls"].values())  # the PyTorch path: no Triton entry point called
    assert row["variants"]["base"]["prefill_vs_base"] == 1.0


def test_triton_variant_runs_the_kernels_and_restores_the_mode(tiny_model):
    # tests/conftest.py sets TRITON_INTERPRET=1: kernel="triton" runs the kernels in the CPU interpreter.
    row = time_variants(tiny_model, tokens=4, new_tokens=2, repeats=1, variants=("triton", "torch"))
    calls = row["variants"]["triton"]["kernel_calls"]
    assert calls["lisa_prefill"] > 0 and calls["lisa_decode"] > 0 and calls["anchor_attention"] > 0, calls
    assert not any(row["variants"]["torch"]["kernel_calls"].values())
    assert row["max_abs_diff_vs_torch"]["triton"] < 1e-3 and row["top1_agrees_with_torch"]["triton"]
    assert row["passed"]
    assert tiny_model.peft_config["default"].kernel == "auto"


def test_a_failing_variant_is_recorded_and_the_others_still_timed(tiny_model, monkeypatch):
    import lisa_kernels

    def broken(*args, **kwargs):
        raise RuntimeError("compile failed")

    monkeypatch.setattr(lisa_kernels, "anchor_attention", broken)
    row = time_variants(tiny_model, tokens=4, new_tokens=2, repeats=1, variants=("triton", "torch"))
    assert row["variants"]["triton"] == {"error": "RuntimeError: compile failed"}
    assert row["variants"]["torch"]["decode_tokens_per_s"] > 0
    assert not row["passed"] and row["problems"] == ["triton: RuntimeError: compile failed"]
    assert tiny_model.peft_config["default"].kernel == "auto"


def test_a_bad_variant_name_fails_before_any_work():
    with pytest.raises(ValueError, match="unknown variant 'flash'.*triton-chunk=0"):
        parse_variant("flash")
    with pytest.raises(ValueError, match="unknown variant"):
        parse_variant("base-chunk=0")
    assert parse_variant("triton-chunk=0") == ("triton", 0) and parse_variant("torch") == ("torch", None)


def test_train_steps_bf16_base_changes_the_lisa_weights():
    model = build_model("tiny", device="cpu", dtype="bfloat16")
    payload = train_steps(model, seq_len=8, steps=2, lr=1e-2)
    assert payload["passed"], payload["problems"]
    assert payload["trainable_dtypes"] == ["torch.float32"]  # PEFT's rule: float32 adapter on a bf16 base
    assert len(payload["losses"]) == 2 and payload["max_weight_change"] > 0
    assert payload["step_s"]["n"] == 1 and not model.training


def test_summarize():
    stats = summarize([2.0, 1.0, 4.0])
    assert stats == {"median": 2.0, "min": 1.0, "max": 4.0, "n": 3, "spread": 1.5}
    with pytest.raises(ValueError):
        summarize([])


def _stage(work: Path, name: str, rc: int, log: str, result: dict | None = None) -> None:
    (work / f"{name}.log").write_text(log)
    if result is not None:
        (work / f"{name}.json").write_text(json.dumps(result))
    with (work / "stages.tsv").open("a") as table:
        table.write(f"{name}\t{rc}\t1.5\t60\n")


def test_report_records_each_stage_and_fails_on_any_failure(tmp_path):
    _stage(tmp_path, "env", 0, "", {"passed": True, "torch": "2.11.0+cu130", "gpu": {"name": "NVIDIA H100"}})
    _stage(tmp_path, "kernel_tests", 0, "....\n79 passed, 2 skipped in 51.20s\n")
    _stage(tmp_path, "timings", 124, "Terminated\n")
    _stage(tmp_path, "train", 0, "", {"passed": True})
    payload = report(tmp_path)
    stages = payload["stages"]
    assert stages["env"]["passed"] and stages["train"]["passed"]
    assert stages["kernel_tests"]["passed"] and stages["kernel_tests"]["pytest"] == {"passed": 79, "skipped": 2}
    assert stages["timings"]["timed_out"] and not stages["timings"]["passed"] and "budget" in stages["timings"]["error"]
    assert payload["passed"] is False and payload["skipped"] is None
    assert payload["versions"]["torch"] == "2.11.0+cu130" and payload["gpu"]["name"] == "NVIDIA H100"
    assert payload["budget_s"] == dict.fromkeys(stages, 60.0)


@pytest.mark.parametrize("log,rc", [("no tests ran in 0.01s\n", 0), ("3 passed, 1 failed in 2.0s\n", 1),
                                    ("2 passed, 1 error in 2.0s\n", 1), ("", -1)])
def test_report_kernel_tests_pass_only_when_tests_ran_and_none_failed(tmp_path, log, rc):
    _stage(tmp_path, "kernel_tests", rc, log)
    stage = report(tmp_path)["stages"]["kernel_tests"]
    assert not stage["passed"]
    if rc == -1:
        assert "not run" in stage["error"]


def test_report_all_passed(tmp_path):
    _stage(tmp_path, "kernel_tests", 0, "5 passed in 1.00s\n")
    _stage(tmp_path, "train", 0, "", {"passed": True})
    assert report(tmp_path)["passed"] is True
