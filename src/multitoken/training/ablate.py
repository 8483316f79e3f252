"""`multitoken ablate`: does MTP make the main model better? Train head configurations side by side.

A study is a list of configurations (`AblateConfig`: heads, loss weights, lambda schedule, which
DATA_DIR) trained on the same data with the same settings, on two axes:

- **equal tokens**: every configuration trains ``--steps`` steps of batch x seq_len tokens;
- **equal compute**: a configuration whose training costs F_c FLOPs per token trains
  ``max(1, round(steps x F_plain / F_c))`` steps, F_plain being a plain model's (no heads) on
  the same data, so every run spends the plain run's FLOPs. F is `bench.train.train_flops`
  ("total": 6 x the weights of every matrix multiplied, one V x d projection per depth
  included, + 6 x d x seq_len per block for causal attention, + the recomputed heads' forward).
  Each run gets its own full learning-rate schedule over its own step count.

Seeds: a first pass trains seed 0 of everything; then plain (on each DATA_DIR) and the two
configurations whose seed-0 main-head bits per byte improve most on their own DATA_DIR's plain
run at equal tokens get seeds 1 .. --seeds-1, on both axes. A run that two axes share (plain,
or any configuration whose equal-compute step count equals --steps) is trained once.

Resumable: each run is an ordinary train RUN_DIR under OUT/runs/NAME/seed{S}-steps{N}, trained
in chunks with ``train(..., resume=True, stop_after=...)``; a run whose ``ablate_result.json``
exists is finished and skipped, any other one continues from its checkpoint. ``--max-minutes``
stops an invocation before a chunk that would not fit (chunks shrink to fit, timed on the
previous chunk); ``--max-steps`` caps the optimizer steps of one invocation (tests use it to
cut a run short). Run again with the same arguments to continue; the plan is a function of the
arguments and of the finished first-pass results only.

After training, each run is measured (`measure_run`) on its DATA_DIR's validation split:
main-head loss and bits per byte (quality.py), per-depth loss/accuracy, second-token
acceptance and expected tau (evaluate.py), next-line exact match on held-out files
(quality.py), and training tokens/s (median of the run's logged windows). OUT gets
``ablate.json`` (everything), ``ablate.md`` (the table), ``curves.png`` (main-head validation
loss against tokens or FLOPs, one line per configuration, the seeds' min-max as a band).
"""

from __future__ import annotations

import logging
import dataclasses
import json
import math
import platform
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitoken.errors import UserError
from multitoken.io import outdir

log = logging.getLogger(__name__)

RESULT_FILE = "ablate_result.json"
OUT_FILES = ("ablate.json", "ablate.md", "curves.png", outdir.MARKER_FILE)
AXES = ("tokens", "compute")
DATA_KEYS = ("main", "bytes")
# Options every run shares; the ones a configuration or the study sets are refused in --train-config.
PER_RUN_FIELDS = ("heads", "loss_weights", "mtp_lambda", "seed", "steps", "init", "freeze_backbone", "distill")

SUITES: dict[str, list[str]] = {
    # Every head family against the plain model (issue 14's study): plain; parallel n=2 and n=4 with equal, geometric and DeepSeek-style weights;
    # sequential D=1 with lambda 0.3 and 0.3 -> 0.1 (at 2/3 of the run, as DeepSeek-V3 switched at
    # 10T of 14.8T tokens); sequential D=3; plain vs n=8 bytes (Gloeckle et al.'s byte-level model).
    "head-families": [
        "plain=none",
        "par2-equal=parallel:1/w=equal", "par2-geo=parallel:1/w=geometric:0.5", "par2-lambda=parallel:1/w=lambda/lambda=0.3",
        "par4-equal=parallel:3/w=equal", "par4-geo=parallel:3/w=geometric:0.5", "par4-lambda=parallel:3/w=lambda/lambda=0.3",
        "seq1=sequential:1/lambda=0.3", "seq1-decay=sequential:1/lambda=0.3,0.1@67%", "seq3=sequential:3/lambda=0.3",
        "bytes-plain=none/data=bytes", "bytes-par8=parallel:7/w=equal/data=bytes",
    ],
}
SUITE_ALIASES = {"issue14": "head-families"}
"""Older suite names, still accepted (issue14 is the study docs/results.md reports)."""


def suite(name: str) -> list[str]:
    """The configurations of suite `name` (an alias included)."""
    return SUITES[SUITE_ALIASES.get(name, name)]


# ---- configurations and the plan ------------------------------------------------------------------


@dataclass(frozen=True)
class AblateConfig:
    """One head configuration of a study."""

    name: str
    """Its label in tables, plots and folder names."""
    heads: str
    """parallel:N, sequential:N, medusa:N or none."""
    weights: str | None = None
    """--loss-weights (numbers or a named schedule); None for the family's default."""
    mtp_lambda: str = "0.3"
    """--mtp-lambda; a step written N% is N percent of the run's own step count."""
    data: str = "main"
    """'main' (--data) or 'bytes' (--byte-data)."""

    @property
    def plain(self) -> bool:
        return self.heads == "none"

    def describe(self) -> str:
        from multitoken.config import HeadsConfig
        from multitoken.training.loss import resolve_weights

        if self.plain:
            return "-"
        h = HeadsConfig.parse(self.heads)
        weights = self.weights or ("lambda" if resolve_weights(None, h.kind, h.depth) is None else "default")
        return weights + (f" (lambda {self.mtp_lambda})" if weights == "lambda" else "")

    def lambda_for(self, steps: int) -> str:
        """The lambda schedule with N% steps resolved against a run of `steps` steps."""
        parts = []
        for part in self.mtp_lambda.split(","):
            value, at, step = part.strip().partition("@")
            if step.endswith("%"):
                step = str(round(float(step[:-1]) / 100 * steps))
            parts.append(value + (at + step if at else ""))
        return ",".join(parts)


def parse_config(text: str) -> AblateConfig:
    """``[NAME=]HEADS[/w=WEIGHTS][/lambda=SCHEDULE][/data=main|bytes]``, e.g.
    ``seq1-decay=sequential:1/lambda=0.3,0.1@67%``; one-line `UserError` when malformed."""
    from multitoken.checks import Floats
    from multitoken.config import HeadsConfig
    from multitoken.config import parse_schedule, parse_weights

    usage = "expected [NAME=]HEADS[/w=WEIGHTS][/lambda=SCHEDULE][/data=main|bytes], e.g. par4-geo=parallel:3/w=geometric:0.5"
    name, eq, rest = text.partition("=")
    if not eq or "/" in name or ":" in name:
        name, rest = "", text
    head, *fields = rest.split("/")
    try:
        HeadsConfig.parse(head)
    except UserError as e:
        raise UserError(f"--configs {text!r}: {e}") from None
    derived = "".join(c if c.isalnum() or c in "-." else "_" for c in rest)  # parallel:2/w=1,0.5 -> parallel_2_w_1_0.5
    kw: dict[str, Any] = {"name": name or derived}
    for f in fields:
        key, eq, value = f.partition("=")
        if key not in ("w", "lambda", "data") or not eq or not value:
            raise UserError(f"--configs {text!r}: unknown field {f!r}; {usage}")
        kw[{"w": "weights", "lambda": "mtp_lambda", "data": "data"}[key]] = value
    if kw.get("data", "main") not in DATA_KEYS:
        raise UserError(f"--configs {text!r}: data={kw['data']!r}; choose main or bytes")
    if kw.get("weights") is not None:
        from multitoken.config import LOSS_WEIGHT_RANGE

        try:
            if kw["weights"][:1].isalpha():
                kw["weights"] = parse_weights(kw["weights"])
            else:  # numbers, kept as written (the run's --loss-weights); checked here, before any work
                n = len([LOSS_WEIGHT_RANGE.parse(x) for x in kw["weights"].split(",")])
                if n != HeadsConfig.parse(head).depth + 1:
                    raise UserError(f"{n} weights for {head}: give one per depth, main head first")
        except (UserError, ValueError) as e:
            raise UserError(f"--configs {text!r}: {e}") from None
    lam = kw.get("mtp_lambda", "0.3")
    try:
        for part in lam.split(","):
            value, at, step = part.strip().partition("@")
            if step.endswith("%"):
                Floats(0, 100).parse(step[:-1])
        parse_schedule(AblateConfig("x", head, mtp_lambda=lam).lambda_for(1000))
    except (UserError, ValueError) as e:
        raise UserError(f"--configs {text!r}: lambda {lam!r}: {e}") from None
    if not all(c.isalnum() or c in "-_." for c in kw["name"]):
        raise UserError(f"--configs {text!r}: name {kw['name']!r} must be letters, digits, '-', '_' or '.' (it names a folder)")
    return AblateConfig(heads=head, **kw)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study: a configuration, a seed and a step count."""

    config: AblateConfig
    seed: int
    steps: int

    @property
    def folder(self) -> str:
        return f"runs/{self.config.name}/seed{self.seed}-steps{self.steps}"


def flops_per_token(config: AblateConfig, preset: str, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token of `config` (bench.train.train_flops "total"), built on the meta device."""
    import torch

    from multitoken.training.flops import train_flops
    from multitoken.config import HeadsConfig, ModelConfig
    from multitoken.model import Transformer

    cfg = ModelConfig.from_preset(preset, heads=HeadsConfig.parse(config.heads), vocab_size=vocab_size,
                                  max_seq_len=max(seq_len, ModelConfig.from_preset(preset).max_seq_len))
    with torch.device("meta"):
        model = Transformer(cfg)
    return train_flops(model, seq_len)["total"]


def equal_compute_steps(steps: int, flops: float, plain_flops: float) -> int:
    """Steps at which a configuration of `flops` per token spends what `steps` plain steps spend."""
    return max(1, round(steps * plain_flops / flops))


def best_configs(results: dict[str, dict[str, Any]], configs: list[AblateConfig], k: int = 2) -> list[str]:
    """The `k` non-plain configurations whose seed-0 equal-token bits per byte improve most on the
    plain run of their own DATA_DIR (`results`: config name -> that run's result)."""
    plain = {c.data: results[c.name]["bits_per_byte"] for c in configs if c.plain and c.name in results}
    gains = [(results[c.name]["bits_per_byte"] - plain[c.data], i, c.name) for i, c in enumerate(configs)
             if not c.plain and c.name in results and c.data in plain]
    return [name for _, _, name in sorted(gains)[:k]]


# ---- the study -------------------------------------------------------------------------------------


@dataclass
class Study:
    """Everything a study's runs share, and where they go."""

    configs: list[AblateConfig]
    data: dict[str, Path]
    out: Path
    base: dict[str, Any]
    """TrainConfig fields every run shares (preset, batch_size, seq_len, lr, device, ...)."""
    steps: int
    seeds: int
    axes: tuple[str, ...]
    eval_windows: int = 0
    line_cases: int = 200
    chunk_steps: int = 250
    keep_weights: bool = True
    say: Any = print

    def __post_init__(self) -> None:
        from multitoken.data.prepare import load_meta

        self.meta = {key: load_meta(path) for key, path in self.data.items()}
        seq_len = self.base["seq_len"]
        self.flops = {c.name: flops_per_token(c, self.base["preset"], self.meta[c.data]["vocab_size"], seq_len)
                      for c in self.configs}
        self.plain_flops = {key: flops_per_token(AblateConfig("plain", "none"), self.base["preset"], m["vocab_size"], seq_len)
                            for key, m in self.meta.items()}

    def steps_for(self, c: AblateConfig, axis: str) -> int:
        return self.steps if axis == "tokens" else equal_compute_steps(self.steps, self.flops[c.name], self.plain_flops[c.data])

    def plan(self) -> tuple[list[tuple[RunSpec, tuple[str, ...]]], list[str] | None]:
        """Runs in order (each with the axes it serves), and the configurations given more seeds
        (None while the first pass is unfinished)."""
        runs: dict[RunSpec, list[str]] = {}

        def add(c: AblateConfig, seed: int) -> None:
            for axis in self.axes:
                runs.setdefault(RunSpec(c, seed, self.steps_for(c, axis)), []).append(axis)

        for c in self.configs:
            add(c, 0)
        first = {c.name: self.result(RunSpec(c, 0, self.steps_for(c, self.axes[0]))) for c in self.configs}
        chosen = None
        if self.seeds > 1 and all(r is not None for r in first.values()):
            chosen = best_configs(first, self.configs)
            for seed in range(1, self.seeds):
                for c in self.configs:
                    if c.plain or c.name in chosen:
                        add(c, seed)
        return [(spec, tuple(axes)) for spec, axes in runs.items()], chosen

    def result(self, spec: RunSpec) -> dict[str, Any] | None:
        path = self.out / spec.folder / RESULT_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def train_config(self, spec: RunSpec):
        from multitoken.config import TrainConfig

        c = spec.config
        weights = c.weights if c.weights is None or c.weights[:1].isalpha() else [float(w) for w in c.weights.split(",")]
        return TrainConfig(**{**self.base, "heads": c.heads, "loss_weights": weights, "mtp_lambda": c.lambda_for(spec.steps),
                              "seed": spec.seed, "steps": spec.steps, "save_every": 0, "keep_checkpoints": 1})


def checkpoint_step(run_dir: Path) -> int:
    from multitoken.io.checkpoint import latest_checkpoint

    folder = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    return int(folder.name.split("_")[1]) if folder is not None else 0


def run_study(study: Study, max_minutes: float | None = None, max_steps: int | None = None) -> dict[str, Any]:
    """Train and measure every planned run that is not finished, within the budgets.

    Returns:
        {"complete": all planned runs finished, "trained_steps": optimizer steps this call}.
    """
    from multitoken.training.trainer import train

    t0 = time.perf_counter()
    budget_s = max_minutes * 60 if max_minutes else math.inf
    steps_left = max_steps if max_steps is not None else math.inf
    sec_per_flop: float | None = None  # measured training speed, carried from run to run
    # Reserved before each chunk for the run's final measurement: the longest one so far, and
    # until one is timed, a guess: a tenth of the budget, at most a minute.
    measure_s = min(60.0, budget_s * 0.1) if max_minutes else 0.0
    trained = 0
    while True:
        plan, chosen = study.plan()
        todo = [(spec, axes) for spec, axes in plan if study.result(spec) is None]
        if not todo:
            return {"complete": chosen is not None or study.seeds == 1, "trained_steps": trained}
        spec, axes = todo[0]
        run_dir = study.out / spec.folder
        cfg = study.train_config(spec)
        flops_per_step = study.flops[spec.config.name] * cfg.batch_size * cfg.seq_len
        step = checkpoint_step(run_dir)
        while step < spec.steps:
            left_s = budget_s - (time.perf_counter() - t0) - measure_s
            n = min(study.chunk_steps, spec.steps - step, steps_left)
            if sec_per_flop is not None and math.isfinite(left_s):
                n = min(n, int(left_s * 0.95 / (sec_per_flop * flops_per_step)))
            elif math.isfinite(left_s):
                n = min(n, 10)  # no speed known yet: a short first chunk measures it
            if n < 1 or left_s <= 0:
                study.say(f"budget reached at {spec.folder} step {step}/{spec.steps}: run the same command again to continue")
                return {"complete": False, "trained_steps": trained}
            study.say(f"{spec.folder} ({', '.join(axes)}): steps {step} -> {step + n} of {spec.steps}")
            t = time.perf_counter()
            train(cfg, study.data[spec.config.data], run_dir, resume=True, progress=False, stop_after=step + n)
            sec_per_flop = (time.perf_counter() - t) / (n * flops_per_step)
            step += n
            trained += n
            steps_left -= n
        if budget_s - (time.perf_counter() - t0) < measure_s:
            study.say(f"budget reached before measuring {spec.folder}: run the same command again to continue")
            return {"complete": False, "trained_steps": trained}
        t = time.perf_counter()
        result = measure_run(study, spec, run_dir)
        measure_s = max(measure_s, time.perf_counter() - t)
        outdir.write_json(run_dir / RESULT_FILE, result)  # marks the run finished
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # resume state of a finished run: GBs at base size
        if not study.keep_weights:
            (run_dir / "model.safetensors").unlink(missing_ok=True)


# ---- measuring one run -------------------------------------------------------------------------------


def measure_run(study: Study, spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """The metrics of a trained run (see the module docstring); timing apart under "timing"."""
    import contextlib

    import numpy as np
    import torch

    from multitoken.io.checkpoint import load_run
    from multitoken.data.prepare import load_tokenizer, shard_path
    from multitoken.data.shards import read_shard
    from multitoken.training.evaluate import eval_stats, summarize
    from multitoken.training.parallel import resolve_device
    from multitoken.training.quality import (held_out_documents, next_line_cases, next_line_exact_match, score_bits_per_byte,
                                    val_windows)

    data = study.data[spec.config.data]
    seq_len = study.base["seq_len"]
    device = resolve_device(study.base.get("device", "auto"))
    model, _ = load_run(run_dir, device=device, with_tokenizer=False)
    tokenizer = load_tokenizer(data)
    eos = tokenizer.eos_id
    use_bf16 = study.base.get("dtype", "auto") in ("bf16", "bfloat16") or (study.base.get("dtype", "auto") == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    tokens = read_shard(shard_path(data, "val"), tokenizer.vocab_size)
    starts = val_windows(data, seq_len, study.eval_windows)
    batch = max(1, min(8, study.base["batch_size"]))
    t = time.perf_counter()
    bpb = score_bits_per_byte(model, tokens, starts, seq_len, tokenizer.token_byte_lengths(), eos, batch, device, autocast)
    windows = (torch.from_numpy(tokens[starts[s : s + batch, None] + np.arange(seq_len + 1)].astype(np.int64))
               for s in range(0, len(starts), batch))
    ev = summarize(eval_stats(model, windows, eos, device, autocast))
    eval_s = time.perf_counter() - t
    t = time.perf_counter()
    cases = next_line_cases(held_out_documents(tokens, eos, tokenizer.decode), study.line_cases)
    lines = next_line_exact_match(model, tokenizer, cases, context=seq_len)
    lines_s = time.perf_counter() - t
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    # Validation points at multiples of eval_every and at the end; the extra ones that each chunk's
    # stop adds are left out, so a curve does not depend on where invocations stopped.
    every = study.base.get("eval_every", 0)
    points = {r["step"]: r["loss_per_depth"][0] for r in records
              if r["split"] == "val" and (r["step"] == spec.steps or (every and r["step"] % every == 0))}
    curve = [[s, s * study.base["batch_size"] * seq_len, points[s]] for s in sorted(points)]
    speeds = [r["tokens_per_s"] for r in records if r["split"] == "train" and "tokens_per_s" in r]
    return {
        "config": dataclasses.asdict(spec.config), "seed": spec.seed, "steps": spec.steps,
        "tokens": spec.steps * study.base["batch_size"] * seq_len,
        "flops_per_token": study.flops[spec.config.name],
        "flops": study.flops[spec.config.name] * spec.steps * study.base["batch_size"] * seq_len,
        "val_loss": ev["loss_per_depth"][0], "loss_per_depth": ev["loss_per_depth"],
        "accuracy_per_depth": ev["accuracy_per_depth"], "acceptance_per_position": ev["acceptance_per_position"],
        "second_token_acceptance": ev["acceptance_per_position"][0] if ev["acceptance_per_position"] else None,
        "expected_tau": ev["expected_tau"], "eval_windows": len(starts), "eval_tokens": ev["tokens"],
        "bits_per_byte": bpb["bits_per_byte"], "scored_bytes": bpb["bytes"], "scored_tokens": bpb["tokens"],
        "next_line_exact_match": lines["exact_match"], "next_line_cases": lines["cases"], "next_line_hits": lines["hits"],
        "curve": curve,
        "timing": {"tokens_per_s": statistics.median(speeds) if speeds else None, "eval_s": eval_s, "next_line_s": lines_s},
    }


# ---- the report --------------------------------------------------------------------------------------


METRICS = ("val_loss", "bits_per_byte", "second_token_acceptance", "expected_tau", "next_line_exact_match")


def _mean_sd(xs: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def summarize_study(study: Study) -> dict[str, Any]:
    """Per (axis, configuration): the finished seeds' results, the mean and spread of each metric,
    and the difference from the plain configuration of the same DATA_DIR."""
    plan, chosen = study.plan()
    rows = []
    for axis in study.axes:
        for c in study.configs:
            results = [r for spec, axes in plan if spec.config == c and axis in axes and (r := study.result(spec))]
            if not results:
                rows.append({"axis": axis, "config": c.name, "seeds": 0})
                continue
            row: dict[str, Any] = {"axis": axis, "config": c.name, "heads": c.heads, "weights": c.describe(), "data": c.data,
                                   "steps": results[0]["steps"], "tokens": results[0]["tokens"], "flops": results[0]["flops"],
                                   "seeds": len(results), "seed_list": [r["seed"] for r in results]}
            for m in METRICS:
                vals = [r[m] for r in results if r[m] is not None]
                row[m], row[m + "_sd"] = _mean_sd(vals) if vals else (None, None)
            depth = len(results[0]["accuracy_per_depth"])
            row["accuracy_per_depth"] = [statistics.fmean(r["accuracy_per_depth"][k] for r in results) for k in range(depth)]
            speeds = [r["timing"]["tokens_per_s"] for r in results if r["timing"]["tokens_per_s"]]
            row["tokens_per_s"] = statistics.fmean(speeds) if speeds else None
            rows.append(row)
    for row in rows:
        c = next(c for c in study.configs if c.name == row["config"])
        base = next((r for r in rows if r["axis"] == row["axis"] and r.get("seeds") and r.get("data") == c.data
                     and next(x for x in study.configs if x.name == r["config"]).plain), None)
        if row.get("seeds") and base:
            row["val_loss_vs_plain"] = row["val_loss"] - base["val_loss"]
            row["bits_per_byte_vs_plain"] = row["bits_per_byte"] - base["bits_per_byte"]
    runs = [{"folder": spec.folder, "axes": list(axes), "result": study.result(spec)} for spec, axes in plan]
    return {"rows": rows, "runs": runs, "more_seeds_for": chosen,
            "flops_per_token": study.flops, "plain_flops_per_token": study.plain_flops,
            "complete": all(r["result"] is not None for r in runs) and (chosen is not None or study.seeds == 1)}


def _f(x: Any, fmt: str, sd: Any = None) -> str:
    if x is None:
        return "-"
    return format(x, fmt) + (f" ± {format(sd, fmt)}" if sd is not None else "")


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["axis", "config", "heads", "weights", "steps", "seeds", "val loss (main)", "vs plain", "bits/byte",
            "acc per depth", "2nd-token acc.", "tau", "tok/s", "next-line EM"]
    body = []
    for r in summary["rows"]:
        if not r.get("seeds"):
            body.append([r["axis"], r["config"], *["-"] * (len(head) - 2)])
            continue
        body.append([r["axis"], r["config"], r["heads"], r["weights"], str(r["steps"]), str(r["seeds"]),
                     _f(r["val_loss"], ".4f", r["val_loss_sd"]), _f(r.get("val_loss_vs_plain"), "+.4f"),
                     _f(r["bits_per_byte"], ".4f", r["bits_per_byte_sd"]),
                     " ".join(f"{a:.3f}" for a in r["accuracy_per_depth"]), _f(r["second_token_acceptance"], ".3f"),
                     _f(r["expected_tau"], ".3f"), _f(r["tokens_per_s"], ",.0f"),
                     _f(r["next_line_exact_match"], ".3f", r["next_line_exact_match_sd"])])
    return head, body


def format_table(summary: dict[str, Any]) -> str:
    head, body = table_rows(summary)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [head, *body])


def markdown_table(summary: dict[str, Any]) -> str:
    head, body = table_rows(summary)
    return "\n".join("| " + " | ".join(row) + " |" for row in [head, ["---"] * len(head), *body])


def plot_curves(study: Study, summary: dict[str, Any], path: Path) -> None:
    """Main-head validation loss against tokens (equal tokens) or FLOPs (equal compute): one panel
    per axis and DATA_DIR, one line per configuration (mean over seeds), min-max of seeds as a band."""
    from multitoken.io.outdir import atomic_write
    from multitoken.viz import pyplot

    plt = pyplot(path.name)
    if plt is None:
        return

    groups = [k for k in DATA_KEYS if any(c.data == k for c in study.configs)]
    fig, axs = plt.subplots(len(groups), len(study.axes), figsize=(6 * len(study.axes), 4 * len(groups)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, group in enumerate(groups):
        for j, axis in enumerate(study.axes):
            ax = axs[i][j]
            for n, c in enumerate(x for x in study.configs if x.data == group):
                curves = [r["result"]["curve"] for r in summary["runs"] if r["result"] and axis in r["axes"]
                          and r["result"]["config"]["name"] == c.name]
                if not curves:
                    continue
                steps = sorted(set.intersection(*(set(s for s, _, _ in cv) for cv in curves)))
                by = [{s: (t, l) for s, t, l in cv} for cv in curves]
                scale = study.flops[c.name] if axis == "compute" else 1.0
                xs = [by[0][s][0] * scale for s in steps]
                ys = [[b[s][1] for b in by] for s in steps]
                color = colors[n % len(colors)]
                ax.plot(xs, [statistics.fmean(y) for y in ys], "-o", color=color, markersize=2.5, linewidth=1.2,
                        label=f"{c.name} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
                if len(curves) > 1:
                    ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.2, linewidth=0)
            ax.set(xlabel="training FLOPs" if axis == "compute" else "training tokens",
                   ylabel="main-head val loss (nats/token)", title=f"equal {axis}, {group} data")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(study: Study, argv: list[str]) -> dict[str, Any]:
    import torch

    summary = summarize_study(study)
    data = {"command": "multitoken " + " ".join(argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
                        "torch": torch.__version__, "python": platform.python_version()},
            "configs": [dataclasses.asdict(c) for c in study.configs], "data": {k: str(v) for k, v in study.data.items()},
            "train": study.base, "steps": study.steps, "seeds": study.seeds, "axes": list(study.axes),
            "equal_compute": "steps_c = max(1, round(steps * F_plain / F_c)), F = bench.train.train_flops(...)['total'] per token",
            "train_tokens": {k: m["splits"]["train"]["tokens"] for k, m in study.meta.items()},
            **summary}
    outdir.write_json(study.out / "ablate.json", data)
    status = "complete" if summary["complete"] else "INCOMPLETE (run the same command again to continue)"
    md = (f"# multitoken ablate\n\n`{data['command']}`\n\n{data['machine']['device']}, {data['date']}; {status}.\n\n"
          f"Equal compute: {data['equal_compute']}.\n\n{markdown_table(summary)}\n")
    outdir.write_text(study.out / "ablate.md", md)
    plot_curves(study, summary, study.out / "curves.png")
    return data


# ---- CLI -------------------------------------------------------------------------------------------


def build_study(args: Any) -> Study:
    """The `Study` the command line asks for; one-line errors for everything wrong, before any work."""
    from multitoken.training.trainer import load_toml, resolve_config

    specs = (suite(args.suite) if args.suite else []) + (args.configs or [])
    if not specs:
        raise UserError("no configurations: give --suite head-families or --configs SPEC ...")
    configs = [parse_config(s) for s in specs]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise UserError(f"--configs: the name {next(n for n in names if names.count(n) > 1)!r} is used twice: name each configuration once")
    axes = tuple(a.strip() for a in args.axes.split(",") if a.strip())
    if not axes or any(a not in AXES for a in axes) or len(set(axes)) != len(axes):
        raise UserError(f"--axes {args.axes!r}: choose tokens, compute or tokens,compute")
    data = {"main": Path(args.data)}
    if any(c.data == "bytes" for c in configs):
        if not args.byte_data:
            raise UserError("configurations with data=bytes need --byte-data DATA_DIR (prepare one with --tokenizer bytes)")
        data["bytes"] = Path(args.byte_data)
    given = load_toml(args.train_config) if args.train_config else {}
    bad = sorted(set(given) & set(PER_RUN_FIELDS))
    if bad:
        raise UserError(f"--train-config sets {', '.join(bad)}: the study sets these per run; remove them from the file")
    cli = {"preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len, "eval_every": args.eval_every}
    if args.device:
        cli["device"] = args.device
    cfg = resolve_config({**given, **cli})
    from multitoken.training.parallel import resolve_device

    resolve_device(cfg.device)  # a typo or a missing GPU: one line now
    base = {k: v for k, v in cfg.to_dict().items() if k not in PER_RUN_FIELDS + ("save_every", "keep_checkpoints")}
    base["betas"] = list(base["betas"])
    for c in configs:  # a head spec that does not fit the preset (parallel:7 on 4 layers) fails now, not after hours
        flops_per_token(c, args.preset, 257, args.seq_len)
    out = Path(args.out)
    outdir.check(out, "ablate")
    say = (lambda m: None) if args.quiet else log.info
    study = Study(configs, data, out, base, args.steps, args.seeds, axes, args.eval_windows, args.line_cases, args.chunk_steps,
                  args.keep_weights, say)
    return study
