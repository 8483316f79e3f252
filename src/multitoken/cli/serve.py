"""``multitoken serve``: an OpenAI-compatible HTTP server (continuous batching, exact speculative decoding).

The app is in `multitoken.serve`; this file loads the model, checks the options and runs uvicorn,
whose SIGTERM/SIGINT handling stops accepting connections, lets the requests in flight finish,
then ends the decoding thread (the app's lifespan) and exits.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import torch

from multitoken.checks import Range
from multitoken.cli.options import device_arg, dtype_arg, ints, option, path_arg, text_arg
from multitoken.config import MAX_HEAD_DEPTH
from multitoken.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a run over OpenAI's HTTP API (continuous batching, speculative decoding)",
        description="Serve a model over OpenAI's HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
                    "/health, /metrics) with continuous batching and exact self-speculative decoding (on by default).")
    p.add_argument("--run", required=True, type=path_arg, help="run directory (from train, convert or a retrofit)")
    p.add_argument("--heads-file", type=path_arg, default=None, metavar="FILE",
                   help="attach these heads (a file written by retrofit.save_heads) to the run's plain model")
    p.add_argument("--host", default="127.0.0.1", type=text_arg, help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=ints(0, 65535), default=8000, help="TCP port (0: any free one)")
    p.add_argument("--slots", type=ints(1, 1024), default=16, help="requests decoded together (rows of the batch)")
    p.add_argument("--mode", choices=["spec", "ntp"], default=None,
                   help="spec: speculative decoding, exact (the default when the model has heads); ntp: plain")
    p.add_argument("--draft", type=ints(1, MAX_HEAD_DEPTH), default=None, help="drafted tokens per step, fixed (default: all heads, fewer or none where measured step costs say so; see docs/serving.md)")
    p.add_argument("--sync-every", type=ints(1, 64), default=None, help="steps between reads of the device (default 4 on CUDA, 1 on the CPU)")
    p.add_argument("--model-name", type=text_arg, default=None, help="the model id clients name (default: the run folder's name)")
    p.add_argument("--max-seq-len", type=option(Range(2, 1 << 20, integer=True)), default=None, help="context (sizes the KV cache)")
    p.add_argument("--device", default="auto", type=device_arg, help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", type=dtype_arg,
                   help="weights: auto|bfloat16|float16|float32 (default auto: the run's own)")
    p.set_defaults(func=run)


def load(args: argparse.Namespace):
    """The model (on its device, eval mode) and tokenizer the options name."""
    from multitoken.io.checkpoint import load_run

    if not Path(args.run).is_dir():
        raise UserError(f"run directory {args.run} does not exist: train one with `multitoken train` or `multitoken convert`")
    dtype = getattr(torch, args.dtype) if args.dtype and args.dtype != "auto" else None
    if args.heads_file:
        from multitoken.io.heads_file import attach_heads

        model, tok = attach_heads(args.run, args.heads_file, args.max_seq_len)
        model = model.to(args.device, dtype) if dtype else model.to(args.device)
    else:
        model, tok = load_run(args.run, device=args.device, dtype=dtype)
        if args.max_seq_len:
            from multitoken.io.hf import limit_context

            limit_context(model, args.max_seq_len)
    if tok is None:
        raise UserError(f"{args.run} has no tokenizer: serve a run written by train, convert or retrofit")
    return model.eval(), tok


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from multitoken.serve.app import build_app
    except ImportError as e:
        raise UserError(f"serving needs the [serve] extra ({e.name} is missing): pip install 'multitoken[serve]'") from None
    model, tok = load(args)
    mode = args.mode or ("spec" if model.depth else "ntp")
    if mode == "spec" and not model.depth:
        raise UserError("--mode spec needs MTP heads and this model has none: use --mode ntp, or give --heads-file")
    if args.draft is not None and args.draft > model.depth:
        raise UserError(f"--draft {args.draft}: this model has {model.depth} MTP head(s), so draft between 1 and {model.depth}")
    cuda = next(model.parameters()).device.type == "cuda"
    sync_every = args.sync_every or (4 if cuda else 1)
    name = args.model_name or Path(args.run).resolve().name
    app = build_app(model, tok, name, slots=args.slots, mode=mode, draft=args.draft, sync_every=sync_every)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    print(f"multitoken serve: {name} ({model.config.heads if model.depth else 'no heads'}, mode {mode}, "
          f"{args.slots} slots) on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    # uvicorn drains on SIGTERM, then raises the signal again under the handler it found: with
    # this one, a drained server ends with status 0 instead of dying of the repeated signal.
    signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        server.run()
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}): choose another --port or --host") from None
    return 0
