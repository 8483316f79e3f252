"""Head-training throughput on a frozen backbone (issue 18): tokens/s of the retrofit step per option.

The step is the trainer's for ``freeze_backbone=True``: the frozen backbone forward (its
parameters need no gradient, so it records no graph), the heads' forward, the loss on the heads
only (`MTPLoss(skip_main=True)`), backward, AdamW. Options measured side by side, in one process,
on a model of a preset's shape with random weights and random tokens:

- ``distill``: hard targets (False), or KL to the model's own distribution with the teacher once
  per batch (`training/distill.py`);
- ``teacher="per_depth"``: the distillation before issue 18, the teacher's logits recomputed for
  every depth (the chunked cross-entropy with teacher states, loss.py), the baseline the new path
  is compared with;
- ``ttt``, ``compile``, ``chunk_rows``, ``kernel`` and ``recompute`` as `TrainConfig` has them.

``run_matrix`` prints a table (with each row's tokens/s over the first row's) and returns the
records; bench/gpu_head_train.py runs it on the H200 and writes JSON.
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Any

import torch
from torch import Tensor

from multitoken.bench.train import time_steps
from multitoken.config import HeadsConfig, ModelConfig
from multitoken.model import Transformer
from multitoken.training.loss import MTPLoss, Targets, linear_cross_entropy


def per_depth_teacher_loss(model: Transformer, hiddens: list[Tensor], targets: Targets, weights: list[float],
                           chunk_rows: int = 0) -> Tensor:
    """The distillation loss before issue 18 (the baseline): each depth's teacher rows are the main
    state shifted by k, and the chunked cross-entropy recomputes the teacher's logits per depth."""
    D = len(hiddens) - 1
    B, T, _ = hiddens[0].shape
    main = hiddens[0].detach()
    counts = targets.counts.clamp(min=1).float()
    h = torch.cat([hiddens[k].flatten(0, 1) for k in range(1, D + 1)])
    teacher = torch.cat([torch.cat([main[:, k:], main[:, -1:].expand(-1, k, -1)], 1).flatten(0, 1) for k in range(1, D + 1)])
    scale = torch.cat([(weights[k] / counts[k]).expand(B * T) for k in range(1, D + 1)])
    loss, _, _ = linear_cross_entropy(h, model.unembed_weight(1), targets.tokens[1:].flatten(), scale, teacher,
                                      model.unembed_weight(0).detach(), chunk_rows)
    return loss


def measure_head_training(preset: str = "smollm2-135m", heads: str = "sequential:4:shared", batch_size: int = 16,
                          seq_len: int = 2048, steps: int = 10, warmup: int = 3, device: str | torch.device = "cuda", *,
                          distill: bool = True, teacher: str = "once", ttt: bool = False, compile: bool = False,
                          chunk_rows: int = 0, kernel: str = "auto", recompute: str = "auto",
                          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time the frozen-backbone head-training step with one set of options.

    Args:
        preset: model shape (`ModelConfig.from_preset`); `overrides` replace its fields (a tiny
            shape for a CPU smoke test).
        heads: heads spec.
        batch_size, seq_len: windows per step and tokens per window.
        steps, warmup: timed steps (median reported) after untimed ones (compilation happens there).
        device: where to run (bf16 autocast on CUDA, float32 elsewhere).
        distill: KL to the model's own distribution (else cross-entropy to the tokens).
        teacher: "once" (distill.py) or "per_depth" (the baseline before issue 18).
        ttt, compile, chunk_rows, kernel, recompute: as the `TrainConfig` fields ttt, compile,
            loss_chunk_rows, loss_kernel, recompute.
    Returns:
        The options, tokens_per_s, step_s (median), step_times_s, warmup_s and peak_memory_gib (CUDA).
    """
    from multitoken.training.parallel import apply_compile, apply_recompute
    from multitoken.training.trainer import enable_ttt

    device = torch.device(device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, heads=HeadsConfig.parse(heads), max_seq_len=seq_len, **(overrides or {}))
    model = Transformer(cfg).to(device)
    model.freeze_backbone()
    if ttt:
        enable_ttt(model)
    recompute_note = apply_recompute(model, recompute, batch_size * seq_len, device, cuda)
    if compile:
        apply_compile(model)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    D = model.depth
    weights = [1.0] * (D + 1)
    loss_fn = MTPLoss(D, weights, eos_id=cfg.eos_id, distill=distill and teacher == "once", chunk_rows=chunk_rows,
                      kernel=kernel, skip_main=True, compile=compile)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    g = torch.Generator().manual_seed(1)
    windows = [torch.randint(2, cfg.vocab_size, (batch_size, seq_len + 1), generator=g).to(device) for _ in range(2)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    model.train()

    def step(i: int) -> None:
        w = windows[i % len(windows)]
        targets = Targets.build(w, D, cfg.eos_id)
        with autocast:
            hiddens = model(w[:, :-1])
            if distill and teacher == "per_depth":
                loss = per_depth_teacher_loss(model, hiddens, targets, weights, chunk_rows)
            else:
                loss = loss_fn(model, hiddens, w, targets=targets).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    warm, times = time_steps(step, warmup, steps, device)
    step_s = statistics.median(times)
    return dict(preset=preset, heads=heads, batch_size=batch_size, seq_len=seq_len, distill=distill,
                teacher=teacher if distill else None, ttt=ttt, compile=compile, chunk_rows=chunk_rows,
                kernel=loss_fn.kernel_on(device), recompute_note=recompute_note,
                tokens_per_s=batch_size * seq_len / step_s, step_s=step_s, step_times_s=times, warmup_s=warm,
                peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None)


DEFAULT_MATRIX: list[dict[str, Any]] = [
    dict(distill=True, teacher="per_depth"),  # the baseline: distillation before issue 18
    dict(distill=True),
    dict(distill=True, compile=True),
    dict(distill=True, compile=True, ttt=True),
    dict(distill=False, compile=True),
]
"""The option sets `run_matrix` measures by default, the baseline first."""


def run_matrix(matrix: list[dict[str, Any]] | None = None, progress: bool = True, **common: Any) -> list[dict[str, Any]]:
    """`measure_head_training` for each option set (`common` arguments shared), with each row's
    ``vs_first`` = its tokens/s over the first row's; prints a table when `progress`."""
    rows = []
    for options in matrix or DEFAULT_MATRIX:
        rows.append(measure_head_training(**{**common, **options}))
        rows[-1]["vs_first"] = rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]
        if progress:
            r = rows[-1]
            print(f"distill={str(r['distill']):5s} teacher={str(r['teacher']):9s} ttt={str(r['ttt']):5s} "
                  f"compile={str(r['compile']):5s} chunk={r['chunk_rows']:<7d} {r['tokens_per_s']:>10.0f} tok/s "
                  f"x{r['vs_first']:.2f}" + (f"  {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] else ""),
                  flush=True)
    return rows

