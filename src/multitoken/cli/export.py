"""``multitoken export``: a run directory as a Hugging Face folder, MTP heads kept, or its heads as a
speculators folder (vLLM's drafter format; io/speculators.py says which heads map)."""

from __future__ import annotations

import argparse

from multitoken.cli.options import path_arg, text_arg
from multitoken.errors import UserError
from multitoken.io.checkpoint import load_config
from multitoken.io.hf import SUPPORTED_TYPES, export_hf


def register(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser("export", help="export a run as a Hugging Face folder (MTP heads kept)",
                              description="Write a run directory as a folder that transformers' AutoModelForCausalLM loads; "
                                          "MTP weights ride along. --format speculators writes the heads alone as a "
                                          "speculators drafter (sequential heads on a Qwen3-family backbone).")
    e.add_argument("--run", required=True, type=path_arg, metavar="RUN_DIR", help="run directory to export")
    e.add_argument("--out", required=True, type=path_arg, metavar="DIR", help="folder to write")
    e.add_argument("--format", choices=["hf", "speculators"], default="hf",
                   help="hf: the whole model, heads in DeepSeek's / Medusa's layout (default); speculators: the "
                        "heads as vLLM's speculators drafter")
    e.add_argument("--model-type", choices=SUPPORTED_TYPES, default=None, help="config model_type (default: the source's, else llama/qwen2)")
    e.add_argument("--verifier", type=text_arg, default=None, metavar="ID_OR_DIR",
                   help="--format speculators: the backbone vLLM loads as the target (default: the folder the run was converted from)")
    e.set_defaults(func=run, out_kind=lambda args: "speculators" if args.format == "speculators" else "export")


def run(args: argparse.Namespace) -> int:
    if args.format == "speculators":
        from multitoken.io.speculators import SPECULATIVE_TOKENS, SPECULATORS_VERSION, export_speculators

        if args.model_type:
            raise UserError("--model-type is for --format hf: a speculators folder takes its layer type from the backbone")
        out = export_speculators(args.run, args.out, args.verifier)
        print(f"wrote {out}: a speculators {SPECULATORS_VERSION} mtp drafter ({SPECULATIVE_TOKENS} draft token per step, "
              "the steps that equal our heads); `vllm serve` it, see docs/interop.md")
        return 0
    if args.verifier:
        raise UserError("--verifier is for --format speculators: drop it, or add --format speculators")
    out = export_hf(args.run, args.out, args.model_type)
    cfg = load_config(args.run)
    print(f"wrote {out}: loads with AutoModelForCausalLM.from_pretrained; heads {cfg.heads} kept in model.safetensors")
    return 0
