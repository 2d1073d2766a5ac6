"""Parameter bytes and resident memory: base model vs LiSA adapter form (PeftModel) vs compact model.

The compact model is the PeftModel's `merge_and_unload()` (`LisaLlamaForCausalLM`).

* Analytic (no weights): LLaMA-2-7B, LLaMA-3-8B, LLaMA-2-13B with LiSA in the last 53 % and 84 % of the layers
  (the ends of the paper's 53-84 % range). The three models are built on the meta device from the same code
  that builds the real ones (`LlamaForCausalLM`, `get_peft_model`, `LisaLlamaForCausalLM`), and their
  parameters are counted; bytes are in bf16 for every tensor.
* Measured (``--demo``): the demo model SmolLM2-135M with LiSA in layers 18-29 (12 of 30): parameter bytes of
  the loaded models and the size of the saved ``model.safetensors`` of base and compact model.
* Measured (``--rss``): resident memory of the same three demo forms, float32, CPU. The parent process builds
  the adapter (`get_peft_model`, ``init_lisa_weights="identity"``) and saves it and its compact model
  (`merge_and_unload().save_pretrained`) into a temporary folder; then each form is loaded in its own fresh
  Python subprocess (this file with the hidden ``--rss-one FORM DIR``; DIR holds ``base``, a link to the demo
  model's folder, ``adapter`` and ``compact``), so no form reuses memory another one freed. The child reads
  ``VmRSS`` from ``/proc/self/status`` (after `gc.collect()`) three times: after its imports (torch,
  transformers, peft, lisa_peft: the same for every form), after the load (base =
  ``AutoModelForCausalLM.from_pretrained(base)``, PEFT LiSA = the same + ``PeftModel.from_pretrained(model,
  adapter)``, compact = ``AutoModelForCausalLM.from_pretrained(compact)``, registered by ``import lisa_peft``)
  and after one forward pass over 16 tokens (no grad). The second point alone misleads: transformers maps
  ``model.safetensors`` and leaves the pages of an unread tensor out of the RSS, while the compact loader's
  finiteness check reads every tensor; after the forward pass every tensor the form uses is resident. The
  file-backed part (``RssFile``), the anonymous part (``RssAnon``) and the peak (``VmHWM``) are printed too.

    python benchmarks/compact_sizes.py [--demo] [--rss] [--fractions 0.53 0.84]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import get_peft_model  # noqa: E402

import lisa_peft  # noqa: E402,F401  (registers LISA and lisa_llama)
from benchmarks.adapter_budget import SHAPES  # noqa: E402
from lisa_peft import LisaConfig  # noqa: E402
from lisa_peft.compact.lisa_llama import LisaLlamaForCausalLM  # noqa: E402
from lisa_peft.compact.merge import compact_config, parameter_bytes  # noqa: E402
from lisa_peft.tuners.lisa.model import default_rank  # noqa: E402

MIB = 2**20


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def analytic(name: str, fraction: float) -> dict:
    """Parameter counts of the three forms for LiSA in the last `fraction` of the layers (meta device)."""
    config = transformers.LlamaConfig(**SHAPES[name])
    layers = config.num_hidden_layers
    lisa_layers = list(range(layers - round(fraction * layers), layers))
    r = default_rank(config.head_dim)
    planes = {str(i): [list(range(r // 2))] * config.num_key_value_heads for i in lisa_layers}  # no weights: any
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(config)
    n_base = _count(base)
    peft_model = get_peft_model(base, LisaConfig(lisa_layers=lisa_layers, rotary_planes=planes))
    n_adapter = _count(peft_model)
    lisa = peft_model.peft_config["default"]
    with torch.device("meta"):
        compact = LisaLlamaForCausalLM(compact_config(config, lisa, torch.float32, torch.float32, name))
        n_compact = _count(compact)
    return {"model": name, "layers": f"{len(lisa_layers)}/{layers}", "r": r, "head_dim": config.head_dim,
            "base": n_base, "adapter": n_adapter, "compact": n_compact}


def demo() -> dict:
    """Measured on SmolLM2-135M (the demo model), LiSA layers 18-29."""
    from lisa_peft.pipeline.base_models import load_base_model

    base, tokenizer = load_base_model()
    out = {"dtype": str(next(base.parameters()).dtype).removeprefix("torch."), "base": parameter_bytes(base)}
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(Path(tmp, "base"))
        out["base_file"] = Path(tmp, "base", "model.safetensors").stat().st_size
        model = get_peft_model(base, LisaConfig(lisa_layers=list(range(18, 30))))
        out["adapter"] = parameter_bytes(model)
        compact = model.merge_and_unload()
        out["compact"] = parameter_bytes(compact)
        compact.save_pretrained(Path(tmp, "compact"))
        out["compact_file"] = Path(tmp, "compact", "model.safetensors").stat().st_size
        out["r"], out["head_dim"] = compact.config.lisa_r, compact.config.lisa_head_dim
    return out


RSS_FORMS = ("base", "peft", "compact")
RSS_NAMES = {"base": "base", "peft": "PEFT LiSA", "compact": "compact"}


def _proc_status_kib(*keys: str) -> dict[str, int]:
    """Fields of ``/proc/self/status`` in KiB (Linux only), after a `gc.collect()`."""
    gc.collect()
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[key] = int(value.split()[0])
    return out


def rss_one(form: str, folder: str) -> dict:
    """Child process: load one form from `folder` (``base``, ``adapter``, ``compact``, made by `rss`) and
    return its RSS (KiB) after the imports, after the load and after one forward pass."""
    from peft import PeftModel

    keys = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
    before = _proc_status_kib(*keys)
    auto = transformers.AutoModelForCausalLM
    if form == "compact":
        model = auto.from_pretrained(Path(folder, "compact"), dtype=torch.float32)
    else:
        model = auto.from_pretrained(Path(folder, "base"), dtype=torch.float32)
        if form == "peft":
            model = PeftModel.from_pretrained(model, Path(folder, "adapter"))
    model.eval()
    after = _proc_status_kib(*keys)
    with torch.no_grad():
        model(input_ids=torch.arange(1, 17)[None])
    forward = _proc_status_kib(*keys)
    return {"form": form, "before": before, "after": after, "forward": forward,
            "parameter_bytes": parameter_bytes(model), "class": type(model).__name__}


def rss() -> list[dict]:
    """Build adapter and compact folder of the demo model, then measure each form in a fresh subprocess."""
    from lisa_peft.pipeline.base_models import load_base_model, resolve_base_model

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "base").symlink_to(resolve_base_model(progress=False), target_is_directory=True)
        base, _ = load_base_model()
        model = get_peft_model(base, LisaConfig(lisa_layers=list(range(18, 30)), init_lisa_weights="identity"))
        model.save_pretrained(Path(tmp, "adapter"))
        model.merge_and_unload().save_pretrained(Path(tmp, "compact"))
        del base, model
        results = []
        for form in RSS_FORMS:
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--rss-one", form, tmp],
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"--rss-one {form} failed ({done.returncode}):\n{done.stderr[-4000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def print_rss(results: list[dict]) -> None:
    by_form = {r["form"]: r for r in results}

    def inc(r: dict, point: str, key: str = "VmRSS") -> float:
        return (r[point][key] - r["before"][key]) / 1024  # MiB

    base = by_form["base"]
    print("\nSmolLM2-135M (float32, CPU), LiSA layers 18-29 (12/30): VmRSS, one fresh process per form")
    print("| form | RSS after imports | RSS after load | load increase | ratio to base | "
          "RSS after 1st forward | increase over imports | ratio to base |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {RSS_NAMES[r['form']]} | {r['before']['VmRSS'] / 1024:,.1f} MiB | "
              f"{r['after']['VmRSS'] / 1024:,.1f} MiB | {inc(r, 'after'):,.1f} MiB | "
              f"{inc(r, 'after') / inc(base, 'after'):.2f} | {r['forward']['VmRSS'] / 1024:,.1f} MiB | "
              f"{inc(r, 'forward'):,.1f} MiB | {inc(r, 'forward') / inc(base, 'forward'):.3f} |")
    print("\nIncrease over imports, split (file-backed RssFile = mapped safetensors pages; RssAnon = the rest)")
    print("| form | class | parameter bytes | after load: RssFile / RssAnon | after forward: RssFile / RssAnon "
          "| peak VmHWM |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {RSS_NAMES[r['form']]} | {r['class']} | {r['parameter_bytes'] / 2**20:,.1f} MiB | "
              f"{inc(r, 'after', 'RssFile'):,.1f} / {inc(r, 'after', 'RssAnon'):,.1f} MiB | "
              f"{inc(r, 'forward', 'RssFile'):,.1f} / {inc(r, 'forward', 'RssAnon'):,.1f} MiB | "
              f"{r['forward']['VmHWM'] / 1024:,.1f} MiB |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.53, 0.84])
    parser.add_argument("--demo", action="store_true", help="also measure the demo model (SmolLM2-135M)")
    parser.add_argument("--rss", action="store_true",
                        help="also measure resident memory after load of the demo model's three forms")
    parser.add_argument("--rss-one", nargs=2, metavar=("FORM", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_one:
        form, folder = args.rss_one
        if form not in RSS_FORMS:
            parser.error(f"--rss-one FORM must be one of {RSS_FORMS}")
        print(json.dumps(rss_one(form, folder)))
        return 0
    print("| model | LiSA layers | Q/K compression D/r | base bf16 | PEFT LiSA bf16 | compact bf16 | compact / base |")
    print("|---|---|---|---|---|---|---|")
    for name in SHAPES:
        for fraction in args.fractions:
            a = analytic(name, fraction)
            print(f"| {a['model']} | {a['layers']} | {a['head_dim']}/{a['r']} = {a['head_dim'] / a['r']:.2f}x | "
                  f"{2 * a['base'] / MIB:,.0f} MiB | {2 * a['adapter'] / MIB:,.0f} MiB | "
                  f"{2 * a['compact'] / MIB:,.0f} MiB | {a['compact'] / a['base']:.3f} |")
    if args.demo:
        d = demo()
        print(f"\nSmolLM2-135M ({d['dtype']}), LiSA layers 18-29 (12/30), r={d['r']} "
              f"(Q/K compression {d['head_dim']}/{d['r']} = {d['head_dim'] / d['r']:.2f}x):")
        print(f"  parameter bytes: base {d['base']:,} | PEFT LiSA {d['adapter']:,} | compact {d['compact']:,} "
              f"({d['compact'] / d['base']:.4f} of base)")
        print(f"  model.safetensors: base {d['base_file']:,} | compact {d['compact_file']:,} "
              f"({d['compact_file'] / d['base_file']:.4f} of base)")
    if args.rss:
        print_rss(rss())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
