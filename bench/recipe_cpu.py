"""Issue 18, item 2, at CPU scale: each head-training option alone, on held-out acceptance per depth.

A target model (the tiny preset, python-stdlib through a 4k BPE) is trained plainly; then
sequential:3 heads are retrofitted on it, frozen, for the same steps and data under each recipe:
hard targets (the data's tokens), soft targets (KL to the frozen model, computed once per batch),
and soft targets plus one change at a time (training-time test, DFlash's decaying depth weights,
an eh_proj that starts by passing the hidden state through), then all of them. Each is measured
on held-out files two ways: teacher-forced accuracy per depth (the chance a greedy draft is
accepted, the earlier ones accepted) with expected tau, and greedy speculative generation
(acceptance per position and tau, output checked identical to plain greedy decoding).

    PYTHONPATH=src python bench/recipe_cpu.py --out bench/results/recipe_cpu [--steps 300]

Writes OUT/recipe_cpu.json (commit, machine, command, every number) and OUT/recipe_cpu.md (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from multitoken.config import TrainConfig
from multitoken.data.loader import TokenLoader
from multitoken.data.prepare import prepare
from multitoken.decoding import generate
from multitoken.io.checkpoint import load_run
from multitoken.training.trainer import train

RECIPES = {
    "hard targets": dict(distill=False),
    "soft targets (KL)": dict(distill=True),
    "KL + training-time test": dict(distill=True, ttt=True),
    "KL + decay:2 weights": dict(distill=True, loss_weights="decay:2"),
    "KL + eh_proj pass-through": dict(distill=True, eh_pass_through=True),
    "KL + all three": dict(distill=True, ttt=True, loss_weights="decay:2", eh_pass_through=True),
}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("MULTITOKEN_COMMIT", "unknown")


def held_out_prompts(data: Path, n: int, length: int) -> list[list[int]]:
    val = TokenLoader(data, "val", batch_size=1, seq_len=length).tokens
    step = (len(val) - length) // n
    return [val[i * step: i * step + length].astype("int64").tolist() for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("runs/recipe_cpu"))
    p.add_argument("--target-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=300, help="head-training steps per recipe")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = args.work / "data"
    prepare("python-stdlib", "bpe:4096", data, progress=False)
    common = dict(preset="tiny", batch_size=16, seq_len=256, warmup=30, eval_batches=16, log_every=50, device="cpu", dtype="fp32")
    target = args.work / "target"
    if not (target / "model.safetensors").is_file():
        train(TrainConfig(heads="none", steps=args.target_steps, lr=3e-3, eval_every=0, save_every=0, **common),
              data, target, progress=False)
    prompts = held_out_prompts(data, args.prompts, 64)
    rows = []
    for name, opts in RECIPES.items():
        run = args.work / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus").replace(":", "")
        t = time.perf_counter()
        res = train(TrainConfig(heads="sequential:3", init=str(target), freeze_backbone=True, steps=args.steps, lr=3e-3,
                                eval_every=0, save_every=0, **opts, **common), data, run, progress=False)
        seconds = time.perf_counter() - t
        model, _ = load_run(run)
        plain, _ = generate(model, prompts, args.new_tokens, mode="ntp")
        spec, st = generate(model, prompts, args.new_tokens, mode="spec")
        rows.append(dict(recipe=name, options=opts, train_seconds=round(seconds, 1), tokens_per_s=res["tokens_per_s"],
                         val_accuracy_per_depth=res["val_accuracy_per_depth"], expected_tau=res["expected_tau"],
                         generation_acceptance=st.acceptance_per_position, generation_tau=st.tau,
                         identical_to_plain=spec == plain))
        print(json.dumps(rows[-1]), flush=True)
    out = {"what": "issue 18 item 2 at CPU scale: head-training recipes on a tiny target, held-out acceptance",
           "commit": commit(), "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                           "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
                                           "torch": torch.__version__, "python": platform.python_version()},
           "command": " ".join(["python", "bench/recipe_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
           "settings": {**common, "target_steps": args.target_steps, "head_steps": args.steps, "heads": "sequential:3",
                        "prompts": args.prompts, "new_tokens": args.new_tokens},
           "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipe_cpu.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["| recipe | teacher-forced acc d1 / d2 / d3 | expected tau | generation acceptance 1 / 2 / 3 | generation tau | identical |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        acc = " / ".join(f"{a:.3f}" for a in r["val_accuracy_per_depth"][1:])
        gen = " / ".join(f"{a:.3f}" for a in r["generation_acceptance"])
        lines.append(f"| {r['recipe']} | {acc} | {r['expected_tau']:.2f} | {gen} | {r['generation_tau']:.2f} | {r['identical_to_plain']} |")
    (args.out / "recipe_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
