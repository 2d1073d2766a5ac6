"""Parameter bytes: base model vs LiSA adapter form (PeftModel) vs compact LiSA model (`merge_and_unload()`).

* Analytic (no weights): LLaMA-2-7B, LLaMA-3-8B, LLaMA-2-13B with LiSA in the last 53 % and 84 % of the layers
  (the ends of the paper's 53-84 % range). The three models are built on the meta device from the same code
  that builds the real ones (`LlamaForCausalLM`, `get_peft_model`, `LisaLlamaForCausalLM`), and their
  parameters are counted; bytes are in bf16 for every tensor.
* Measured (``--demo``): the demo model SmolLM2-135M with LiSA in layers 18-29 (12 of 30): parameter bytes of
  the loaded models and the size of the saved ``model.safetensors`` of base and compact model.

    python benchmarks/compact_sizes.py [--demo] [--fractions 0.53 0.84]
"""

from __future__ import annotations

import argparse
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
from lisa_peft.compact import compact_config, parameter_bytes  # noqa: E402
from lisa_peft.models.lisa_llama import LisaLlamaForCausalLM  # noqa: E402
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
    from lisa_peft.base_models import load_base_model

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.53, 0.84])
    parser.add_argument("--demo", action="store_true", help="also measure the demo model (SmolLM2-135M)")
    args = parser.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
