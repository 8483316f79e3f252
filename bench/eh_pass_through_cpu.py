"""Tiny CPU comparison of --eh-pass-through (issue 18): same base, same steps, val loss per depth.

Writes /tmp/ehx/result.json (copied to bench/results/eh_pass_through_cpu.json)."""
import json, sys, torch
sys.path.insert(0, "tests")
from pathlib import Path
from train_helpers import make_data, tiny_train_config
from multitoken.training.trainer import train
torch.set_num_threads(1)
root = Path("/tmp/ehx")
data = make_data(root / "d") if not (root / "d/data").exists() else root / "d/data"
if not (root / "base/model.safetensors").exists():
    train(tiny_train_config(steps=300, heads="none", seq_len=64, batch_size=8, lr=3e-3, warmup=20), data, root / "base", progress=False)
out = {}
for pt in (False, True):
    for seed in (0, 1):
        r = train(tiny_train_config(steps=80, heads="sequential:2", init=str(root / "base"), freeze_backbone=True, distill=True,
                                    eh_pass_through=pt, seq_len=64, batch_size=8, lr=3e-3, warmup=10, eval_every=20, eval_batches=4,
                                    seed=seed), data, root / f"heads_{pt}_{seed}", progress=False)
        val = [json.loads(l) for l in (root / f"heads_{pt}_{seed}/metrics.jsonl").read_text().splitlines() if '"val"' in l]
        out[f"pass_through={pt} seed={seed}"] = [(v["step"], [round(x, 4) for x in v["loss_per_depth"]], [round(x, 4) for x in v["accuracy_per_depth"]]) for v in val]
        print(pt, seed, out[f"pass_through={pt} seed={seed}"], flush=True)
json.dump(out, open(root / "result.json", "w"), indent=1)
