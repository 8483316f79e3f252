"""``multitoken convert``: a Hugging Face folder, a Hub id or a GGUF file into a run directory."""

from __future__ import annotations

import argparse

import logging

from multitoken.cli.options import dtype_arg, ints, path_arg, text_arg
from multitoken.config import MAX_SEQ_LEN, HeadsConfig
from multitoken.errors import UserError

STORED = {"auto": None, "float32": "fp32", "bfloat16": "bf16"}
"""--dtype spellings -> the stored dtypes of io/hf.py."""
log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert a Hugging Face folder or GGUF file into a run directory",
                              description="Convert a Llama (3.x RoPE scaling included) / Qwen2 / Qwen3 / Mistral / Gemma-3 checkpoint "
                                          "(a safetensors folder, a Hub id from the huggingface_hub cache, or a GGUF file) into a run directory.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", type=path_arg, metavar="DIR|ID",
                     help="Hugging Face model folder (config.json + safetensors) or Hub id owner/name (huggingface_hub's cache)")
    src.add_argument("--gguf", type=path_arg, metavar="FILE", help="GGUF file (read through transformers; needs gguf and accelerate)")
    p.add_argument("--out", required=True, type=path_arg, metavar="RUN_DIR", help="run directory to write")
    p.add_argument("--dtype", type=dtype_arg, default="auto", metavar="auto|bfloat16|float32",
                   help="stored weight dtype; auto keeps the source's (fp32 for GGUF); aliases bf16, fp32")
    p.add_argument("--heads", default=None, type=text_arg, metavar="KIND:N", help="add fresh MTP heads initialised from the backbone (e.g. medusa:3)")
    p.add_argument("--tokenizer", default=None, type=path_arg, metavar="PATH", help="tokenizer to use when the folder has none")
    p.add_argument("--max-seq-len", type=ints(1, MAX_SEQ_LEN), default=None, metavar="N",
                   help="shorter context than the checkpoint's max_position_embeddings (sizes the static KV cache; positions < N unchanged)")
    p.set_defaults(func=run, out_kind="convert")


def run(args: argparse.Namespace) -> int:
    from multitoken.io.checkpoint import load_config
    from multitoken.io.hf import convert_gguf, convert_hf
    from multitoken.io.models import resolve

    heads = HeadsConfig.parse(args.heads) if args.heads else None
    if args.dtype not in STORED:
        raise UserError(f"--dtype {args.dtype}: runs store auto, bfloat16 or float32 weights")
    dtype = STORED[args.dtype]
    if args.hf:
        out = convert_hf(resolve(args.hf), args.out, dtype, heads, args.tokenizer, args.max_seq_len)
    else:
        if args.tokenizer:
            raise UserError("--tokenizer is for --hf folders: a GGUF file carries its own tokenizer")
        out = convert_gguf(args.gguf, args.out, dtype, heads, max_seq_len=args.max_seq_len)
    cfg = load_config(out)
    log.info(f"wrote {out}: {cfg.n_layers} layers, d={cfg.dim}, vocab {cfg.vocab_size}, heads {cfg.heads}, eos_id {cfg.eos_id}")
    return 0
