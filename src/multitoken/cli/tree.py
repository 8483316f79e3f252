"""``multitoken tree``: measure the heads' top-k accuracy and write RUN_DIR/tree.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from multitoken.cli.options import device_arg, ints, path_arg
from multitoken.config import MAX_SEQ_LEN
from multitoken.data.loader import TokenLoader
from multitoken.decoding.trees import DEFAULT_NODES, MAX_TREE_NODES, MAX_TREE_RANKS, TREE_FILE, build_static, expected_accept_length
from multitoken.errors import UserError
from multitoken.io.checkpoint import load_run, write_json
from multitoken.training.evaluate import measure_topk_accuracy


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tree", help="measure the heads' top-k accuracy and write RUN_DIR/tree.json (static draft tree)",
                              description="Score the heads' top-k accuracy per depth on the validation split and build the "
                                          "static draft tree with the most expected accepted tokens; `generate --mode tree` "
                                          "reads RUN_DIR/tree.json.")
    p.add_argument("--run", required=True, type=path_arg, help="run directory with MTP heads")
    p.add_argument("--data", required=True, type=path_arg, help="DATA_DIR from `multitoken prepare` (its validation split is used)")
    p.add_argument("--nodes", type=ints(2, MAX_TREE_NODES), default=DEFAULT_NODES * 4, help="tree size, root included")
    p.add_argument("--ranks", type=ints(1, MAX_TREE_RANKS), default=10, help="candidates per depth to measure")
    p.add_argument("--batches", type=ints(1, 1 << 20), default=16, help="validation batches to score")
    p.add_argument("--batch-size", type=ints(1, 1 << 20), default=8, help="windows per validation batch")
    p.add_argument("--seq-len", type=ints(2, MAX_SEQ_LEN), default=None, help="window length (default: the model's context)")
    p.add_argument("--device", default="auto", type=device_arg, help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, _ = load_run(args.run, device=args.device, with_tokenizer=False)
    if model.depth == 0:
        raise UserError(f"{args.run} has no MTP heads: a draft tree needs heads (train with --heads KIND:N)")
    seq_len = args.seq_len or model.config.max_seq_len
    loader = TokenLoader(args.data, "val", batch_size=args.batch_size, seq_len=seq_len)
    acc, n = measure_topk_accuracy(model, loader.eval_batches(args.batches), args.ranks, model.config.eos_id)
    tree = build_static(acc, args.nodes)
    tau = expected_accept_length(tree, acc)
    write_json(Path(args.run) / TREE_FILE, {"paths": [list(p) for p in tree.paths], "nodes": tree.nodes,
                                            "depth": tree.depth, "topk_accuracy": acc, "positions": n,
                                            "expected_tau": tau})
    for d, row in enumerate(acc, start=1):
        print(f"depth {d}: top-1 {row[0]:.3f}  top-{len(row)} {sum(row):.3f}")
    print(f"wrote {Path(args.run) / TREE_FILE}: {tree.nodes} nodes, depth {tree.depth}, expected tau {tau:.2f}")
    return 0
