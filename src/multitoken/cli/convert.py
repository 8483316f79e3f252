"""``multitoken convert``: a Hugging Face folder or a GGUF file into a run directory."""

from __future__ import annotations

import argparse

from multitoken.cli.options import ints, path_arg, text_arg
from multitoken.config import MAX_SEQ_LEN, HeadsConfig
from multitoken.errors import UserError
from multitoken.io.checkpoint import load_config
from multitoken.io.hf import DTYPES, convert_gguf, convert_hf


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert a Hugging Face folder or GGUF file into a run directory",
                              description="Convert a local Llama / Qwen2 / Mistral checkpoint (safetensors folder or GGUF file) into a run directory.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", type=path_arg, metavar="DIR", help="Hugging Face model folder (config.json + safetensors)")
    src.add_argument("--gguf", type=path_arg, metavar="FILE", help="GGUF file (read through transformers; needs gguf and accelerate)")
    p.add_argument("--out", required=True, type=path_arg, metavar="RUN_DIR", help="run directory to write")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="stored weight dtype (default: the source's; fp32 for GGUF)")
    p.add_argument("--heads", default=None, type=text_arg, metavar="KIND:N", help="add fresh MTP heads initialised from the backbone (e.g. medusa:3)")
    p.add_argument("--tokenizer", default=None, type=path_arg, metavar="PATH", help="tokenizer to use when the folder has none")
    p.add_argument("--max-seq-len", type=ints(1, MAX_SEQ_LEN), default=None, metavar="N",
                   help="shorter context than the checkpoint's max_position_embeddings (sizes the static KV cache; positions < N unchanged)")
    p.set_defaults(func=run, out_kind="convert")


def run(args: argparse.Namespace) -> int:
    heads = HeadsConfig.parse(args.heads) if args.heads else None
    if args.hf:
        out = convert_hf(args.hf, args.out, args.dtype, heads, args.tokenizer, args.max_seq_len)
    else:
        if args.tokenizer:
            raise UserError("--tokenizer is for --hf folders: a GGUF file carries its own tokenizer")
        out = convert_gguf(args.gguf, args.out, args.dtype, heads, max_seq_len=args.max_seq_len)
    cfg = load_config(out)
    print(f"wrote {out}: {cfg.n_layers} layers, d={cfg.dim}, vocab {cfg.vocab_size}, heads {cfg.heads}, eos_id {cfg.eos_id}")
    return 0
