"""``multitoken eval``: per-depth validation loss and accuracy of a run, and its expected tau."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from multitoken.checks import Range
from multitoken.cli.options import ints, option, path_arg, text_arg
from multitoken.config import MAX_SEQ_LEN
from multitoken.io.checkpoint import CONFIG_FILE, load_run, read_json
from multitoken.training.evaluate import check_same_tokenizer, evaluate, format_table, plot_accuracy
from multitoken.training.parallel import resolve_device


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``multitoken eval``."""
    p = subparsers.add_parser("eval", help="per-depth validation loss/accuracy and expected tau of a run",
                              description="Evaluate RUN_DIR on DATA_DIR's validation split: loss and top-1 accuracy per "
                              "depth, and the mean accepted length greedy chain drafting would reach.")
    p.add_argument("--run", required=True, type=path_arg, metavar="RUN_DIR", help="a run directory (from train or convert)")
    p.add_argument("--data", required=True, type=path_arg, metavar="DATA_DIR", help="a prepared DATA_DIR (its val split is read)")
    p.add_argument("--batches", type=ints(1, 1 << 20), default=20, metavar="N", help="validation batches (default 20)")
    p.add_argument("--batch-size", type=ints(1, 1 << 20), default=8, help="windows per batch (default 8)")
    p.add_argument("--seq-len", type=option(Range(2, MAX_SEQ_LEN, integer=True, or_zero=True)), default=0, help="tokens per window (default: the run's training seq_len, else 256)")
    p.add_argument("--device", default="auto", type=text_arg, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    check_same_tokenizer(args.run, args.data, f"evaluate on data prepared with the run's tokenizer "
                         f"(`multitoken prepare --tokenizer {Path(args.run) / 'tokenizer.json'} ...`)")
    # the run's tokenizer is checked against its recorded fingerprint (eval reads the data's, not it)
    model, _ = load_run(args.run, device=device, with_tokenizer=(Path(args.run) / "tokenizer.json").is_file())
    seq_len = args.seq_len or read_json(Path(args.run) / CONFIG_FILE).get("train", {}).get("seq_len", 0)
    seq_len = min(seq_len or 256, model.config.max_seq_len)
    result = evaluate(model, args.data, args.batches, batch_size=args.batch_size, seq_len=seq_len, device=device)
    result["run"], result["data"] = str(args.run), str(args.data)
    plot_accuracy(result, Path(args.run) / "accuracy_per_depth.png")
    print(json.dumps(result, indent=2) if args.json else format_table(result), file=sys.stdout)
    return 0
