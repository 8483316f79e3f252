"""``multitoken generate``: text from a run, a Hugging Face folder or a Hub id, plainly or
self-speculatively; one prompt streamed, or a batch of prompts (one a line, from a file or stdin).

Heavy modules (torch, the model) are imported in `run`, so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from multitoken.checks import INT63, MAX_NEW_TOKENS, SAMPLING_RANGES
from multitoken.cli.options import device_arg, dtype_arg, ints, option, path_arg, text_arg
from multitoken.config import MAX_HEAD_DEPTH
from multitoken.errors import UserError

MODES = ("ntp", "spec", "tree")  # decoding.api.MODES, named here so that parsing imports no torch
log = logging.getLogger(__name__)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--run, --heads, --device, --dtype: what `multitoken.load` takes (generate and chat share them)."""
    p.add_argument("--run", "--model", dest="run", required=True, type=path_arg, metavar="NAME",
                   help="run directory, Hugging Face model folder (an export included) or Hub id owner/name "
                        "(read from the huggingface_hub cache; HF_HUB_OFFLINE=1 reads only the cache)")
    p.add_argument("--heads", default=None, type=text_arg, metavar="FILE|KIND:N",
                   help="a heads file trained on this model (save_heads), or KIND:N for fresh heads (default: the model's own)")
    p.add_argument("--device", default="auto", type=device_arg, help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", type=dtype_arg, metavar="auto|bfloat16|float16|float32",
                   help="compute dtype; auto keeps the stored one (aliases: bf16, fp16, fp32)")


def add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """Decoding mode and sampling (generate and chat share them)."""
    p.add_argument("--mode", choices=MODES, default=None,
                   help="ntp: plain; spec: chain drafts; tree: draft tree (default: spec when the model has heads, else ntp)")
    p.add_argument("--draft", type=ints(1, MAX_HEAD_DEPTH), default=None, help="drafted tokens per step (default: all heads)")
    p.add_argument("--temperature", type=option(SAMPLING_RANGES["temperature"]), default=0.0,
                   help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=option(SAMPLING_RANGES["top_k"]), default=0, help="sample among the k likeliest tokens; 0 = all")
    p.add_argument("--top-p", type=option(SAMPLING_RANGES["top_p"]), default=1.0, help="nucleus sampling mass; 1 = off")
    p.add_argument("--seed", type=ints(0, INT63), default=None, help="sampling seed (default: unseeded)")
    p.add_argument("--max-new-tokens", type=ints(1, MAX_NEW_TOKENS), default=max_new_tokens, help="most new tokens per prompt")
    p.add_argument("--stop", action="append", default=[], type=text_arg, help="stop string (repeatable)")
    p.add_argument("--typical", "--typical-lossy", dest="typical", action="store_true",
                   help="LOSSY Medusa typical acceptance: faster at temperature > 0, changes the output distribution")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text from a run, a Hugging Face folder or a Hub id, plainly or self-speculatively",
        description="Continue a prompt with a model. One prompt streams its text to stdout (statistics on stderr); "
                    "--prompts FILE (or - for stdin) decodes one prompt per line as a batch. With heads, decoding is "
                    "self-speculative by default, and its output equals plain decoding.")
    add_model_options(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=path_arg, metavar="FILE", help="file holding one prompt (all of its text)")
    src.add_argument("--prompts", type=path_arg, metavar="FILE|-",
                     help="file of prompts, one a line ('-': stdin), decoded as a batch (default when stdin is piped)")
    p.add_argument("--chat", action="store_true", help="send each prompt as a user message through the model's chat template")
    add_sampling_options(p)
    p.add_argument("--tree", default=None, type=path_arg,
                   help="tree mode: a tree.json, or 'dynamic:N' (default: RUN_DIR/tree.json if present, else dynamic:16)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of streaming text")
    p.set_defaults(func=run)


def read_prompts(args: argparse.Namespace) -> tuple[list[str], bool]:
    """(prompts, batch): from --prompt, --prompt-file, --prompts FILE|- or piped stdin."""
    from pathlib import Path

    if args.prompt is not None:
        prompts, batch = [args.prompt], False
    elif args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt-file {path} not found: give an existing text file")
        try:
            prompts, batch = [path.read_text(encoding="utf-8")], False
        except UnicodeDecodeError as e:
            raise UserError(f"--prompt-file {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    else:
        name = args.prompts
        missing = UserError("no prompt: give --prompt TEXT, --prompt-file FILE, --prompts FILE, or pipe prompts on stdin")
        if name is None and (sys.stdin is None or sys.stdin.isatty()):
            raise missing
        if name in (None, "-"):
            try:
                text = sys.stdin.read()
            except (OSError, ValueError):  # stdin closed or not readable (a service, a test harness)
                raise missing from None
        else:
            path = Path(name)
            if not path.is_file():
                raise UserError(f"--prompts {path} not found: give a text file with one prompt a line, or - for stdin")
            text = path.read_text()
        prompts, batch = [line for line in text.splitlines() if line.strip()], True
        if not prompts:
            raise UserError("no prompts: the input has no non-empty line")
    if not all(prompts):
        raise UserError("empty prompt: give at least one character of prompt text")
    return prompts, batch


def load_pipeline(args: argparse.Namespace):
    """The `Pipeline` for --run/--heads/--device/--dtype."""
    from multitoken.pipeline import load

    return load(args.run, heads=args.heads, device=args.device, dtype=args.dtype)


def decode_options(args: argparse.Namespace, pipe) -> dict:
    """Keyword arguments of `Pipeline.generate` / `stream` from the sampling options."""
    mode = args.mode or pipe.default_mode
    kw = dict(max_new_tokens=args.max_new_tokens, mode=mode, draft=args.draft, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, seed=args.seed, lossy_typical=args.typical)
    if mode == "tree":
        from multitoken.decoding.trees import resolve_tree

        kw["tree"] = resolve_tree(getattr(args, "tree", None), args.run)
    return kw


def run(args: argparse.Namespace) -> int:
    prompts, batch = read_prompts(args)
    pipe = load_pipeline(args)
    kw = decode_options(args, pipe)
    inputs = [[{"role": "user", "content": p}] for p in prompts] if args.chat else prompts
    if batch:
        done = pipe.generate(inputs, stop=args.stop, **kw)
        for c in done:
            sys.stdout.write((json.dumps({"text": c.text, "token_ids": c.token_ids}) if args.json else c.text) + "\n")
        log.info(done[0].stats.summary())
        return 0
    stream = pipe.stream(inputs[0], stop=args.stop, **kw)
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
    log.info(stream.stats.summary())
    return 0
