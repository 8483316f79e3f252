"""``multitoken bench train``: training throughput per head family, against plain training and its FLOPs.

For one preset and a list of head specs (``none`` first is the baseline), on random tokens:
tokens/s (median of timed steps after warm-up), model FLOPs utilisation, the FLOP-ideal ratio
and the measured ratio against plain training, peak memory, and optionally the same with the
naive loss (full logits per depth) next to the memory-efficient one.

FLOPs per token (`train_flops`), forward + backward = 3x the forward's multiply-adds x 2:
- 6 x P, with P the weights of every matrix the step multiplies by: every block that runs
  (the backbone's, the parallel heads' and the sequential modules'), `eh_proj`, Medusa's
  residual layers, and one vocabulary projection (V x d) per depth, since every depth's logits
  enter the loss;
- 6 x d x T x (blocks that run), for causal attention over T tokens (QK^T and AV are
  2 x d x T/2 multiply-adds per token and block, on average);
- recomputation (heads whose blocks are recomputed in backward) adds one more forward of those
  blocks: 2 x P_heads + 2 x d x T x (their blocks).
MFU counts the model's FLOPs (without recomputation) against the device's dense bf16 peak
(`--peak-tflops`, 989 for an H100/H200). The FLOP-ideal ratio is plain training's FLOPs per
token over this configuration's, recomputation included: the speed a head family would reach
if it cost exactly its FLOPs.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from multitoken.errors import UserError
from multitoken.training.flops import train_flops


PRECISIONS = ("autocast", "bf16-master")
"""fp32 weights + bf16 autocast (what `train` does), or bf16 weights with an fp32 master copy that
AdamW updates (`MasterWeights`)."""


class MasterWeights:
    """bf16 parameters for the step, float32 copies for AdamW: after backward the bf16 gradients
    are copied into the masters, the optimizer steps on them, and the results are copied back."""

    def __init__(self, model: torch.nn.Module, **adamw) -> None:
        self.params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_() for p in self.params]
        for p in self.params:
            p.data = p.data.to(torch.bfloat16)  # buffers (RoPE tables) stay float32
        self.opt = torch.optim.AdamW(self.master, **adamw)

    def step(self) -> None:
        for m, p in zip(self.master, self.params):
            m.grad = p.grad.float()
            p.grad = None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        torch._foreach_copy_([p.data for p in self.params], self.master)


def measure(preset: str, heads: str, batch_size: int, seq_len: int, vocab: int, steps: int, warmup: int,
            device: torch.device, compile: bool, *, loss: str = "auto",
            recompute: str = "auto", attention: str = "auto", compile_mode: str = "blocks",
            precision: str = "autocast", freeze_backbone: bool = False) -> dict:
    """Train `steps` timed steps (after `warmup`) on random tokens; tokens/s, memory, FLOPs.

    Args:
        loss: loss kernel (`loss.LOSS_KERNELS`; ``naive`` builds full logits).
        recompute: the heads' recomputation, `parallel.apply_recompute`'s mode.
        attention: SDPA backend (`parallel.attention_backend`); entered before the first step.
        compile_mode: `parallel.apply_compile`'s mode, when `compile`.
        precision: one of `PRECISIONS`.
        freeze_backbone: train the heads only, skipping the main head's loss as `train` does.
    """
    from multitoken.config import HeadsConfig, ModelConfig
    from multitoken.model import Transformer
    from multitoken.training.loss import MTPLoss, resolve_loss_kernel
    from multitoken.training.parallel import apply_compile, apply_recompute, attention_backend

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, heads=HeadsConfig.parse(heads), vocab_size=vocab, max_seq_len=seq_len)
    model = Transformer(cfg).to(device)
    cuda = device.type == "cuda"
    kernel = resolve_loss_kernel(loss, device)
    if freeze_backbone:
        model.freeze_backbone()
    recompute_note = apply_recompute(model, recompute, batch_size * seq_len, device, cuda)
    flops = train_flops(model, seq_len)
    if compile:
        apply_compile(model, compile_mode)
    if precision == "bf16-master":
        opt = MasterWeights(model, lr=1e-4, fused=cuda)
    elif precision == "autocast":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda)
    else:
        raise UserError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    weights = model.default_loss_weights()  # what `train` uses
    loss_fn = MTPLoss(model.depth, weights, eos_id=cfg.eos_id, kernel=kernel, skip_main=freeze_backbone)
    g = torch.Generator().manual_seed(1)
    windows = [torch.randint(2, vocab, (batch_size, seq_len + 1), generator=g).to(device) for _ in range(4)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and precision == "autocast")

    def step(i: int) -> None:
        w = windows[i % len(windows)]
        with autocast:
            out = loss_fn(model, model(w[:, :-1]), w)
        out.loss.backward()
        opt.step()
        if precision == "autocast":
            opt.zero_grad(set_to_none=True)

    with attention_backend(attention):
        warm, times = time_steps(step, warmup, steps, device)
    tps = batch_size * seq_len / statistics.median(times)
    return dict(heads=heads, loss=kernel, recompute=bool(getattr(model.mtp, "recompute", False)),
                recompute_note=recompute_note, attention=attention,
                compile=compile_mode if compile else "none", precision=precision, freeze_backbone=freeze_backbone,
                tokens_per_s=tps, step_s=statistics.median(times), step_times_s=times, warmup_s=warm,
                flops_per_token=flops,
                peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                parameters=model.num_parameters())


def add_ratios(results: list[dict], base: dict, peak_tflops: float, cuda: bool) -> None:
    """Fill each result's measured and FLOP-ideal ratios against `base` (a plain run measured in
    the same process), the share of the ideal reached, MFU and peak memory against `base`'s."""
    for r in results:
        r["vs_none"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["flop_ideal"] = base["flops_per_token"]["total"] / r["flops_per_token"]["total"]
        r["share_of_ideal"] = r["vs_none"] / r["flop_ideal"]
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"]["model"] / (peak_tflops * 1e12) if cuda else None
        if r.get("peak_memory_gib") is not None and base.get("peak_memory_gib"):
            r["memory_vs_none"] = r["peak_memory_gib"] / base["peak_memory_gib"]


def table(data: dict) -> str:
    lines = [f"{'heads':16s} {'loss':16s} {'tok/s':>10s} {'MFU':>6s} {'vs none':>8s} {'FLOP-ideal':>10s} "
             f"{'of ideal':>8s} {'peak GiB':>8s}"]
    for r in data["results"]:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        mem = f"{r['peak_memory_gib']:.2f}" if r.get("peak_memory_gib") is not None else "-"
        lines.append(f"{r['heads']:16s} {r['loss']:16s} {r['tokens_per_s']:10.0f} {mfu:>6s} {r['vs_none']:8.2f} "
                     f"{r['flop_ideal']:10.2f} {r['share_of_ideal']:8.1%} {mem:>8s}")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    from multitoken.viz import pyplot

    plt = pyplot(path.name)
    if plt is None:
        return

    rows = [r for r in data["results"] if r["loss"] != "naive"]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows) + 2), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["vs_none"] for r in rows], 0.4, label="measured tokens/s vs none")
    ax.bar([x + 0.2 for x in xs], [r["flop_ideal"] for r in rows], 0.4, label="FLOP-ideal ratio")
    ax.set_xticks(list(xs), [r["heads"] for r in rows])
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set(ylabel="relative to plain training", title=f"{data['preset']}, {data['batch_size']} x {data['seq_len']} tokens "
                                                      f"({data['machine']['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def time_steps(step, warmup: int, steps: int, device) -> tuple[float, list[float]]:
    """Run `step(i)` `warmup` times untimed (peak memory reset after them), then `steps` times timed,
    synchronising the device around each: (warm-up seconds, seconds per timed step)."""
    cuda = torch.device(device).type == "cuda"
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    warm = time.perf_counter() - t0
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(i)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return warm, times
