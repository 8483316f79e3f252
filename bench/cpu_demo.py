"""The README's CPU figures in one command each: `multitoken demo` (or its SmolLM2 form), recorded.

Runs the demo exactly as a user would (a fresh work directory unless --workdir is given, so the
whole job is timed: data, training, evaluation, decoding) and writes its demo.json, which already
carries the commit, the machine, the command and the load average before and after, to --out
(and the tiny model's loss curves beside it, as OUT_loss.png).

    PYTHONPATH=src python bench/cpu_demo.py --out bench/results/demo_cpu.json
    PYTHONPATH=src python bench/cpu_demo.py --smollm2 --threads 2 --out bench/results/smollm2_cpu.json
    PYTHONPATH=src python bench/cpu_demo.py --smollm2 --threads 2 --dtype bfloat16 --out bench/results/smollm2_cpu_bf16.json

Speeds are ratios measured in the same process, interleaved, medians over repeats (the demo's
own protocol); on a shared machine read them with the recorded load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from multitoken import demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the JSON to write (bench/results/...)")
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct with the shipped heads (no training)")
    ap.add_argument("--workdir", default=None, help="reuse this work directory (default: a fresh one, removed after)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per method and prompt (default: the demo's)")
    ap.add_argument("--compile", action="store_true", help="decode with compiled blocks (the demo's --compile)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="--smollm2: decode in this dtype")
    args = ap.parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mt-cpu-demo-"))
    try:
        if args.smollm2:
            summary = demo.run_smollm2_demo(work, threads=args.threads, repeats=args.repeats or 2, dtype=args.dtype,
                                            compile=args.compile)
        else:
            summary = demo.run_demo(work, threads=args.threads, repeats=args.repeats or 5, compile=args.compile)
            plot = Path(args.out).with_name(Path(args.out).stem + "_loss.png")
            shutil.copyfile(work / "run" / "loss.png", plot)
            summary["loss_plot"] = plot.name
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out} (commit {summary['commit']}, load {summary['load_before']} -> {summary['load_after']})")


if __name__ == "__main__":
    main()
