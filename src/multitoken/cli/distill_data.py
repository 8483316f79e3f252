"""``multitoken distill-data``: a DATA_DIR of text the model wrote itself (Magpie chat, code
continuations), with a loss mask on the tokens it did not write; drafting heads train on it."""

from __future__ import annotations

import argparse
import json

from multitoken.cli.options import device_arg, dtype_arg, floats, ints, listed, path_arg
from multitoken.errors import UserError


def pair(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN,MAX (two integers)") from None
    if not 1 <= lo <= hi <= 1 << 16:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 <= MIN <= MAX <= 65536")
    return lo, hi


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "distill-data", help="training data written by the model itself (Magpie chat, code continuations)",
        description="Write a DATA_DIR of conversations and code the model writes itself, for training drafting "
                    "heads that are accepted on any prompt. Chat follows Magpie: the model gets only its chat "
                    "template up to the user turn, writes a user message, then answers it. Code is the model's "
                    "continuation of prefixes cut from --corpus. Tokens the model did not write carry a loss mask.")
    p.add_argument("--run", required=True, type=path_arg, help="the target model's run directory (e.g. from convert)")
    p.add_argument("--out", required=True, type=path_arg, help="DATA_DIR to write (new, empty, or one of ours)")
    p.add_argument("--corpus", type=path_arg, default=None,
                   help="DATA_DIR of `multitoken prepare` (same tokenizer): code prefixes and copied documents")
    p.add_argument("--chat", type=ints(0, 1 << 24), default=2048, help="conversations to write (default 2048)")
    p.add_argument("--code", type=ints(0, 1 << 24), default=2048, help="code continuations to write (default 2048)")
    p.add_argument("--corpus-tokens", type=ints(0, 1 << 40), default=0,
                   help="tokens of whole --corpus documents copied beside (default 0)")
    p.add_argument("--keep", type=path_arg, action="append", default=[], metavar="DATA_DIR",
                   help="an earlier distill-data folder of this model to carry over (repeatable): data written on "
                        "several machines adds up; keep folders written without --corpus-tokens, so no corpus text comes twice")
    p.add_argument("--continuous", action="store_true",
                   help="continuous batching: a request joins as soon as another leaves (each conversation or code piece "
                        "at its own temperature; --chat/--code count the ones started)")
    p.add_argument("--batch-size", type=ints(1, 4096), default=64, help="rows per generation batch (default 64)")
    p.add_argument("--user-tokens", type=ints(1, 1 << 16), default=128, help="most tokens of a user message (default 128)")
    p.add_argument("--answer-tokens", type=ints(1, 1 << 16), default=384, help="most tokens of an answer (default 384)")
    p.add_argument("--code-tokens", type=ints(1, 1 << 16), default=256, help="most tokens of a code continuation (default 256)")
    p.add_argument("--code-prefix", type=pair, default=(32, 256), metavar="MIN,MAX", help="code prefix length in tokens (default 32,256)")
    p.add_argument("--temperatures", type=listed(floats(0, 10)), default=[0.0, 0.7, 1.0],
                   help="answers cycle through these, a batch at a time (default 0,0.7,1)")
    p.add_argument("--top-p", type=floats(0, 1, lo_open=True), default=0.95, help="nucleus of sampled batches (default 0.95)")
    p.add_argument("--multi-turn", type=floats(0, 1), default=0.25, help="share of conversations given a second turn (default 0.25)")
    p.add_argument("--max-minutes", type=floats(0, 1e6, lo_open=True), default=None, help="stop generating after this long")
    p.add_argument("--seed", type=ints(0, (1 << 63) - 1), default=0, help="seed (default 0)")
    p.add_argument("--device", default="auto", type=device_arg, help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", type=dtype_arg,
                   help="weights while generating: auto|bfloat16|float16|float32; auto = bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from multitoken.data.evalsets import user_texts
    from multitoken.io.checkpoint import load_run
    from multitoken.training.selfgen import SelfGenConfig, distill_data

    cfg = SelfGenConfig(chat=args.chat, code=args.code, batch_size=args.batch_size, user_tokens=args.user_tokens,
                        answer_tokens=args.answer_tokens, code_prefix=tuple(args.code_prefix), code_tokens=args.code_tokens,
                        temperatures=tuple(args.temperatures), top_p=args.top_p, multi_turn=args.multi_turn,
                        corpus_tokens=args.corpus_tokens, max_minutes=args.max_minutes, seed=args.seed,
                        continuous=args.continuous)
    if args.code and not args.corpus:
        raise UserError("--code needs --corpus DATA_DIR to cut code prefixes from (or pass --code 0)")
    from multitoken.io import outdir

    outdir.check(args.out, "prepare")  # before the model loads: a refused --out costs nothing
    dtype = None
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)
    model, tok = load_run(args.run, device=args.device)
    if tok is None:
        raise UserError(f"{args.run} has no tokenizer: distill-data needs the model's tokenizer")
    if dtype is None:
        dtype = torch.bfloat16 if model.embed_tokens.weight.device.type == "cuda" else torch.float32
    model = model.to(dtype).eval()
    meta = distill_data(model, tok, args.out, cfg, corpus=args.corpus, exclude=user_texts(), progress=not args.quiet,
                        keep=args.keep)
    g = meta["self_generated"]
    print(json.dumps({"out": str(args.out), "splits": {k: {x: v[x] for x in ("docs", "tokens", "written")} for k, v in meta["splits"].items()},
                      "tokens_per_s": g["tokens_per_s"], "filters": g["filters"],
                      "distinct_2": {k: g["diversity"][k].get("distinct_2") for k in ("user_messages", "answers", "code")}}))
    return 0
