"""One GPU call: train small MTP models on python-stdlib, then `bench decode` each on held-out prompts.

    PYTHONPATH=src python3 bench/gpu_trained_decode.py --out $OUT

The `bench/gpu_run.py` recipe (small preset, bpe:8192 on this interpreter's standard library,
32 x 512 tokens per step, bf16 autocast, lr 3e-3), then for each trained run
`multitoken bench decode --run RUN --data DATA_DIR` in bf16: our plain decoding (compiled
blocks + CUDA graphs), chain, chain with the automatic draft length and tree, at batch 1, 16
and 64, temperature 0 and 1, 256 new tokens from 64-token prompts cut from the validation split
(whole held-out files). transformers' generate runs on the first model at batch 1.
Writes OUT/<family>/decode.json and decode.png, and OUT/trained.json (training figures).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from multitoken.cli import main as cli
from multitoken.config import TrainConfig
from multitoken.data.prepare import prepare
from multitoken.training.trainer import train


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--families", default="parallel:3,sequential:2")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", default="/tmp/mt-trained")
    ap.add_argument("--shape-bench", action="store_true",
                    help="first, plain and speculative speed on a SmolLM2-135M-shaped model (random weights) at batch 1")
    a = ap.parse_args()
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.shape_bench:
        cli(["bench", "decode", "--preset", "smollm2-135m", "--heads", "medusa:3", "--max-seq-len", "8192", "--batch", "1",
             "--temperature", "0", "--new-tokens", "256", "--repeats", "3", "--no-eager", "--no-transformers", "--device", a.device,
             "--out", str(out / "smollm2shape")])
    prepare("python-stdlib", "bpe:8192", work / "data", progress=False)
    summary = dict(command="PYTHONPATH=src python3 bench/gpu_trained_decode.py " + " ".join(sys.argv[1:]),
                   gpu=torch.cuda.get_device_name() if a.device == "cuda" else "cpu", torch=torch.__version__, prepare_s=time.time() - t0, runs={})
    for i, heads in enumerate(a.families.split(",")):
        name = heads.split(":")[0]
        run = work / name
        cfg = TrainConfig(preset=a.preset, heads=heads, steps=a.steps, batch_size=32, seq_len=512, lr=3e-3,
                          warmup=min(100, a.steps // 2), eval_every=0, eval_batches=16, save_every=0, log_every=100,
                          device=a.device)
        tr = train(cfg, work / "data", run, progress=False)
        summary["runs"][heads] = {k: tr[k] for k in ("tokens_per_s", "seconds", "tokens", "val_loss_per_depth",
                                                    "val_accuracy_per_depth") if k in tr}
        print(heads, summary["runs"][heads], flush=True)
        (out / "trained.json").write_text(json.dumps(summary, indent=1) + "\n")
        args = ["bench", "decode", "--run", str(run), "--data", str(work / "data"), "--batch", a.batch,
                "--temperature", "0,1", "--new-tokens", "256", "--prompt-tokens", "64", "--repeats", "3",
                "--no-eager", "--device", a.device, "--out", str(out / name)]
        if i > 0:
            args.append("--no-transformers")
        cli(args)
    summary["seconds"] = time.time() - t0
    (out / "trained.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
