"""`lisa-peft push ADAPTER_DIR ORG/NAME`: upload a saved LiSA adapter and its model card to the Hub."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "push",
        help="upload a saved LiSA adapter (config, safetensors weights, model card) to a Hub repo",
        description=(
            "Upload adapter_config.json, adapter_model.safetensors and README.md (the LiSA model card) of "
            "ADAPTER_DIR to the Hub repo ORG/NAME, creating the repo and the --revision branch when missing. "
            "The token comes from --token, else HF_TOKEN or the stored `hf auth login`; HF_ENDPOINT selects the Hub."
        ),
    )
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder written by model.save_pretrained(...)")
    parser.add_argument("repo_id", metavar="ORG/NAME", help="Hub repo id of the adapter")
    parser.add_argument("--revision", default=None, metavar="B", help="branch to push to (default: main)")
    parser.add_argument(
        "--private", action="store_true", default=None, help="create the repo as private (if it does not exist)"
    )
    parser.add_argument("--token", default=None, metavar="T", help="Hub token (default: HF_TOKEN / stored login)")
    parser.add_argument("--message", default=None, help="commit message (default: 'Upload LiSA adapter')")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from lisa_peft.integrations.hub import LisaAdapterError, push_adapter

    try:
        url = push_adapter(
            args.adapter_dir, args.repo_id, revision=args.revision, private=args.private, token=args.token,
            commit_message=args.message,
        )
    except (LisaAdapterError, HfHubHTTPError) as err:
        print(f"lisa-peft push: {err}", file=sys.stderr)
        return 1
    print(url)
    return 0
