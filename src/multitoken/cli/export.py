"""``multitoken export``: a run directory as a Hugging Face folder, MTP heads kept."""

from __future__ import annotations

import argparse

from multitoken.cli.options import path_arg
from multitoken.io.checkpoint import load_config
from multitoken.io.hf import SUPPORTED_TYPES, export_hf


def register(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser("export", help="export a run as a Hugging Face folder (MTP heads kept)",
                              description="Write a run directory as a folder that transformers' AutoModelForCausalLM loads; MTP weights ride along.")
    e.add_argument("--run", required=True, type=path_arg, metavar="RUN_DIR", help="run directory to export")
    e.add_argument("--out", required=True, type=path_arg, metavar="HF_DIR", help="folder to write")
    e.add_argument("--model-type", choices=SUPPORTED_TYPES, default=None, help="config model_type (default: the source's, else llama/qwen2)")
    e.set_defaults(func=run, out_kind="export")


def run(args: argparse.Namespace) -> int:
    out = export_hf(args.run, args.out, args.model_type)
    cfg = load_config(args.run)
    print(f"wrote {out}: loads with AutoModelForCausalLM.from_pretrained; heads {cfg.heads} kept in model.safetensors")
    return 0
