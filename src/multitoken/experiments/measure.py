"""What one finished run of a study is worth, measured on its DATA_DIR's held-out files.

- main-head loss and bits per byte (quality.py) over the validation windows;
- per-depth loss and top-1 accuracy, and **teacher-forced** second-token acceptance and expected
  tau of greedy chain drafting (training/evaluate.py: drafts scored against the main head's
  argmax on the data's own tokens);
- **second-token acceptance in greedy generation**: `generation_prompts` held-out prompts
  decoded with `multitoken.decoding.generate(mode="spec")`, every head drafting, at temperature
  0; acceptance_per_position[0] is the share of verification steps whose first draft (the token
  after the main head's) was accepted, the number DeepSeek-V3 reports (85-90%). None for plain;
- next-line exact match (quality.py), and training tokens/s (median of the run's logged windows).

The prompts depend on the data only (the same for every model of a DATA_DIR): the held-out
documents of at least P + G tokens (P = seq_len // 2 prompt tokens, G = gen_tokens), at evenly
spaced indices; each prompt is the P tokens before the document's middle G tokens, so the model
continues real code rather than a file's opening lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multitoken.experiments.quality import held_out_token_docs


def generation_prompts(docs: list[np.ndarray], n: int, prompt_tokens: int, gen_tokens: int) -> list[tuple[int, int]]:
    """Where `n` prompts start in held-out documents (token arrays, EOS left out): (document index,
    first token), each prompt_tokens long; see the module docstring."""
    eligible = [i for i, d in enumerate(docs) if len(d) >= prompt_tokens + gen_tokens]
    if n < len(eligible):
        eligible = [eligible[i * len(eligible) // n] for i in range(n)]
    return [(i, (len(docs[i]) - prompt_tokens - gen_tokens) // 2) for i in eligible]


@torch.no_grad()
def generation_acceptance(model, prompts: list[list[int]], gen_tokens: int, eos_id: int | None,
                          batch_size: int = 16) -> dict[str, Any] | None:
    """Greedy chain self-speculative decoding of `prompts` with every head drafting.

    Returns:
        {"acceptance_per_position", "tau", "row_steps", "new_tokens", "prompts"} over all prompts
        (steps weighted by rows), or None for a model without heads or without prompts.
    """
    from multitoken.decoding import generate

    if model.depth == 0 or not prompts:
        return None
    accepted = np.zeros(model.depth)
    row_steps = new_tokens = 0
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s : s + batch_size]
        _, stats = generate(model, batch, max_new_tokens=gen_tokens, mode="spec", draft=model.depth, temperature=0.0,
                            eos_id=eos_id, compile=False, graphs=False)
        accepted += np.asarray(stats.acceptance_per_position) * stats.row_steps
        row_steps += stats.row_steps
        new_tokens += stats.new_tokens
    return {"acceptance_per_position": (accepted / max(row_steps, 1)).tolist(),
            "tau": float(accepted.sum() + row_steps) / max(row_steps, 1), "row_steps": row_steps,
            "new_tokens": new_tokens, "prompts": len(prompts)}


def learning_curve(records: list[dict[str, Any]], steps: int, every: int, tokens_per_step: int) -> list[list[float]]:
    """[step, tokens, main-head val loss] at multiples of `every` and at the end, from metrics.jsonl's
    records; the extra points each chunk's stop adds are left out, so a curve does not depend on
    where invocations stopped."""
    points = {r["step"]: r["loss_per_depth"][0] for r in records
              if r["split"] == "val" and (r["step"] == steps or (every and r["step"] % every == 0))}
    return [[s, s * tokens_per_step, points[s]] for s in sorted(points)]


def measure_run(study, spec, run_dir: Path) -> dict[str, Any]:
    """The result of a trained run: its metrics (module docstring), identity, data fingerprint and
    commit (results.py), learning curve; timing apart under "timing"."""
    from multitoken.data.prepare import load_tokenizer, shard_path
    from multitoken.data.shards import read_shard
    from multitoken.experiments.quality import (held_out_documents, next_line_cases, next_line_exact_match,
                                                score_bits_per_byte, val_windows)
    from multitoken.provenance import git_commit
    from multitoken.io.checkpoint import load_run
    from multitoken.training.evaluate import eval_stats, summarize
    from multitoken.training.parallel import resolve_device

    cfg, base, v = study.cfg, study.base, spec.variant
    data = study.data[v.data]
    seq_len, batch_size = base["seq_len"], base["batch_size"]
    device = resolve_device(base.get("device", "auto"))
    model, _ = load_run(run_dir, device=device, with_tokenizer=False)
    model.eval()
    tokenizer = load_tokenizer(data)
    eos = tokenizer.eos_id
    use_bf16 = base.get("dtype", "auto") == "bf16" or (base.get("dtype", "auto") == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    tokens = read_shard(shard_path(data, "val"), tokenizer.vocab_size)
    starts = val_windows(data, seq_len, cfg.eval_windows)
    batch = max(1, min(8, batch_size))
    t = time.perf_counter()
    bpb = score_bits_per_byte(model, tokens, starts, seq_len, tokenizer.token_byte_lengths(), eos, batch, device, autocast)
    windows = (torch.from_numpy(tokens[starts[s : s + batch, None] + np.arange(seq_len + 1)].astype(np.int64))
               for s in range(0, len(starts), batch))
    ev = summarize(eval_stats(model, windows, eos, device, autocast))
    eval_s = time.perf_counter() - t
    t = time.perf_counter()
    docs, p_len = held_out_token_docs(tokens, eos), seq_len // 2
    where = generation_prompts(docs, cfg.gen_prompts, p_len, cfg.gen_tokens)
    gen = generation_acceptance(model, [docs[i][s : s + p_len].tolist() for i, s in where], cfg.gen_tokens, eos)  # fp32
    if gen is not None:
        gen["prompt_starts"] = [list(x) for x in where]
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    cases = next_line_cases(held_out_documents(tokens, eos, tokenizer.decode), cfg.line_cases)
    lines = next_line_exact_match(model, tokenizer, cases, context=seq_len)
    lines_s = time.perf_counter() - t
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    curve = learning_curve(records, spec.steps, base.get("eval_every", 0), batch_size * seq_len)
    speeds = [r["tokens_per_s"] for r in records if r["split"] == "train" and "tokens_per_s" in r]
    tf = ev["acceptance_per_position"]
    return {
        "config": dataclasses.asdict(v), "seed": spec.seed, "steps": spec.steps, "preset": study.preset,
        "identity": study.identity(spec),
        "data": {"key": v.data, "sha256": study.fingerprints[v.data], "dir": str(data),
                 "train_tokens": study.meta[v.data]["splits"]["train"]["tokens"]},
        "commit": git_commit(),
        "tokens": spec.steps * batch_size * seq_len,
        "flops_per_token": study.flops(v), "flops": study.flops(v) * spec.steps * batch_size * seq_len,
        "val_loss": ev["loss_per_depth"][0], "loss_per_depth": ev["loss_per_depth"],
        "accuracy_per_depth": ev["accuracy_per_depth"], "acceptance_per_position": tf,
        "second_token_acceptance_teacher_forced": tf[0] if tf else None,
        "expected_tau": ev["expected_tau"], "eval_windows": len(starts), "eval_tokens": ev["tokens"],
        "generation": gen,
        "second_token_acceptance_generation": gen["acceptance_per_position"][0] if gen else None,
        "bits_per_byte": bpb["bits_per_byte"], "scored_bytes": bpb["bytes"], "scored_tokens": bpb["tokens"],
        "next_line_exact_match": lines["exact_match"], "next_line_cases": lines["cases"], "next_line_hits": lines["hits"],
        "curve": curve,
        "timing": {"tokens_per_s": statistics.median(speeds) if speeds else None, "eval_s": eval_s,
                   "generation_s": gen_s, "next_line_s": lines_s},
    }
