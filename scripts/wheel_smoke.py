"""Smoke test of an *installed* lisa-peft (a built wheel), run from outside the checkout.

`scripts/check_wheel.sh` builds the wheel, installs it into a fresh virtual environment and runs this file
with that environment's Python in isolated mode (`-I`: no script folder, no user site on `sys.path`) from an
empty directory. It checks what a user of the wheel meets: the import, the README quick start (taken from
the README itself), adapter save/load, the compact model through `AutoModelForCausalLM`, the CLI, the
bundled recipes, and that the core install is lean (no optional package, and the errors name the extra).

Usage: python -I wheel_smoke.py README.md
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

OPTIONAL = {"gguf": "demo", "matplotlib": "plot", "lm_eval": "eval", "evaluate": "eval", "datasets": "data",
            "triton": "triton"}


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"[wheel-smoke] FAILED: {message}")
    print(f"[wheel-smoke] ok: {message}")


def quick_start_block(readme: Path) -> str:
    text = readme.read_text(encoding="utf-8")
    section = text[text.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def main(readme: Path) -> None:
    import lisa_peft

    installed = Path(lisa_peft.__file__).resolve()
    check("site-packages" in installed.parts, f"lisa_peft imported from the installed wheel ({installed.parent})")
    check(not any(Path(p).name == "src" for p in sys.path if p), "no src/ folder on sys.path")

    namespace: dict = {}
    exec(compile(quick_start_block(readme), "README.md: Quick start", "exec"), namespace)  # noqa: S102
    check(True, "the README quick start runs")

    import torch
    import transformers
    from peft import PeftModel

    model, base_config, ids = namespace["model"], namespace["config"], namespace["ids"]
    with torch.no_grad():
        expected = model(ids).logits
        torch.manual_seed(0)  # the quick start's seed: the same random base weights
        fresh_base = transformers.LlamaForCausalLM(base_config).eval()
        reloaded = PeftModel.from_pretrained(fresh_base, "runs/readme-adapter")
        check(torch.equal(reloaded(ids).logits, expected), "adapter save -> load gives the same logits")
        card = Path("runs/readme-adapter/README.md").read_text(encoding="utf-8")
        check("LiSA" in card and "{{" not in card, "the adapter's model card is rendered from the packaged template")

        compact = model.merge_and_unload()
        compact.save_pretrained("runs/compact")
        loaded = transformers.AutoModelForCausalLM.from_pretrained("runs/compact")
        check(type(loaded).__name__ == "LisaLlamaForCausalLM", "AutoModelForCausalLM loads the compact folder")
        check(torch.allclose(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5),
              "the compact model gives the adapter's logits")

    cli = shutil.which("lisa-peft", path=str(Path(sys.executable).parent))
    check(cli is not None, "the lisa-peft console script is installed")
    help_text = subprocess.run([cli, "--help"], check=True, capture_output=True, text=True).stdout
    check("train" in help_text and "demo" in help_text and "recipes" in help_text, "lisa-peft --help")
    listing = subprocess.run([cli, "recipes"], check=True, capture_output=True, text=True).stdout
    check(all(name in listing for name in ("demo_smollm2_cpu", "quality_smollm2_cpu", "llama3_8b")),
          "lisa-peft recipes lists the bundled recipes")
    ddp = subprocess.run([cli, "recipes", "--accelerate-config", "ddp"], check=True, capture_output=True,
                         text=True).stdout.strip()
    check(Path(ddp).is_file() and "site-packages" in ddp, "the accelerate configs ship with the package")

    missing = [name for name in OPTIONAL if importlib.util.find_spec(name) is None]
    if os.environ.get("LISA_SMOKE_CORE_ONLY") == "1":
        check(len(missing) == len(OPTIONAL), f"the core install pulls no optional package (missing: {missing})")
        env = {**os.environ, "LISA_PEFT_CACHE": str(Path("empty-cache").resolve())}
        demo = subprocess.run([cli, "demo", "--quiet"], capture_output=True, text=True, env=env)
        check(demo.returncode == 2 and "lisa-peft[demo]" in demo.stderr and "Traceback" not in demo.stderr,
              f"lisa-peft demo without the demo extra names it: {demo.stderr.strip()[:160]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
