"""``multitoken ablate``: head configurations trained side by side at equal tokens and equal
compute (the study itself is training/ablate.py)."""

from __future__ import annotations

import argparse
import sys

from multitoken.cli.options import floats, ints, path_arg, text_arg
from multitoken.io import outdir
from multitoken.training.ablate import OUT_FILES, SUITES, build_study, format_table, run_study, write_report


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``multitoken ablate``."""
    p = subparsers.add_parser("ablate", help="train head configurations side by side at equal tokens and equal compute",
                              description="Train a suite of head configurations on the same data, at equal tokens and at "
                              "equal compute, over several seeds; resumable (run the same command again to continue). "
                              "Writes OUT/ablate.json, ablate.md and curves.png.")
    p.add_argument("--data", required=True, type=path_arg, metavar="DATA_DIR", help="the DATA_DIR of every 'main' configuration")
    p.add_argument("--byte-data", default=None, type=path_arg, metavar="DATA_DIR",
                   help="a DATA_DIR prepared with --tokenizer bytes, for configurations with data=bytes")
    p.add_argument("--out", required=True, type=path_arg, help="the study's folder (runs/, ablate.json, ablate.md, curves.png)")
    p.add_argument("--suite", default=None, choices=sorted(SUITES), help="a named list of configurations")
    p.add_argument("--configs", nargs="+", default=None, type=text_arg, metavar="SPEC",
                   help="configurations, each [NAME=]HEADS[/w=WEIGHTS][/lambda=SCHEDULE][/data=main|bytes] "
                        "(lambda steps may be N%% of the run); added after --suite's")
    p.add_argument("--preset", default="tiny", type=text_arg, help="model preset of every run (default tiny)")
    p.add_argument("--steps", type=ints(1), default=1000, help="steps at equal tokens (default 1000)")
    p.add_argument("--batch-size", type=ints(1, 1 << 20), default=16)
    p.add_argument("--seq-len", type=ints(2, 1 << 21), default=128)
    p.add_argument("--seeds", type=ints(1, 100), default=3, help="seeds for plain and the best two configurations (default 3)")
    p.add_argument("--axes", default="tokens,compute", type=text_arg, help="tokens, compute or both (default)")
    p.add_argument("--eval-every", type=ints(1), default=100, help="validation points of the learning curves (default 100)")
    p.add_argument("--eval-windows", type=ints(0), default=0, help="validation windows measured per run, evenly spaced (0: all)")
    p.add_argument("--line-cases", type=ints(1, 1 << 20), default=200, help="next-line exact-match cases (default 200)")
    p.add_argument("--chunk-steps", type=ints(1), default=250, help="steps between checkpoints (default 250)")
    p.add_argument("--max-minutes", type=floats(0, lo_open=True), default=None, help="stop (resumably) before this budget runs out")
    p.add_argument("--max-steps", type=ints(1), default=None, help="train at most this many steps in this invocation")
    p.add_argument("--train-config", default=None, type=path_arg, metavar="FILE.toml",
                   help="TOML of train settings shared by every run (lr, warmup, device, dtype, compile, ...)")
    p.add_argument("--device", default=None, type=text_arg, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-keep-weights", dest="keep_weights", action="store_false",
                   help="delete each finished run's model.safetensors (checkpoints are always deleted)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run, out_kind="ablate")


def run(args: argparse.Namespace) -> int:
    study = build_study(args)
    outdir.claim(study.out, "ablate")
    outdir.remove_temporaries(study.out, OUT_FILES)
    status = run_study(study, args.max_minutes, args.max_steps)
    data = write_report(study, getattr(args, "argv", sys.argv[1:]))
    print(format_table(data))
    print(f"{'complete' if data['complete'] else 'not finished: run the same command again to continue'}; "
          f"trained {status['trained_steps']} steps; wrote {study.out / 'ablate.json'}, ablate.md and curves.png")
    return 0
