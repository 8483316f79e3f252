"""Issue 18: head-training tokens/s on a frozen SmolLM2-shaped model, one row per option, one process.

    PYTHONPATH=src python3 bench/gpu_head_train.py --out $OUT            # on the H200
    PYTHONPATH=src python3 bench/gpu_head_train.py --smoke --out /tmp/x  # a tiny shape, CPU is fine

Rows (`multitoken.bench.head_train.run_matrix`; random weights and tokens, batch x seq_len
tokens per step, bf16 autocast, fused AdamW, median of the timed steps): the distillation before
issue 18 (teacher per depth) first, then the teacher once, compiled blocks, the training-time
test, hard targets, and the compiled teacher-once path at larger loss chunks. Each row records
its tokens/s over the first row's. Every row runs in its own try/except and the JSON is
rewritten after each: $OUT/gpu_head_train.json. The target of issue 18 is >= 250k tokens/s.
First, a correctness check: the distillation kernel under bf16 autocast, eager and compiled,
against the naive float32 reference (`check_distill`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from multitoken.bench.head_train import measure_head_training

ROWS = [
    dict(distill=True, teacher="per_depth"),
    dict(distill=True),
    dict(distill=True, compile=True),
    dict(distill=True, compile=True, chunk_rows=1 << 16),
    dict(distill=True, compile=True, chunk_rows=1 << 18),
    dict(distill=True, compile=True, ttt=True),
    dict(distill=False, compile=True),
    dict(distill=True, compile=True, recompute="off"),
]


def check_distill(device: str, compiled: bool) -> dict:
    """`distill_kl` (bf16 autocast, as training runs it; eager or compiled) against the naive float32
    reference on a SmolLM2-sized vocabulary: KL per depth, agreement counts, gradients (relative error)."""
    from multitoken.training.distill import distill_kl, naive_distill_kl

    torch.manual_seed(0)
    B, T, C, V, D = 4, 256, 576, 49152, 4
    h0 = torch.randn(B, T, C, device=device) * 0.3
    w = (torch.randn(V, C, device=device) * 0.05).requires_grad_()
    hs = [(torch.randn(B, T, C, device=device) * 0.3).requires_grad_() for _ in range(D)]
    valid = torch.rand(D, B, T, device=device) > 0.1
    for j in range(D):
        valid[j, :, T - j - 1:] = False
    scales = torch.full((D,), 1e-3, device=device)
    params = hs + [w]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        loss, kl, _ = distill_kl(h0, w.detach(), hs, [w] * D, valid, scales, compiled=compiled)
    grads = torch.autograd.grad(loss, params)
    ref, ref_kl, _ = naive_distill_kl(h0, w.detach(), hs, [w] * D, valid, scales)
    ref_grads = torch.autograd.grad(ref, params)
    rel = [float((g.float() - r).norm() / r.norm().clamp(min=1e-30)) for g, r in zip(grads, ref_grads)]
    return dict(compiled=compiled, kl_rel=float(((kl - ref_kl).abs() / ref_kl.abs().clamp(min=1e-30)).max()),
                grad_rel_max=max(rel), ok=max(rel) < 3e-2 and float(((kl - ref_kl).abs() / ref_kl.abs()).max()) < 1e-2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--heads", default="sequential:4:shared")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--smoke", action="store_true", help="a tiny shape (CPU): checks the script end to end")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = dict(preset="smollm2-135m", heads=args.heads, batch_size=args.batch_size, seq_len=args.seq_len,
                  steps=args.steps, warmup=args.warmup, device=device)
    if args.smoke:
        common.update(preset="tiny", heads="sequential:2", batch_size=2, seq_len=32, steps=2, warmup=1,
                      overrides=dict(vocab_size=257))
    data = {"command": " ".join(["python3", "bench/gpu_head_train.py", *(argv or sys.argv[1:])]),
            "machine": {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                        "torch": torch.__version__}, "common": common, "rows": []}
    data["checks"] = []
    for compiled in ((False,) if args.smoke else (False, True)):
        try:
            data["checks"].append(check_distill(device, compiled))
        except Exception as e:  # a failing check is recorded, the rows still run
            data["checks"].append({"compiled": compiled, "error": f"{type(e).__name__}: {e}"})
        print("check", data["checks"][-1], flush=True)
    t0 = time.perf_counter()
    for options in ROWS:
        if args.smoke and options.get("compile"):
            options = {**options, "compile": False}  # compiling on a CPU takes minutes
        if time.perf_counter() - t0 > args.budget_s:
            data["rows"].append({**options, "skipped": "time budget"})
            continue
        try:
            r = measure_head_training(**{**common, **options})
            base = next((x for x in data["rows"] if "tokens_per_s" in x), r)
            r["vs_first"] = r["tokens_per_s"] / base["tokens_per_s"]
            print(f"{json.dumps(options):70s} {r['tokens_per_s']:>10.0f} tok/s x{r['vs_first']:.2f}", flush=True)
        except Exception as e:  # one failing option must not lose the others
            r = {**options, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            print(f"{json.dumps(options):70s} error: {r['error']}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        data["rows"].append(r)
        (out / "gpu_head_train.json").write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
