"""``multitoken chat``: an interactive conversation in the terminal, through the model's chat template.

Each line read from stdin is a user turn; the whole conversation so far is rendered through the
chat template and the answer streams to stdout, followed by a line with tau (tokens per
verification step) and the speed on stderr. An empty line, ``/exit`` or end of input ends the
session; ``/reset`` forgets the conversation. Piped stdin works the same, so a script (or a test)
can feed it.
"""

from __future__ import annotations

import argparse
import logging
import sys

from multitoken.cli.generate import add_model_options, add_sampling_options, decode_options, load_pipeline
from multitoken.cli.options import text_arg

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat", help="chat with a model in the terminal through its chat template (tau after each answer)",
        description="Chat with a model: each line you type is a user message; the answer streams back, then tau and "
                    "tokens/s. Empty line, /exit or Ctrl-D quits; /reset starts over.")
    add_model_options(p)
    p.add_argument("--system", default=None, type=text_arg, help="a system message that opens the conversation")
    add_sampling_options(p, max_new_tokens=256)
    p.set_defaults(func=run, tree=None)


def run(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args)
    pipe.encode([{"role": "user", "content": "hi"}])  # no chat template: one line now, not after the first question
    kw = decode_options(args, pipe)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        text = line.strip()
        if not line or not text or text == "/exit":
            return 0
        if text == "/reset":
            messages = list(opening)
            continue
        messages.append({"role": "user", "content": text})
        stream = pipe.stream(messages, stop=args.stop, **kw)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        st = stream.stats
        log.info(f"[tau {st.tau:.2f}, {st.new_tokens} tokens, {st.tokens_per_second:.1f} tok/s, mode {st.mode}]")
        messages.append({"role": "assistant", "content": stream.text})
