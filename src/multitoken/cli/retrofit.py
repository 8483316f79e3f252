"""``multitoken retrofit``: heads on a frozen pretrained run, trained on backbone features computed once."""

from __future__ import annotations

import argparse

from multitoken.checks import INT63
from multitoken.cli.options import ints, option, path_arg, text_arg
from multitoken.config import HeadsConfig
from multitoken.config import MAX_SEQ_LEN, TRAIN_RANGES
from multitoken.training.retrofit import retrofit


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("retrofit", help="train MTP heads on a frozen pretrained model from backbone features computed once",
                              description="Add heads to a frozen pretrained run, precompute its backbone states once over DATA_DIR, "
                                          "train the heads on them by self-distillation, and write a run directory.")
    p.add_argument("--init", required=True, type=path_arg, metavar="RUN_DIR", help="the pretrained run (e.g. from `multitoken convert`)")
    p.add_argument("--data", required=True, type=path_arg, metavar="DATA_DIR", help="data prepared with the model's tokenizer")
    p.add_argument("--heads", required=True, type=text_arg, metavar="KIND:N", help="heads to add: medusa:N, sequential:N[:shared] or parallel:N")
    p.add_argument("--out", required=True, type=path_arg, metavar="RUN_DIR", help="run directory to write")
    p.add_argument("--features", default=None, type=path_arg, metavar="DIR", help="where to store (or reuse) backbone features (default OUT/features)")
    p.add_argument("--tokens", type=ints(1, 1 << 40), default=200_000, help="training tokens to compute features for")
    p.add_argument("--seq-len", type=ints(2, MAX_SEQ_LEN), default=256, help="tokens per training window")
    p.add_argument("--steps", type=ints(1), default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=ints(1, 1 << 20), default=8, help="windows per step")
    p.add_argument("--lr", type=option(TRAIN_RANGES["lr"]), default=1e-3, help="peak learning rate")
    p.add_argument("--eval-batches", type=ints(1, 1 << 20), default=8, help="validation batches for accuracy and expected tau")
    p.add_argument("--seed", type=ints(0, INT63), default=0, help="seed of the heads' initialisation and the data order")
    p.add_argument("--freeze-head-lm", action="store_true", help="Medusa: train the residual blocks only, keep each head's LM-head copy")
    p.add_argument("--max-seq-len", type=ints(1, MAX_SEQ_LEN), default=None, metavar="N", help="context of the written run (sizes the static KV cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run, out_kind="retrofit")


def run(args: argparse.Namespace) -> int:
    s = retrofit(args.init, args.data, HeadsConfig.parse(args.heads), args.out, args.features, args.tokens, args.seq_len,
                 args.steps, args.batch_size, args.lr, args.eval_batches, args.seed, args.freeze_head_lm, args.max_seq_len,
                 progress=not args.quiet)
    val = s["val"]
    print(f"wrote {args.out}: features {s['features']['tokens']} tokens in {s['features']['seconds']:.0f}s "
          f"({s['features']['bytes'] / 1e6:.0f} MB), fit {s['seconds']['fit']:.0f}s; "
          f"val accuracy per depth {', '.join(f'{a:.3f}' for a in val['accuracy_per_depth'])}, expected tau {val['expected_tau']:.2f}")
    return 0
