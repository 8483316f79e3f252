"""Retrofit MTP heads onto SmolLM2-135M-Instruct on one GPU: one command, time-boxed, resumable.

    python examples/smollm2_gpu.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --corpus DIR --work WORK \
        --heads sequential:4:shared --tokens 50000000 --max-minutes 8

Fused inputs (EAGLE-3's low/mid/high features, docs/design.md) warm-started from ordinary heads:
``--heads sequential:4:shared:fused --init-heads smollm2-135m-instruct.sequential-4-shared.safetensors``
(the file's weights are copied and fc starts as h^0 alone, so step 0 drafts as the file's heads do).

Run the same command again to continue: every stage is skipped when its output is there, and
training resumes exactly from its last checkpoint (`multitoken train --resume --max-minutes`).

Stages:
1. ``WORK/base``: the GGUF converted to a native run (fp32 weights, context --context).
2. ``WORK/data``: every ``**/*.py`` file under DIR through SmolLM2's tokenizer
   (`multitoken prepare`); whole files are held out for validation (--val-fraction), and
   decoding benchmarks cut their prompts from those held-out files.
3. ``WORK/runs/NAME``: the heads trained with the backbone frozen, by self-distillation (each
   depth learns the frozen model's own next-token distribution at its position, `--distill`),
   bf16 autocast, compiled; per-depth validation accuracy (the chance a greedy draft of that
   depth is accepted, given the earlier ones) and expected tau are logged at every evaluation.
4. ``WORK/heads/NAME.safetensors``: at the end of every call, the heads as they stand, alone, in bf16
   (`retrofit.save_heads`: the heads spec, the backbone's fingerprint and this command in its
   metadata), ready to ship beside the pretrained model (`retrofit.attach_heads`).

Prints one JSON summary line per stage; ``WORK/NAME.json`` holds the final one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from multitoken.config import HeadsConfig, TrainConfig
from multitoken.data.prepare import prepare
from multitoken.io.checkpoint import load_run, read_json
from multitoken.io.heads_file import heads_info, save_heads
from multitoken.io.hf import convert_gguf
from multitoken.training.trainer import train


def stage(name: str, **info) -> None:
    print(json.dumps({"stage": name, **info}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True, type=Path, help="SmolLM2-135M-Instruct's GGUF file")
    p.add_argument("--corpus", type=Path, default=None, help="folder of .py files (e.g. a site-packages)")
    p.add_argument("--data", type=Path, default=None,
                   help="train on this DATA_DIR (e.g. from `multitoken distill-data`) instead of preparing --corpus")
    p.add_argument("--init-heads", type=Path, default=None, help="warm start: a heads file trained on this backbone")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: --tokens / tokens per step)")
    p.add_argument("--warmup", type=int, default=None, help="LR warmup steps (default min(100, steps / 10))")
    p.add_argument("--work", required=True, type=Path, help="folder for the converted model, data, runs and heads")
    p.add_argument("--heads", default="sequential:4:shared", help="heads to train (sequential:N[:shared][:fused], medusa:N, ...)")
    p.add_argument("--tokens", type=int, default=50_000_000, help="training tokens in all (steps = tokens / tokens per step)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--context", type=int, default=2048, help="context of the converted model (sizes the KV cache)")
    p.add_argument("--eval-batches", type=int, default=16, help="validation batches per evaluation")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of files held out")
    p.add_argument("--max-minutes", type=float, default=8.0, help="training time in this call; run again to continue")
    p.add_argument("--name", default=None, help="run name (default from --heads)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--ttt", action="store_true", help="training-time test: depths >= 2 train on their own drafts (EAGLE-3)")
    p.add_argument("--loss-weights", default=None, help="per-depth weights, e.g. decay:3 (DFlash's exp(-(k-1)/3))")
    p.add_argument("--eh-pass-through", action="store_true", help="eh_proj starts by passing the hidden state through")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # e.g. how a warm start began
    heads = HeadsConfig.parse(args.heads)
    name = args.name or str(heads).replace(":", "-")
    work = args.work
    t0 = time.perf_counter()

    base = work / "base"
    if not (base / "model.safetensors").is_file():
        convert_gguf(args.gguf, base, dtype="fp32", max_seq_len=args.context)
    stage("convert", run=str(base), seconds=round(time.perf_counter() - t0, 1))

    if args.data is not None:
        data = args.data
        meta = read_json(data / "meta.json")
    elif args.corpus is not None:
        data = work / "data"
        t = time.perf_counter()
        meta = prepare(str(args.corpus), str(base), data, glob="**/*.py", val_fraction=args.val_fraction, progress=False)
        stage("prepare", data=str(data), tokens={k: v["tokens"] for k, v in meta["splits"].items()},
              files={k: v["docs"] for k, v in meta["splits"].items()}, seconds=round(time.perf_counter() - t, 1))
    else:
        raise SystemExit("give --corpus DIR (prepared here) or --data DATA_DIR")

    run = work / "runs" / name
    per_step = args.batch_size * args.seq_len
    steps = args.steps or math.ceil(args.tokens / per_step)
    warmup = min(100, steps // 10) if args.warmup is None else args.warmup
    cfg = TrainConfig(heads=str(heads), init=str(base), init_heads=str(args.init_heads or ""), freeze_backbone=True,
                      distill=True, ttt=args.ttt, loss_weights=args.loss_weights,
                      eh_pass_through=args.eh_pass_through, steps=steps,
                      batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, min_lr=args.lr / 10,
                      warmup=warmup, weight_decay=0.0, eval_every=max(steps // 4, 1), eval_batches=args.eval_batches,
                      save_every=max(steps // 4, 1), log_every=20, device=args.device, dtype="bf16" if args.device.startswith("cuda") else "fp32", compile=args.compile,
                      max_seq_len=args.context)
    resume = (run / "checkpoints" / "latest.json").is_file()
    result = train(cfg, data, run, resume=resume, progress=False, max_minutes=args.max_minutes)
    stage("train", run=str(run), step=result["step"], steps=steps, tokens_per_s=round(result["tokens_per_s"]),
          val_accuracy_per_depth=result["val_accuracy_per_depth"], expected_tau=result["expected_tau"])
    warm = heads_info(args.init_heads)["info"] if args.init_heads else {}
    summary = {"heads": str(heads), "step": result["step"], "steps": steps, "tokens": result["step"] * per_step,
               "tokens_before": int(warm.get("tokens_total", warm.get("tokens", 0)) or 0),
               "val_accuracy_per_depth": result["val_accuracy_per_depth"], "expected_tau": result["expected_tau"],
               "val_loss_per_depth": result["val_loss_per_depth"], "train": read_json(run / "config.json")["train"],
               "data": meta, "command": " ".join(["python", "examples/smollm2_gpu.py", *(argv or sys.argv[1:])])}
    # The heads as they stand (after `step` of `steps` steps, recorded with them): a time-boxed call
    # always leaves something to bench; the next call continues training and writes them again.
    model, _ = load_run(run)
    summary["tokens_total"] = summary["tokens_before"] + summary["tokens"]
    summary["data_recipe"] = meta.get("self_generated", {}).get("config") or meta.get("corpus")
    path = save_heads(model, work / "heads" / f"{name}.safetensors",
                      {k: summary[k] for k in ("heads", "step", "steps", "tokens", "tokens_before", "tokens_total",
                                               "expected_tau", "command", "data_recipe")}
                      | {"warm_start": warm.get("command")})
    summary["heads_file"], summary["heads_bytes"] = str(path), path.stat().st_size
    stage("heads", file=str(path), bytes=path.stat().st_size, finished=result["step"] >= steps)
    (work / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
