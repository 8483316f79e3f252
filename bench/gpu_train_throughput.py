"""One GPU call for issue 11: is the fused loss exact, and how close does training get to its FLOPs?

    python3 -m zipfile -e .whl/liger_kernel-0.8.5-py3-none-any.whl /tmp/site   # a wheel is a zip
    python3 -c "import packaging" || python3 -m zipfile -e .whl/packaging-26.4-py3-none-any.whl /tmp/site
    PYTHONPATH=src:/tmp/site python3 bench/gpu_train_throughput.py --out $OUT

(liger-kernel is optional: without it the liger rows record an error and the others still run.)

1. Correctness (CUDA, bf16 autocast as training runs): for parallel:3, sequential:1 and medusa:3
   on a small model, `MTPLoss(kernel="liger")` against the naive reference (full logits,
   autograd): per-depth loss and accuracy, and every parameter's gradient (relative error of its
   norm); also with distillation (whose soft targets stay on the chunked kernel) and with a
   frozen backbone whose main loss is skipped. The naive loss's own bf16 error against float32
   is recorded next to it, for scale.
2. Throughput (`multitoken.bench.train.measure`, random tokens, batch 16 x 2048, fused AdamW,
   median of the timed steps): plain base and large with the loss kernels, whole-model compile,
   bf16 weights with an fp32 master copy, and the SDPA backends (eager, so no recompilation per
   backend); base with parallel:3, sequential:1, medusa:3 under chunked vs liger and recompute
   on vs off; parallel:4's peak memory against plain; medusa:3 on a frozen backbone (main loss
   skipped). Each head row's ratios are against the plain base run with the same loss kernel,
   compile mode and precision, measured in this process.

Every configuration runs in its own try/except, the JSON is rewritten after each one, and rows
that would start after the time budget (--budget-s) are recorded as skipped. Writes
$OUT/gpu_train_throughput.json and .png; prints a table. `--smoke` runs the whole script on a
tiny model (CPU is fine) to check it end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from multitoken.bench.train import add_ratios, measure
from multitoken.config import HeadsConfig, ModelConfig
from multitoken.training.loss import MTPLoss
from multitoken.model import Transformer

PEAK_TFLOPS = 989.0  # dense bf16, H100/H200


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def loss_and_grads(model_fn, kind: str, window: torch.Tensor, kernel: str, bf16: bool, **kw) -> tuple:
    model = model_fn()
    with torch.autocast(window.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = MTPLoss(model.depth, model.default_loss_weights(), eos_id=1, kernel=kernel, **kw)(
            model, model(window[:, :-1]), window)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_correctness(device: torch.device, preset: str, batch: int, seq: int, kernel: str) -> list[dict]:
    """Loss kernel `kernel` against the naive reference, for each head family and variant."""
    rows = []
    tol = dict(loss_abs=2e-3, acc_abs=0.02, grad_rel=2e-2)
    for spec in ("parallel:3", "sequential:1", "medusa:3"):
        for variant in ("ce", "distill", "frozen"):
            row = dict(heads=spec, variant=variant, kernel=kernel, tolerance=tol)
            try:
                cfg = ModelConfig.from_preset(preset, heads=HeadsConfig.parse(spec), max_seq_len=seq, eos_id=1)

                def make(cfg=cfg, variant=variant):
                    torch.manual_seed(0)
                    m = Transformer(cfg).to(device)
                    if variant == "frozen":
                        m.freeze_backbone()
                    return m

                g = torch.Generator().manual_seed(2)
                window = torch.randint(2, cfg.vocab_size, (batch, seq + 1), generator=g)
                window[:, seq // 3] = 1  # a document boundary in every row
                window = window.to(device)
                kw = dict(distill=variant == "distill")
                a, ga = loss_and_grads(make, spec.split(":")[0], window, kernel, True, skip_main=variant == "frozen", **kw)
                b, gb = loss_and_grads(make, spec.split(":")[0], window, "naive", True, **kw)
                c, gc = loss_and_grads(make, spec.split(":")[0], window, "naive", False, **kw)  # float32 reference
                first = 1 if variant == "frozen" else 0
                row.update(
                    loss_abs=float((a.per_depth_loss[first:] - b.per_depth_loss[first:]).abs().max()),
                    acc_abs=float((a.per_depth_acc[first:] - b.per_depth_acc[first:]).abs().max()),
                    grad_rel=max(rel_err(ga[n], gb[n]) for n in gb),
                    same_grad_names=sorted(ga) == sorted(gb),
                    naive_bf16_vs_fp32=dict(loss_abs=float((b.per_depth_loss - c.per_depth_loss).abs().max()),
                                            grad_rel=max(rel_err(gb[n], gc[n]) for n in gc)))
                row["ok"] = bool(row["same_grad_names"] and row["loss_abs"] <= tol["loss_abs"]
                                 and row["acc_abs"] <= tol["acc_abs"] and row["grad_rel"] <= tol["grad_rel"])
            except Exception as e:  # noqa: BLE001 - one failure must not lose the other rows
                row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=4))
            print(f"check {spec:13s} {variant:8s} {kernel}: "
                  + (f"ok={row['ok']} loss {row.get('loss_abs', float('nan')):.1e} grad {row.get('grad_rel', float('nan')):.1e}"
                     if "error" not in row else row["error"]), flush=True)
            rows.append(row)
    return rows


def configs(large: str, base: str) -> list[dict]:
    """The throughput rows, most important first (the budget cuts from the end)."""
    rows = []

    def add(preset, heads="none", **kw):
        rows.append(dict(preset=preset, heads=heads, loss=kw.pop("loss", "liger"), compile=kw.pop("compile", True),
                         compile_mode=kw.pop("compile_mode", "blocks"), recompute=kw.pop("recompute", "off"),
                         attention=kw.pop("attention", "auto"), precision=kw.pop("precision", "autocast"), **kw))

    add(base, loss="chunked")  # issue 11's baseline
    add(base)
    for spec in ("parallel:3", "sequential:1", "medusa:3"):
        add(base, spec)  # liger, recompute off
    for spec in ("parallel:3", "sequential:1", "medusa:3"):
        add(base, spec, loss="chunked", recompute="on" if spec != "medusa:3" else "off")  # the old defaults
    add(base, "parallel:4", recompute="on")
    add(base, "parallel:4", recompute="off")
    add(base, "parallel:3", recompute="on")
    add(base, "sequential:1", recompute="on")
    add(large, loss="chunked")
    add(large)
    add(base, compile_mode="model")
    add(large, compile_mode="model")
    add(base, precision="bf16-master")
    add(large, precision="bf16-master")
    add(base, "medusa:3", freeze_backbone=True)
    add(base, "medusa:3", freeze_backbone=True, loss="chunked")
    for attention in ("auto", "flash", "cudnn", "efficient"):
        add(base, compile=False, attention=attention)
    add(base, "parallel:3", compile_mode="model")
    add(base, "parallel:3", loss="chunked")  # chunked, recompute off: the loss kernel alone
    return rows


def compile_key(c: dict) -> tuple:
    return (c["preset"], c["compile"], c["compile_mode"], c["precision"], c["attention"])


def baseline_for(r: dict, results: list[dict]) -> dict | None:
    """The plain run of the same preset, loss kernel, compile and precision (and attention)."""
    for b in results:
        if (b.get("heads") == "none" and "tokens_per_s" in b and b["preset"] == r["preset"] and b["loss"] == r["loss"]
                and b["compile"] == r["compile"] and b["precision"] == r["precision"] and b["attention"] == r["attention"]):
            return b
    return None


def finish(results: list[dict], cuda: bool) -> None:
    for r in results:
        if "tokens_per_s" in r:
            b = baseline_for(r, results)
            if b is not None:
                add_ratios([r], b, PEAK_TFLOPS, cuda)


def table(data: dict) -> str:
    lines = ["correctness (liger vs naive, bf16):"]
    for c in data["correctness"]:
        lines.append(f"  {c['heads']:13s} {c['variant']:8s} ok={c.get('ok')} "
                     + (f"loss {c['loss_abs']:.1e} acc {c['acc_abs']:.3f} grad {c['grad_rel']:.1e} "
                        f"(naive bf16 vs fp32: grad {c['naive_bf16_vs_fp32']['grad_rel']:.1e})" if "error" not in c
                        else c["error"][:100]))
    head = (f"{'preset':6s} {'heads':13s} {'loss':7s} {'rec':3s} {'compile':7s} {'attn':9s} {'prec':11s} {'tok/s':>9s} "
            f"{'MFU':>6s} {'vs none':>7s} {'ideal':>6s} {'of ideal':>8s} {'GiB':>6s} {'x none':>6s}")
    lines.append(head)
    for r in data["results"]:
        name = r["heads"] + (" frozen" if r.get("freeze_backbone") else "")
        prefix = (f"{r['preset']:6s} {name:13s} {r['loss']:7s} {('on' if r.get('recompute') in (True, 'on') else 'off'):3s} "
                  f"{(r['compile_mode'] if r['compile'] else 'eager'):7s} {r['attention']:9s} {r['precision']:11s}")
        if "tokens_per_s" not in r:
            lines.append(f"{prefix} {r.get('error', r.get('skipped', '?'))[:70]}")
            continue
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"  # noqa: E731
        lines.append(f"{prefix} {r['tokens_per_s']:9.0f} {f('mfu', '6.1%')} {f('vs_none', '7.2f')} {f('flop_ideal', '6.2f')} "
                     f"{f('share_of_ideal', '8.1%')} {f('peak_memory_gib', '6.1f')} {f('memory_vs_none', '6.2f')}")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if "share_of_ideal" in r]
    heads = [r for r in rows if r["heads"] != "none"]
    plain = [r for r in rows if r["heads"] == "none"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    label = lambda r: (f"{r['preset']} {r['heads']}{' frozen' if r.get('freeze_backbone') else ''}\n{r['loss']} "  # noqa: E731
                       f"rec {'on' if r['recompute'] else 'off'}{' ' + r['compile_mode'] if r['compile_mode'] != 'blocks' else ''}")
    axes[0].bar(range(len(heads)), [r["share_of_ideal"] for r in heads],
                color=["tab:orange" if r["loss"] == "liger" else "tab:blue" for r in heads])
    axes[0].axhline(0.95, color="k", ls="--", lw=0.8, label="target 95%")
    axes[0].set_xticks(range(len(heads)), [label(r) for r in heads], rotation=70, fontsize=7)
    axes[0].set(ylabel="measured / FLOP-ideal ratio vs plain", title="head families (orange: liger, blue: chunked)")
    axes[0].legend(fontsize=8)
    axes[1].bar(range(len(plain)), [r["mfu"] or 0 for r in plain],
                color=["tab:orange" if r["loss"] == "liger" else "tab:blue" for r in plain])
    axes[1].axhline(0.40, color="tab:gray", ls="--", lw=0.8, label="base target 40%")
    axes[1].axhline(0.45, color="k", ls="--", lw=0.8, label="large target 45%")
    axes[1].set_xticks(range(len(plain)), [f"{r['preset']} {r['loss']}\n{r['compile_mode'] if r['compile'] else 'eager'} "
                                           f"{r['attention']} {r['precision']}" for r in plain], rotation=70, fontsize=7)
    axes[1].set(ylabel="MFU", title=f"plain training ({data['machine']['device']})")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-gpu-train"))
    ap.add_argument("--budget-s", type=float, default=360.0, help="start no throughput row after this many seconds")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU is fine): check the script end to end")
    args = ap.parse_args()
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls outside autocast (master copies, norms)
    base, large, batch, seq, vocab = ("base", "large", 16, 2048, 32768) if not args.smoke else ("small", "tiny", 2, 64, 512)
    steps, warmup = (args.steps, args.warmup) if not args.smoke else (2, 1)
    try:
        from importlib.metadata import version

        liger_version = version("liger-kernel")
    except Exception:  # noqa: BLE001
        liger_version = None
    data = dict(command="python3 bench/gpu_train_throughput.py " + " ".join(sys.argv[1:]), batch_size=batch, seq_len=seq,
                vocab=vocab, steps=steps, warmup=warmup, peak_tflops=PEAK_TFLOPS, date=time.strftime("%Y-%m-%d"),
                machine=dict(device=torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                             torch=torch.__version__, python=platform.python_version(), liger_kernel=liger_version),
                correctness=[], results=[])
    path = out / "gpu_train_throughput.json"
    kernel = "liger" if cuda else "chunked"  # on CPU (smoke) the check exercises the script, not liger
    data["correctness"] = check_correctness(device, "small" if not args.smoke else "tiny", 4, 256 if not args.smoke else 32,
                                            kernel)
    data["correctness_s"] = time.perf_counter() - t_start
    write(path, data)

    last_key = None
    for c in configs(large, base):
        row = dict(c)
        if time.perf_counter() - t_start > args.budget_s:
            row["skipped"] = "time budget"
            data["results"].append(row)
            continue
        t0 = time.perf_counter()
        try:
            if compile_key(c) != last_key:
                torch._dynamo.reset()  # a new shape, compile mode, precision or SDPA backend: trace afresh
                last_key = compile_key(c)
            loss = c["loss"] if cuda or not args.smoke else "chunked"  # smoke on CPU: exercise the other paths
            r = measure(c["preset"], c["heads"], batch, seq, vocab, steps, warmup, device, c["compile"], loss=loss,
                        recompute=c["recompute"], attention=c["attention"], compile_mode=c["compile_mode"],
                        precision=c["precision"], freeze_backbone=c.get("freeze_backbone", False))
            row.update(r, preset=c["preset"], compile=c["compile"], compile_mode=c["compile_mode"])
        except Exception as e:  # noqa: BLE001 - one failure must not lose the other rows
            row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
                       traceback=traceback.format_exc(limit=6))
            last_key = None
        finally:
            if cuda:
                torch.cuda.empty_cache()
        row["wall_s"] = time.perf_counter() - t0
        data["results"].append(row)
        finish(data["results"], cuda)
        data["elapsed_s"] = time.perf_counter() - t_start
        write(path, data)
        print(f"[{data['elapsed_s']:6.1f}s] {c['preset']} {c['heads']} {c['loss']} rec={c['recompute']} "
              f"{c['compile_mode'] if c['compile'] else 'eager'} {c['attention']} {c['precision']}"
              f"{' frozen' if c.get('freeze_backbone') else ''}: "
              + (f"{row['tokens_per_s']:.0f} tok/s, {row['wall_s']:.0f}s" if "tokens_per_s" in row else row["error"]),
              flush=True)
    try:
        plot(data, out / "gpu_train_throughput.png")
    except Exception as e:  # noqa: BLE001
        print(f"plot failed: {e}", file=sys.stderr)
    print(table(data))
    print(f"wrote {path} ({time.perf_counter() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
