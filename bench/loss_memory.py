"""Peak memory of one training step (forward + loss + backward) with 4 heads vs 1, naive vs chunked loss.

Each configuration runs in a fresh subprocess; peak = max RSS during the step minus RSS just
before it (model and batch already built), so only the step's activations, logits and gradients
count. Run: ``python bench/loss_memory.py`` (writes bench/results/loss_memory.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one(kind: str, depth: int, efficient: bool, vocab: int, batch: int, seq: int) -> dict:
    import torch

    from multitoken.config import HeadsConfig, ModelConfig
    from multitoken.training.loss import MTPLoss
    from multitoken.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=688,
                      max_seq_len=seq, heads=HeadsConfig(kind, depth))
    model = Transformer(cfg)
    window = torch.randint(0, vocab, (batch, seq + 1))
    loss_fn = MTPLoss(model.depth, weights=[1.0] * (model.depth + 1), kernel="chunked" if efficient else "naive")
    for p in model.parameters():  # gradients exist before the step, as in training
        p.grad = torch.zeros_like(p)
    before = rss_mb()
    out = loss_fn(model, model(window[:, :-1]), window)
    out.loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    return {"heads": f"{kind}:{depth}" if depth else "none", "memory_efficient": efficient,
            "peak_step_mb": round(peak - before, 1), "loss": out.loss.item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results/loss_memory.json")
    a = ap.parse_args()
    if a.one:
        kind, depth, eff = a.one.split(",")
        print(json.dumps(one(kind, int(depth), eff == "1", a.vocab, a.batch, a.seq)))
        return
    rows = []
    for kind, depth in [("none", 0), ("parallel", 3), ("sequential", 3), ("medusa", 3)]:
        for eff in (False, True):
            cmd = [sys.executable, __file__, "--one", f"{kind},{depth},{int(eff)}", "--vocab", str(a.vocab),
                   "--batch", str(a.batch), "--seq", str(a.seq)]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    base = {r["memory_efficient"]: r["peak_step_mb"] for r in rows if r["heads"] == "none"}
    for r in rows:
        r["ratio_vs_1_head_same_loss"] = round(r["peak_step_mb"] / base[r["memory_efficient"]], 3)
        r["ratio_vs_1_head_naive"] = round(r["peak_step_mb"] / base[False], 3)
    print(f"vocab {a.vocab}, batch {a.batch} x {a.seq} tokens, dim 256, 4 layers, float32 on CPU")
    print(f"{'heads':<14}{'loss path':<12}{'peak MB':>10}{'vs 1 head':>11}")
    for r in rows:
        print(f"{r['heads']:<14}{'chunked' if r['memory_efficient'] else 'naive':<12}{r['peak_step_mb']:>10.1f}"
              f"{r['ratio_vs_1_head_same_loss']:>11.2f}")
    import torch

    result = {"command": "python bench/loss_memory.py " + " ".join(sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                          "torch": torch.__version__},
              "setup": {"vocab": a.vocab, "batch": a.batch, "seq": a.seq, "dim": 256, "n_layers": 4}, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
