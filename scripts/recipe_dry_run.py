"""Dry run of the GPU recipes on CPU, before anyone rents a GPU.

For each GPU recipe (recipes/llama2_7b.yaml, llama2_13b.yaml, llama3_8b.yaml) this runs the whole pipeline —
sampling, conversion, training steps, evaluation, save — with the recipe's own settings (dtype, bf16,
gradient checkpointing, batch size and accumulation, LiSA and calibration settings, text sources), on a tiny
random model of the recipe's family standing in for the Hub model, through `lisa-peft train`:

* the family is read from the recipe's `base_model`: LLaMA-2 -> multi-head attention, LLaMA-3 -> grouped-query
  attention and llama3 RoPE scaling (`stand_in_config`);
* only the scale is overridden (`scale_overrides`): base model -> the stand-in's folder, few steps, short
  windows, few windows, few layer-wise steps, output in a work folder; and, without a GPU, `use_cpu`
  (`machine_overrides`: transformers refuses bf16 training without a GPU otherwise);
* launches (`LAUNCHES`): one process, `accelerate launch` with the bundled cpu_2proc config (DDP over gloo,
  2 processes), and `accelerate launch` with the bundled fsdp config on 2 processes (`fsdp_cpu_config`). The
  FSDP launch is probed first (`probe_launch`: how the Trainer's accelerator sets up under it) and skipped, with
  that set-up as the reason, where accelerate does not run FSDP: accelerate turns an FSDP config into FSDP only
  on accelerator devices (MULTI_GPU, MULTI_NPU, ...), so on CPU the processes set up as MULTI_CPU (plain DDP
  over gloo) and the FSDP settings are ignored.

Then (`check_outputs`) training must have moved the converted LiSA weights, the saved adapter is reloaded onto
the stand-in and must reproduce the held-out KL the run recorded, and is merged into the compact model
(`merge_and_unload`), which is saved, loaded back and compared logit for logit with the PEFT model.

Run: `.venv/bin/python scripts/recipe_dry_run.py [RECIPE ...] [--launch single ddp fsdp] [--json report.json]`.
Nothing is downloaded (the Hub is set offline in the launched processes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.helpers.tiny_assets (the character tokenizer) from a checkout
    sys.path.insert(0, str(ROOT))

GPU_RECIPES = ("llama2_7b", "llama2_13b", "llama3_8b")
LAUNCHES = ("single", "ddp", "fsdp")
# The llama3 RoPE scaling of LLaMA-3.1 and later (config.json of meta-llama/Llama-3.1-8B: low frequencies stretched
# 8x, 131072 positions). Meta-Llama-3-8B itself has plain RoPE (theta 5e5, 8192 positions); the stand-in takes the
# scaled form, which the recipe meets as soon as its base_model is a LLaMA-3.1 or later.
LLAMA3_POSITIONS = 131072
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
# The scale of a dry run: everything the recipe sets apart from these keys runs as written.
SCALE = {
    "training.max_steps": 3,
    "training.save_steps": 2,  # a checkpoint is written (and sharded under FSDP) before the end
    "training.warmup_steps": 1,  # the few steps train at the recipe's learning rate
    "calibration.num_sequences": 4,
    "calibration.seq_len": 32,
    "calibration.layerwise_steps": 2,
    "data.seq_len": 64,
    "data.sampled_sequences": 32,
    "data.max_eval_sequences": 4,
}
# Logits of the PEFT model vs the compact model (and the compact model saved and loaded back), relative to the
# largest logit: both compute in the recipe's dtype, in a different order of operations.
LOGITS_RTOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3}


def recipe_path(name: str) -> Path:
    """A bundled GPU recipe by name (or a recipe file)."""
    from lisa_peft.pipeline.recipe_files import resolve_recipe

    return resolve_recipe(name)


def recipe_family(base_model: str) -> str:
    """"llama2" or "llama3" from a recipe's `base_model` (a Hub id such as meta-llama/Llama-2-7b-hf)."""
    name = base_model.lower().replace("_", "-")
    if re.search(r"llama-?2", name):
        return "llama2"
    if re.search(r"llama-?3", name):
        return "llama3"
    raise ValueError(f"base_model {base_model!r} is neither a LLaMA-2 nor a LLaMA-3 model: no stand-in family for it "
                     "(the dry run covers the GPU recipes: " + ", ".join(GPU_RECIPES) + ").")


def stand_in_config(family: str, vocab_size: int, bos_token_id: int, eos_token_id: int, num_layers: int = 6):
    """A tiny random LlamaConfig of `family`: 8 query heads of dim 16; LLaMA-2: 8 KV heads (MHA), RoPE theta 1e4,
    4096 positions; LLaMA-3: 2 KV heads (GQA, 4 query heads per KV head as in LLaMA-3-8B), llama3 RoPE scaling.
    Initialised wider than LLaMA's 0.02 so that the random model's next-token distributions are far from uniform
    (a held-out KL that says something, logits of some size to compare)."""
    import transformers

    values: dict[str, Any] = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers, num_attention_heads=8,
        vocab_size=vocab_size, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id, initializer_range=0.2,
    )
    if family == "llama2":
        values.update(num_key_value_heads=8, max_position_embeddings=4096, rope_theta=10000.0)
    elif family == "llama3":
        values.update(num_key_value_heads=2, max_position_embeddings=LLAMA3_POSITIONS, rope_scaling=dict(LLAMA3_ROPE))
    else:
        raise ValueError(f"Unknown family {family!r}: expected 'llama2' or 'llama3'.")
    return transformers.LlamaConfig(**values)


def save_stand_in(family: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random model of `family` with the test character tokenizer (tests/helpers/tiny_assets.py)
    into `folder`."""
    import torch
    import transformers

    from tests.helpers.tiny_assets import char_tokenizer

    tokenizer = char_tokenizer()
    config = stand_in_config(family, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def machine_overrides() -> dict[str, Any]:
    """What this machine needs beyond the recipe: on a machine without CUDA, training.use_cpu=true.

    transformers' TrainingArguments refuses bf16 without a GPU unless `use_cpu` is set ("Your setup doesn't
    support bf16/gpu. You need to assign use_cpu ..."), and without it 2 launched processes do not join one DDP
    job on CPU (accelerate sets up no distributed type: each trains alone, world size 1, into the same folder).
    With it, accelerate runs the launched processes as one job over gloo and bf16 as CPU autocast."""
    import torch

    return {} if torch.cuda.is_available() else {"training.use_cpu": True}


def scale_overrides(base_folder: Path, output_dir: Path, extra: list[str] | None = None) -> list[str]:
    """The `--set` items of a dry run: the stand-in as base model, the output folder, `SCALE`, `machine_overrides`
    (+ `extra`)."""
    items = [f"base_model={base_folder}", f"training.output_dir={output_dir}"]
    items += [f"{key}={json.dumps(value)}" for key, value in {**SCALE, **machine_overrides()}.items()]
    return items + list(extra or [])


def fsdp_cpu_config(dest: Path, num_processes: int = 2) -> Path:
    """The bundled FSDP accelerate config, for `num_processes` processes on this machine (nothing else changed)."""
    from lisa_peft.pipeline.recipe_files import accelerate_config

    config = yaml.safe_load(accelerate_config("fsdp").read_text())
    config["num_processes"] = num_processes
    dest.write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(launch: str, recipe: Path, overrides: list[str], work: Path, module: bool = True) -> list[str]:
    """The command line that runs `lisa-peft train RECIPE` under `launch` ("single", "ddp" or "fsdp");
    module=False: the Python script `recipe` instead (its arguments appended by the caller)."""
    train = ["-m", "lisa_peft.cli", "train", str(recipe), "--quiet", "--no-resume"] if module else [str(recipe)]
    for item in overrides:
        train += ["--set", item]
    if launch == "single":
        return [sys.executable, *train]
    if launch == "ddp":
        from lisa_peft.pipeline.recipe_files import accelerate_config

        config = accelerate_config("cpu_2proc")
    elif launch == "fsdp":
        config = fsdp_cpu_config(work / "fsdp_cpu.yaml")
    else:
        raise ValueError(f"Unknown launch {launch!r}: expected one of {', '.join(LAUNCHES)}.")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", str(_free_port()), *train]


def launch_env(work: Path) -> dict[str, str]:
    """The launched processes' environment: offline, one thread each (2 processes share the CPU cores), the
    sampled-text cache in the work folder, and the checkout's `src` importable."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", LISA_PEFT_CACHE=str(work / "cache"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


# Run under a launch, it prints how the Trainer's accelerator sets up there (as `lisa-peft train` would, with
# `machine_overrides`).
_PROBE = """
import json, sys, torch, transformers
args = transformers.TrainingArguments(output_dir=sys.argv[1], report_to=[], use_cpu=not torch.cuda.is_available())
trainer = transformers.Trainer(model=torch.nn.Linear(2, 2), args=args)
if args.process_index == 0:
    print("PROBE " + json.dumps({"distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
                                 "world_size": args.world_size, "device": str(args.device)}))
"""
# How each launch must set up for its run to count: distributed type and number of processes.
EXPECTED_SETUP = {"single": ("NO", 1), "ddp": (None, 2), "fsdp": ("FSDP", 2)}


def probe_launch(launch: str, work: Path, timeout: float = 300) -> dict[str, Any]:
    """How the Trainer's accelerator sets up under `launch` on this machine: {"distributed_type": "FSDP" | ...,
    "world_size": int, "device": str}. Raises RuntimeError when the probe itself fails."""
    work.mkdir(parents=True, exist_ok=True)
    script = work / "launch_probe.py"
    script.write_text(_PROBE)
    command = launch_command(launch, script, [], work, module=False)
    proc = subprocess.run(command + [str(work / "probe-out")], capture_output=True, text=True, timeout=timeout,
                          env=launch_env(work), cwd=work)
    found = [line[len("PROBE "):] for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"the {launch} launch probe failed: {error_line(proc.stderr)}")
    return json.loads(found[-1])


def setup_problem(launch: str, setup: dict[str, Any]) -> str | None:
    """Why `setup` (from `probe_launch`) is not the launch's set-up (`EXPECTED_SETUP`), or None."""
    kind, processes = EXPECTED_SETUP[launch]
    if setup["world_size"] == processes and (kind is None or setup["distributed_type"] == kind):
        return None
    return (f"under the {launch} launch the Trainer's accelerator sets up as {setup['distributed_type']} with world "
            f"size {setup['world_size']} on {setup['device']}, not {kind or 'a distributed type'} with {processes}")


@dataclass
class DryRun:
    """One recipe under one launch: what ran, how long it took, what came out (or why it failed)."""

    recipe: str
    launch: str
    family: str
    ok: bool = False
    train_s: float | None = None  # wall time of the launched `lisa-peft train` (process start to exit)
    check_s: float | None = None  # wall time of reload + compact model + save/load + logits comparison
    error: str | None = None  # the exception line of a failed run (stderr's last traceback line)
    skipped: str | None = None  # why the launch cannot run on this machine (nothing was run)
    setup: dict[str, Any] = field(default_factory=dict)  # `probe_launch`'s answer, where probed
    stderr_tail: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)


def error_line(stderr: str) -> str:
    """The last exception line of `stderr` ("ValueError: ..."), else its last non-empty line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*", line) or line.startswith("lisa-peft train: error"):
            return line
    return lines[-1] if lines else "(no output)"


def run_one(recipe_name: str, launch: str, work: Path, extra: list[str] | None = None, check: bool = True,
            timeout: float = 1200) -> DryRun:
    """Dry-run one recipe under one launch in `work` (a fresh folder); never raises for a failed run."""
    path = recipe_path(recipe_name)
    recipe = yaml.safe_load(path.read_text())
    family = recipe_family(recipe["base_model"])
    result = DryRun(recipe=recipe_name, launch=launch, family=family)
    work.mkdir(parents=True, exist_ok=True)
    base = save_stand_in(family, work / f"stand-in-{family}")
    output_dir = work / "out"
    overrides = scale_overrides(base, output_dir, extra)
    if launch == "fsdp":  # accelerate may run this config as something else here (on CPU it does): ask first
        result.setup = probe_launch(launch, work / "probe")
        problem = setup_problem(launch, result.setup)
        if problem:
            result.skipped = f"FSDP cannot run on this machine: {problem}"
            return result
    command = launch_command(launch, path, overrides, work)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=launch_env(work),
                              cwd=work)
    except subprocess.TimeoutExpired as err:
        result.train_s = round(time.perf_counter() - start, 1)
        result.error = f"timed out after {timeout:.0f} s"
        result.stderr_tail = (err.stderr or b"")[-4000:].decode(errors="replace") if err.stderr else ""
        return result
    result.train_s = round(time.perf_counter() - start, 1)
    result.stderr_tail = proc.stderr[-6000:]
    if proc.returncode != 0:
        result.error = error_line(proc.stderr)
        return result
    result.summary = json.loads((output_dir / "summary.json").read_text())
    processes = EXPECTED_SETUP[launch][1]
    if result.summary.get("world_size") != processes:
        result.error = (f"trained with world size {result.summary.get('world_size')}, not {processes}: the launched "
                        "processes did not train as one job")
        return result
    if check:
        start = time.perf_counter()
        try:
            result.checks = check_outputs(path, overrides, output_dir, work / "cache")
        except Exception as err:  # reported, with the run's other results
            result.error = f"check: {type(err).__name__}: {err}"
            result.check_s = round(time.perf_counter() - start, 1)
            return result
        result.check_s = round(time.perf_counter() - start, 1)
    result.ok = True
    return result


def cannot_run_on_cpu(result: DryRun) -> str | None:
    """The reason a dry run was skipped (its launch cannot run on this machine), or None."""
    return result.skipped


def trained_change(output_dir: Path) -> float:
    """Largest |change| of a LiSA weight from the converted adapter (lisa_init) to the trained one (adapter)."""
    from safetensors.torch import load_file

    from lisa_peft.pipeline.recipe import FINAL_ADAPTER_DIR, INIT_ADAPTER_DIR

    before = load_file(output_dir / INIT_ADAPTER_DIR / "adapter_model.safetensors")
    after = load_file(output_dir / FINAL_ADAPTER_DIR / "adapter_model.safetensors")
    if before.keys() != after.keys():
        raise AssertionError(f"the trained adapter holds other tensors than the converted one: "
                             f"{sorted(before.keys() ^ after.keys())[:4]}")
    return max((after[k].float() - before[k].float()).abs().max().item() for k in before)


def check_outputs(path: Path, overrides: list[str], output_dir: Path, cache: Path) -> dict[str, Any]:
    """Check that training moved the converted LiSA weights, reload the saved adapter onto the base model (the
    recipe's dtype), measure its held-out KL again (it must match the run's), build the compact model, save and
    load it, and compare logits: PEFT vs compact vs loaded.

    Returns the figures; raises AssertionError naming what does not hold."""
    import torch
    import transformers
    from peft import PeftModel

    from lisa_peft.evaluation.fidelity import measure_fidelity
    from lisa_peft.pipeline.base_models import load_base_model
    from lisa_peft.pipeline.recipe import FINAL_ADAPTER_DIR, load_recipe, prepare_data

    recipe = load_recipe(path, overrides)
    summary = json.loads((output_dir / "summary.json").read_text())
    moved = trained_change(output_dir)
    assert moved > 0, "training left the converted LiSA weights unchanged (no gradient reached them)"
    dtype_name = recipe.get("dtype", "float32")
    previous_cache = os.environ.get("LISA_PEFT_CACHE")
    os.environ["LISA_PEFT_CACHE"] = str(cache)  # the run's sampled text: reused, not sampled again
    try:
        base, tokenizer = load_base_model(recipe["base_model"], dtype=getattr(torch, dtype_name))
        data = prepare_data(tokenizer, recipe, model=base, progress=False)
    finally:
        if previous_cache is None:
            os.environ.pop("LISA_PEFT_CACHE", None)
        else:
            os.environ["LISA_PEFT_CACHE"] = previous_cache
    peft_model = PeftModel.from_pretrained(base, output_dir / FINAL_ADAPTER_DIR).eval()
    config = peft_model.peft_config["default"]
    assert config.lisa_layers == summary["lisa_layers"], (config.lisa_layers, summary["lisa_layers"])
    fidelity = measure_fidelity(peft_model, data["eval"], data["eval_name"], progress=False)
    kl_run = summary["kl_trained"]
    assert math.isclose(fidelity.kl, kl_run, rel_tol=0.05, abs_tol=1e-4), (
        f"the reloaded adapter's held-out KL {fidelity.kl:.6g} is not the run's {kl_run:.6g}")
    ids = data["eval"][:2]
    with torch.no_grad():
        expected = peft_model(ids).logits.float()
        compact = peft_model.merge_and_unload()
        merged = compact(ids).logits.float()
        compact.save_pretrained(output_dir / "compact", tokenizer=tokenizer)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(output_dir / "compact")
        reloaded = loaded(ids).logits.float()
    scale = expected.abs().max().item()
    tolerance = LOGITS_RTOL[dtype_name] * scale
    merged_diff = (merged - expected).abs().max().item()
    loaded_diff = (reloaded - expected).abs().max().item()
    for what, diff in (("compact model", merged_diff), ("compact model saved and loaded", loaded_diff)):
        assert diff <= tolerance, f"{what} vs PEFT model: max |logit diff| {diff:.3g} > {tolerance:.3g}"
    loaded_config = loaded.config
    base_config = base.config
    for key in ("num_attention_heads", "num_key_value_heads"):
        assert getattr(loaded_config, key) == getattr(base_config, key), key
    rope = getattr(loaded_config, "rope_parameters", None) or getattr(loaded_config, "rope_scaling", None) or {}
    base_rope = getattr(base_config, "rope_parameters", None) or getattr(base_config, "rope_scaling", None) or {}
    assert rope.get("rope_type") == base_rope.get("rope_type"), (rope, base_rope)
    return {
        "lisa_layers": config.lisa_layers, "num_layers": base_config.num_hidden_layers,
        "kv_heads": base_config.num_key_value_heads, "rope_type": base_rope.get("rope_type", "default"),
        "trained_change": moved, "kl_run": kl_run, "kl_reloaded": fidelity.kl, "logits_scale": scale,
        "compact_max_diff": merged_diff, "loaded_max_diff": loaded_diff, "loaded_dtype": str(loaded.dtype),
        "compact_class": type(loaded).__name__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", default=list(GPU_RECIPES), help="GPU recipes (default: all three).")
    parser.add_argument("--launch", nargs="+", default=list(LAUNCHES), choices=LAUNCHES)
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="An override beyond the scale (e.g. training.bf16=false), applied after it.")
    parser.add_argument("--work", type=Path, help="Work folder (default: a temporary one, removed afterwards).")
    parser.add_argument("--json", type=Path, help="Write the results here as JSON.")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="recipe-dry-run-") as tmp:
        work = args.work or Path(tmp)
        for name in args.recipes:
            for launch in args.launch:
                result = run_one(name, launch, work / f"{name}-{launch}", args.extra)
                results.append(result)
                status = "ok" if result.ok else f"SKIPPED: {result.skipped}" if result.skipped else \
                    f"FAILED: {result.error}"
                print(f"{name:12s} {launch:7s} train {result.train_s} s, check {result.check_s} s: {status}",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2, default=str))
    return 0 if all(r.ok or r.skipped for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
