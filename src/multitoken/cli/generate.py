"""``multitoken generate``: text from a run, plainly or self-speculatively, streamed or as JSON."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from multitoken.checks import INT63, MAX_NEW_TOKENS, SAMPLING_RANGES
from multitoken.cli.options import device_arg, ints, option, path_arg, text_arg
from multitoken.config import MAX_HEAD_DEPTH
from multitoken.decoding.api import MODES, TextStream
from multitoken.errors import UserError
from multitoken.io.checkpoint import load_run


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from a run, plainly or self-speculatively")
    p.add_argument("--run", required=True, type=path_arg, help="run directory (from train, convert or a retrofit)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=path_arg, help="file holding the prompt text")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="ntp: plain; spec: chain drafts; tree: draft tree (default: spec when the run has heads, else ntp)")
    p.add_argument("--draft", type=ints(1, MAX_HEAD_DEPTH), default=None, help="drafted tokens per step (default: all heads)")
    p.add_argument("--tree", default=None, type=path_arg,
                   help="tree mode: a tree.json, or 'dynamic:N' (default: RUN_DIR/tree.json if present, else dynamic:16)")
    p.add_argument("--temperature", type=option(SAMPLING_RANGES["temperature"]), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=option(SAMPLING_RANGES["top_k"]), default=0)
    p.add_argument("--top-p", type=option(SAMPLING_RANGES["top_p"]), default=1.0)
    p.add_argument("--seed", type=ints(0, INT63), default=None)
    p.add_argument("--max-new-tokens", type=ints(1, MAX_NEW_TOKENS), default=128)
    p.add_argument("--stop", action="append", default=[], type=text_arg, help="stop string (repeatable)")
    p.add_argument("--typical", "--typical-lossy", dest="typical", action="store_true",
                   help="LOSSY Medusa typical acceptance: faster at temperature > 0, changes the output distribution")
    p.add_argument("--device", default="auto", type=device_arg, help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt-file {path} not found: give an existing text file")
        try:
            prompt = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--prompt-file {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    else:
        prompt = args.prompt
    if not prompt:
        raise UserError("empty prompt: give at least one character of prompt text")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer = load_run(args.run, device=args.device, dtype=dtype)
    if args.mode is None:
        args.mode = "spec" if model.depth else "ntp"
    tree = None
    if args.mode == "tree":
        from multitoken.decoding.trees import resolve_tree

        tree = resolve_tree(args.tree, args.run)
    stream = TextStream(model, tokenizer, prompt, stop=args.stop, max_new_tokens=args.max_new_tokens, mode=args.mode,
                        draft=args.draft, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, tree=tree, lossy_typical=args.typical)
    if args.json:
        for _ in stream:
            pass
        st = stream.stats
        print(json.dumps({"text": stream.text, "token_ids": stream.token_ids, "tau": st.tau,
                          "acceptance_per_position": st.acceptance_per_position,
                          "tokens_per_second": st.tokens_per_second, "steps": st.steps, "stats": st.to_dict()}))
        return 0
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(stream.stats.summary(), file=sys.stderr)
    return 0
