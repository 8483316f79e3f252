"""What one decoding step costs on the CPU, by kind, against a plain step of the same model.

Each step kind (plain, chain with 1..K drafts, a tree) is timed by the runner's own CPU probe
(the step run with every row done, the loop state given back: `Runner._probe`), interleaved
kind after kind in every repeat so that a busy machine slows them alike; reported are medians
over repeats and each kind's ratio to the plain step, with the load average before and after.
Optionally a `torch.profiler` table of one step of each kind (--profile).

    PYTHONPATH=src python bench/cpu_steps.py --run runs/demo/run --out bench/results/cpu_steps_demo.json
    PYTHONPATH=src python bench/cpu_steps.py --smollm2 --out bench/results/cpu_steps_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from multitoken.provenance import load_average, provenance
from multitoken.decoding.api import engine_for, generate
from multitoken.decoding.sampling import Sampling
from multitoken.decoding.trees import as_tree


def load(args):
    if args.smollm2:
        from multitoken.demo import SMOLLM2_HEADS, load_smollm2

        model, tok, vocab = load_smollm2(draft_vocab=not args.full_vocab)
        return model, tok, f"SmolLM2-135M-Instruct + {SMOLLM2_HEADS.name}, drafting over {vocab}"
    from multitoken.io.checkpoint import load_run

    model, tok = load_run(args.run)
    return model.eval(), tok, f"run {args.run} ({model.config.heads})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run directory (the demo's: runs/demo/run)")
    src.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct with the shipped heads")
    ap.add_argument("--out", required=True, help="the JSON to write")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--context", type=int, default=100, help="tokens in the cache when the steps are timed")
    ap.add_argument("--tree-nodes", type=int, default=8)
    ap.add_argument("--clock", choices=["thread", "wall", "cpu"], default="thread",
                    help="the decoding thread's CPU time, as the runner times steps (default); wall time; or the "
                    "whole process's CPU time")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table per kind")
    ap.add_argument("--compile", action="store_true", help="compiled blocks (torch.compile; the warm-up compiles every kind)")
    ap.add_argument("--full-vocab", action="store_true", help="--smollm2: draft over the full vocabulary (default: the draft vocabulary)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = {"thread": time.thread_time, "wall": time.perf_counter, "cpu": time.process_time}[args.clock]
    record = provenance()
    model, tok, what = load(args)
    K, s = model.depth, Sampling()
    prompt = (list(range(3, 3 + args.context)) if tok is None else
              (tok.encode("import os\nimport sys\n\n" * 40) * 4)[: args.context])
    with torch.no_grad():
        # A real prompt in the cache, then every kind built and run once (allocation, first-call costs).
        for k in range(1, K + 1):  # every kind run once (with --compile: compiled, each width's graph)
            generate(model, prompt, 8, mode="spec", draft=k, compile=args.compile)
        generate(model, prompt, 8, mode="tree", tree=args.tree_nodes, compile=args.compile)
        generate(model, prompt, 8, compile=args.compile)
        eng = engine_for(model, 1, compile=args.compile)
        kinds = {"plain": eng.strategy("ntp", 0, s)}
        kinds.update({f"chain k={j}": eng.strategy("spec", j, s) for j in range(1, K + 1)})
        tree = as_tree(args.tree_nodes, None, K)
        eng.state.ensure_tree_buffers(K)
        kinds[f"tree {tree.nodes} nodes"] = eng.strategy("tree", tree.depth, s, tree)
        live = eng.runner.live_for(args.context + 1 + max(st.q for st in kinds.values()))
        times: dict[str, list[float]] = {name: [] for name in kinds}
        for _ in range(args.repeats):
            for name, st in kinds.items():
                times[name].append(eng.runner._probe(st, live, clock))
        prof = {}
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for name, st in kinds.items():
                with profile(activities=[ProfilerActivity.CPU]) as p:
                    eng.runner._probe(st, live)
                prof[name] = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
                print(f"--- {name} (4 steps)\n{prof[name]}")
    med = {name: statistics.median(v) for name, v in times.items()}
    rows = [{"kind": name, "ms": med[name] * 1e3, "vs_plain": med[name] / med["plain"],
             "ms_all": [t * 1e3 for t in times[name]]} for name in kinds]
    out = {**record, "load_after": load_average(), "model": what, "dtype": str(next(model.parameters()).dtype),
           "threads": args.threads, "clock": args.clock, "repeats": args.repeats, "context": args.context, "bucket": live,
           "compile": args.compile, "compile_error": eng.runner.compile_error, "steps": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{what}, {args.threads} threads{', compiled blocks' if args.compile else ''}, "
          f"load {record['load_before']} -> {out['load_after']}")
    for r in rows:
        print(f"  {r['kind']:<16} {r['ms']:8.3f} ms  {r['vs_plain']:.2f}x plain")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
