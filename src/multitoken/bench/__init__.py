"""``multitoken bench``: benchmarks that compare methods side by side in one process.

- ``bench decode``: our plain, chain and tree decoding (eager, CUDA graphs, compiled) against
  transformers' generate (default and static cache) and prompt lookup, on the same weights and
  prompts, at several batch sizes and temperatures (bench/decode.py);
- ``bench train``: training tokens/s, MFU, FLOP-ideal and measured ratios against plain
  training, and peak memory, per head family (bench/train.py).
Each prints a table, and writes JSON and a plot.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from multitoken.bench import decode, train

    p = subparsers.add_parser("bench", help="benchmarks: decoding and training speed, side by side")
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    decode.register(sub)
    train.register(sub)
