"""Trainable parameters, adapter file size and K/V-cache bytes of LiSA on LLaMA shapes (no weights).

The model is built on the meta device (no memory, no download), LiSA is injected with PEFT, and
the numbers come from the real module tree: parameter counts from `get_nb_trainable_parameters`,
the adapter file size from safetensors' layout (8-byte header length + JSON header + raw data).

    python benchmarks/adapter_budget.py                 # LLaMA-2-7B, -13B, LLaMA-3-8B
    python benchmarks/adapter_budget.py --fraction 0.6
"""

from __future__ import annotations

import argparse
import json

import torch
import transformers
from peft import get_peft_model

import lisa_peft  # noqa: F401  (registers LISA)
from lisa_peft import LisaConfig
from lisa_peft.evaluation.memory import kv_cache_bytes
from lisa_peft.tuners.lisa.model import default_rank

SHAPES = {
    "LLaMA-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "LLaMA-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256),
    "LLaMA-2-13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000),
}


def safetensors_size(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Exact size of a safetensors file holding tensors of these shapes/dtypes."""
    header, offset = {}, 0
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    for name, (shape, dtype) in sorted(tensors.items()):
        nbytes = torch.empty((), dtype=dtype).element_size()
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return 8 + len(text) + offset


def budget(name: str, fraction: float, seq_len: int = 4096) -> dict:
    """LiSA in the last `fraction` of the layers (a stand-in for `lisa_layers='auto'`)."""
    config = transformers.LlamaConfig(**SHAPES[name])
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(config)
    layers = config.num_hidden_layers
    lisa_layers = list(range(layers - round(fraction * layers), layers))
    r = default_rank(config.head_dim)
    planes = {str(i): [list(range(r // 2))] * config.num_key_value_heads for i in lisa_layers}  # no weights: any
    model = get_peft_model(base, LisaConfig(lisa_layers=lisa_layers, rotary_planes=planes))
    trainable, total = model.get_nb_trainable_parameters()
    state = {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters() if p.requires_grad}
    fp16_state = {n: (shape, torch.bfloat16) for n, (shape, _) in state.items()}
    kv = kv_cache_bytes(config, lisa_layers, batch_size=1, seq_len=seq_len, dtype=torch.float16)
    keys = kv_cache_bytes(config, lisa_layers, batch_size=1, seq_len=seq_len, dtype=torch.float16, keys_only=True)
    return {
        "model": name, "lisa_layers": f"{len(lisa_layers)}/{layers}", "r": model.peft_config["default"].r,
        "trainable": trainable, "trainable_pct": 100 * trainable / total,
        "adapter_fp32_bytes": safetensors_size(state), "adapter_bf16_bytes": safetensors_size(fp16_state),
        "k_cache_base": keys.base, "k_cache_lisa": keys.lisa, "kv_cache_base": kv.base, "kv_cache_lisa": kv.lisa,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.625, help="Fraction of layers made LiSA (20/32).")
    parser.add_argument("--seq-len", type=int, default=4096)
    args = parser.parse_args(argv)
    mib = 2**20
    print(f"| model | LiSA layers | r | trainable | % | adapter fp32 / bf16 | K cache @{args.seq_len} fp16 "
          "base -> LiSA | K+V cache |")
    print("|---|---|---|---|---|---|---|---|")
    for name in SHAPES:
        b = budget(name, args.fraction, args.seq_len)
        print(f"| {b['model']} | {b['lisa_layers']} | {b['r']} | {b['trainable']:,} | {b['trainable_pct']:.2f} | "
              f"{b['adapter_fp32_bytes'] / mib:.0f} / {b['adapter_bf16_bytes'] / mib:.0f} MiB | "
              f"{b['k_cache_base'] / mib:.0f} -> {b['k_cache_lisa'] / mib:.0f} MiB "
              f"(-{100 * (1 - b['k_cache_lisa'] / b['k_cache_base']):.1f}%) | "
              f"{b['kv_cache_base'] / mib:.0f} -> {b['kv_cache_lisa'] / mib:.0f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
