"""Issue 18 on a CPU: distillation with the teacher once vs once per depth, in one process.

    PYTHONPATH=src python bench/head_train_cpu.py   # writes bench/results/head_train_cpu.json

1. The loss alone (forward + backward) on fixed states, B=4, T=256, C=128, V=16384, D=4 heads
   sharing one LM head: the chunked cross-entropy to per-depth teacher states (before issue 18)
   against `distill.distill_kl`; interleaved repeats, minimum and median.
2. The whole frozen-backbone head-training step (`bench.head_train.measure_head_training`), the
   same shape in a 2-layer model, sequential:4:shared, per-depth teacher vs teacher once.
One intra-op thread; the machine is shared, so only ratios measured side by side mean anything.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from multitoken.bench.head_train import run_matrix
from multitoken.training.distill import distill_kl
from multitoken.training.loss import linear_cross_entropy


def loss_only(reps: int = 5) -> dict:
    torch.manual_seed(0)
    B, T, C, V, D = 4, 256, 128, 16384, 4
    h0, w = torch.randn(B, T, C) * 0.5, torch.randn(V, C, requires_grad=True)
    hs = [torch.randn(B, T, C, requires_grad=True) for _ in range(D)]
    valid = torch.ones(D, B, T, dtype=torch.bool)
    for j in range(D):
        valid[j, :, T - j - 1:] = False
    scales = torch.full((D,), 1e-3)

    def once() -> None:
        distill_kl(h0, w.detach(), hs, [w] * D, valid, scales)[0].backward()

    def per_depth() -> None:
        h = torch.cat([x.flatten(0, 1) for x in hs])
        teacher = torch.cat([torch.cat([h0[:, k:], h0[:, -1:].expand(-1, k, -1)], 1).flatten(0, 1) for k in range(1, D + 1)])
        t = torch.where(valid.flatten(1), 0, -100).flatten()
        linear_cross_entropy(h, w, t, scales.repeat_interleave(B * T), teacher, w.detach())[0].backward()

    times: dict[str, list[float]] = {"per_depth": [], "once": []}
    for _ in range(reps):
        for name, fn in (("per_depth", per_depth), ("once", once)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {"shape": dict(B=B, T=T, C=C, V=V, D=D), "seconds": times,
            "per_depth_over_once_min": min(times["per_depth"]) / min(times["once"]),
            "per_depth_over_once_median": statistics.median(times["per_depth"]) / statistics.median(times["once"])}


def main() -> None:
    torch.set_num_threads(1)
    loss = loss_only()
    print("loss only, per-depth teacher / teacher once:", round(loss["per_depth_over_once_min"], 2), "(min)",
          round(loss["per_depth_over_once_median"], 2), "(median)")
    rows = []
    for _ in range(2):
        rows += run_matrix([dict(distill=True, teacher="per_depth"), dict(distill=True)], preset="tiny",
                           heads="sequential:4:shared", batch_size=4, seq_len=256, steps=5, warmup=1, device="cpu",
                           overrides=dict(vocab_size=16384, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=256))
    out = Path("bench/results/head_train_cpu.json")
    out.write_text(json.dumps({"command": "PYTHONPATH=src python bench/head_train_cpu.py", "threads": 1,
                               "loss_only": loss, "step": rows}, indent=1))


if __name__ == "__main__":
    main()
