"""``multitoken train``: options derived from `TrainConfig`, a TOML file, and exact resume."""

from __future__ import annotations

import logging
import argparse
import dataclasses
import json
import os
from pathlib import Path

from multitoken.checks import Range
from multitoken.cli.options import add_dataclass_arguments, ints, option, path_arg
from multitoken.config import TRAIN_RANGES, TrainConfig
from multitoken.io import checkpoint as ckpt
from multitoken.io import outdir
from multitoken.training import trainer
from multitoken.training.trainer import load_toml, resolve_config, resume_config, saved_run_config

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``multitoken train``."""
    p = subparsers.add_parser("train", help="train a model with MTP heads on a prepared DATA_DIR",
                              description="Train a model (or heads on a frozen one) on DATA_DIR into RUN_DIR. Options "
                              "override --config FILE.toml, which overrides the defaults; --resume continues exactly.")
    p.add_argument("--data", required=True, type=path_arg, metavar="DATA_DIR", help="a DATA_DIR made by `multitoken prepare`")
    p.add_argument("--out", required=True, type=path_arg, metavar="RUN_DIR", help="run directory to write (or to continue with --resume)")
    p.add_argument("--config", default=None, type=path_arg, metavar="FILE.toml", help="TOML file of training settings (keys as the options below, with _)")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from its latest checkpoint, exactly")
    p.add_argument("--stop-after", type=ints(1), default=None, metavar="STEP",
                   help="stop with a checkpoint after this step, keeping the schedule of --steps (resume later)")
    p.add_argument("--max-minutes", type=option(Range(0.0, 1e7, lo_open=True)), default=None, metavar="MIN",
                   help="stop with a checkpoint once this much time has passed (resume later); time-boxed jobs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_arguments(p, TrainConfig, TRAIN_RANGES)
    p.set_defaults(func=run, out_kind="train")


def run(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cli = {k: v for k, v in vars(args).items() if k in fields}
    out = Path(args.out)
    outdir.check(out, "train")  # before reading anything there
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if args.resume and (out / ckpt.CHECKPOINTS_DIR / ckpt.LATEST_FILE).is_file():
        saved = saved_run_config(out, None if main_rank else (lambda m: None))
        cfg, ignored = resume_config(saved["train"], {**(load_toml(args.config) if args.config else {}), **cli})
        if ignored and main_rank:
            log.warning(f"ignored on resume (the run keeps its own values): {', '.join(ignored)}")
    else:
        cfg = resolve_config(cli, args.config)
    # Looked up when the command runs, not when this module is imported (which --help's lazy
    # loading may do at any time): a test or a caller that replaces trainer.train is obeyed.
    result = trainer.train(cfg, args.data, args.out, resume=args.resume, progress=not args.quiet, stop_after=args.stop_after,
                   max_minutes=args.max_minutes)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary per job, not per process
        print(json.dumps(result, indent=2))
    return 0
