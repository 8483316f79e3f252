"""``multitoken prepare``: tokenize a corpus into a DATA_DIR."""

from __future__ import annotations

import argparse

from multitoken.cli.options import floats, ints, path_arg, text_arg, tokenizer_arg
from multitoken.data.corpora import STDLIB
from multitoken.data.prepare import DEFAULT_VAL_FRACTION, prepare, summary


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``multitoken prepare``."""
    p = subparsers.add_parser(
        "prepare",
        help="tokenize a corpus into a DATA_DIR (train.bin, val.bin, tokenizer, meta.json)",
        description="Tokenize a corpus into DATA_DIR: train.bin and val.bin (documents separated by EOS), "
        "the tokenizer, and meta.json. Re-running with the same arguments reuses DATA_DIR.",
    )
    p.add_argument("--corpus", required=True, type=path_arg, help=f"{STDLIB}, a directory, a .txt/.jsonl/.parquet file, or a saved HF dataset")
    p.add_argument("--tokenizer", required=True, type=tokenizer_arg, help="bpe:N (train a byte-level BPE of N ids), bytes, or a tokenizer.json / model folder / .gguf")
    p.add_argument("--out", required=True, type=path_arg, metavar="DATA_DIR", help="directory to write")
    p.add_argument("--glob", default=None, type=text_arg, help="files of a directory corpus (default **/*.txt)")
    p.add_argument("--field", default="text", type=text_arg, help="text field of .jsonl/.parquet/dataset corpora (default: text)")
    p.add_argument("--max-docs", type=ints(1), default=None, metavar="N", help="read only the first N documents")
    p.add_argument("--val-fraction", type=floats(0, 1, lo_open=True, hi_open=True), default=DEFAULT_VAL_FRACTION, help=f"share of documents for validation (default {DEFAULT_VAL_FRACTION})")
    p.add_argument("--include-tests", action="store_true", help=f"{STDLIB}: keep the test folders")
    p.add_argument("--force", action="store_true", help="rebuild even if DATA_DIR already holds this prepare")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, out_kind="prepare")


def run(args: argparse.Namespace) -> int:
    meta = prepare(args.corpus, args.tokenizer, args.out, glob=args.glob, field=args.field, val_fraction=args.val_fraction,
                   max_docs=args.max_docs, include_tests=args.include_tests, force=args.force, progress=not args.quiet)
    print(summary(meta, args.out))
    return 0
