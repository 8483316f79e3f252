"""``multitoken draft-vocab``: store the V' most frequent training tokens in a heads file as its draft vocabulary."""

from __future__ import annotations

import argparse

from multitoken.cli.options import ints, path_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("draft-vocab", help="draft over the N most frequent tokens of DATA_DIR (a heads file's d2t/t2d maps)",
                              description="Count the tokens of DATA_DIR's training split and store the N most frequent "
                                          "(EOS always among them) in a heads file: its heads then draft over those N tokens "
                                          "only, while verification keeps the whole vocabulary (the output is unchanged).")
    p.add_argument("--data", required=True, type=path_arg, metavar="DATA_DIR", help="data prepared with the model's tokenizer")
    p.add_argument("--size", required=True, type=ints(1, 1 << 24), metavar="N", help="tokens in the draft vocabulary (e.g. 8192)")
    p.add_argument("--heads-file", required=True, type=path_arg, metavar="FILE", help="heads file written by save_heads (rewritten in place)")
    p.add_argument("--out", default=None, type=path_arg, metavar="FILE", help="write the new heads file here instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from multitoken.data.draft_vocab import count_tokens, frequent_tokens
    from multitoken.data.prepare import load_meta
    from multitoken.io.heads_file import heads_info, write_draft_vocab

    heads_info(args.heads_file)  # a one-line error before counting when the file is not a heads file
    meta = load_meta(args.data)
    counts = count_tokens(args.data)
    eos = meta.get("eos_id")
    ids = frequent_tokens(counts, args.size, [eos] if isinstance(eos, int) and 0 <= eos < len(counts) else [])
    path = write_draft_vocab(args.heads_file, ids, len(counts), args.out)
    covered = float(counts[ids.numpy()].sum()) / max(float(counts.sum()), 1.0)
    print(f"wrote {path}: draft vocabulary of {ids.numel()} of {len(counts)} tokens, "
          f"covering {covered:.1%} of the training tokens")
    return 0
