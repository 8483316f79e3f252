"""Benchmarks behind ``multitoken bench`` (cli/bench.py) that compare methods side by side in one process.

- ``bench decode``: our plain, chain and tree decoding (eager, CUDA graphs, compiled) against
  transformers' generate (default and static cache) and prompt lookup, on the same weights and
  prompts, at several batch sizes and temperatures (bench/decode.py);
- ``bench train``: training tokens/s, MFU, FLOP-ideal and measured ratios against plain
  training, and peak memory, per head family (bench/train.py).
Each prints a table, and writes JSON and a plot.
"""
