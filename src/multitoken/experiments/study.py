"""A study: head configurations trained on the same data with the same settings, its plan of runs,
and the loop that trains and measures them, resumably and within a time budget.

Two axes:

- **equal tokens**: every configuration trains ``steps`` steps of batch x seq_len tokens;
- **equal compute**: a configuration whose training costs F_c FLOPs per token trains
  ``max(1, round(steps x F_plain / F_c))`` steps, F_plain being a plain model's (no heads) on
  the same data, so every run spends the plain run's FLOPs. F is `training.flops.train_flops`
  ("total": 6 x the weights of every matrix multiplied, one V x d projection per depth
  included, + 6 x d x seq_len per block for causal attention, + the recomputed heads' forward).
  Each run gets its own full learning-rate schedule over its own step count.

The plan (`Study.plan`) walks the suite's groups (config.py): for each group, seed, entry and
axis one run; a run that two axes or two groups share (plain, or a configuration whose
equal-compute step count equals ``steps``) is trained once. A pick (``best:K[:FAMILY]``) is
resolved once the study's own seed-0 equal-token runs it chooses from are finished.

Resumable: each run is an ordinary train RUN_DIR under OUT/runs/PRESET/NAME/seed{S}-steps{N},
trained in chunks with ``train(..., resume=True, stop_after=...)``; a run whose
``ablate_result.json`` exists in OUT, or whose result ``--results`` holds (results.py), is
finished and skipped; any other one continues from its checkpoint. ``max_minutes`` stops an
invocation before a chunk that would not fit (chunks shrink to fit, timed on the previous
chunk); ``max_steps`` caps the optimizer steps of one invocation (tests use it to cut a run
short). Run again with the same arguments to continue.
"""

from __future__ import annotations

import logging
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from multitoken.errors import UserError
from multitoken.experiments.config import (AXES, PER_RUN_FIELDS, PICK, Group, Pick, StudyConfig, Variant, parse_pick,
                                           parse_variant, suite)
from multitoken.experiments.results import RESULT_FILE, ResultStore, identity
from multitoken.io import outdir

log = logging.getLogger(__name__)

GRID_SEEDS, GRID_AXES = 3, ("tokens", "compute")


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study: a configuration, a seed and a step count."""

    variant: Variant
    seed: int
    steps: int


@dataclass
class Plan:
    """The runs in order, each with the axes it serves, and what each pick chose (None: not yet)."""

    runs: list[tuple[RunSpec, tuple[str, ...]]]
    picks: dict[str, list[str] | None]

    @property
    def resolved(self) -> bool:
        return all(p is not None for p in self.picks.values())

    def variants(self) -> list[Variant]:
        """The configurations of the planned runs, in order of first appearance."""
        return list(dict.fromkeys(spec.variant for spec, _ in self.runs))


def flops_per_token(variant: Variant, preset: str, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token of `variant` (training.flops.train_flops "total"), built on the meta device."""
    import torch

    from multitoken.config import HeadsConfig, ModelConfig
    from multitoken.model import Transformer
    from multitoken.training.flops import train_flops

    cfg = ModelConfig.from_preset(preset, heads=HeadsConfig.parse(variant.heads), vocab_size=vocab_size,
                                  max_seq_len=max(seq_len, ModelConfig.from_preset(preset).max_seq_len))
    with torch.device("meta"):
        model = Transformer(cfg)
    return train_flops(model, seq_len)["total"]


def equal_compute_steps(steps: int, flops: float, plain_flops: float) -> int:
    """Steps at which a configuration of `flops` per token spends what `steps` plain steps spend."""
    return max(1, round(steps * plain_flops / flops))


@dataclass
class Study:
    """Everything a study's runs share, where they go, and its plan."""

    cfg: StudyConfig
    preset: str
    groups: list[tuple[list[Variant | Pick], tuple[int, ...], tuple[str, ...], bool]]
    """(entries, seeds, axes, picks required): picks of a phase must find candidates, the grid's may not."""
    data: dict[str, Path]
    base: dict[str, Any]
    """TrainConfig fields every run shares (preset, batch_size, seq_len, lr, device, ...)."""
    store: ResultStore | None = None
    say: Callable[[str], None] = print
    _flops: dict[tuple, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from multitoken.data.prepare import data_sha256, load_meta

        self.meta = {key: load_meta(path) for key, path in self.data.items()}
        self.fingerprints = {key: data_sha256(path) for key, path in self.data.items()}
        self.axes = tuple(a for a in AXES if any(a in g[2] for g in self.groups))
        # The configurations this study itself trains at seed 0 and equal tokens: picks wait for them.
        self.first = list(dict.fromkeys(e for entries, seeds, axes, _ in self.groups for e in entries
                                        if isinstance(e, Variant) and 0 in seeds and ("tokens" in axes or e.plain)))
        self.measure = {"eval_windows": self.cfg.eval_windows, "line_cases": self.cfg.line_cases,
                        "gen_prompts": self.cfg.gen_prompts, "gen_tokens": self.cfg.gen_tokens}

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def flops(self, v: Variant) -> float:
        key = (v.heads, v.data)
        if key not in self._flops:
            self._flops[key] = flops_per_token(v, self.preset, self.meta[v.data]["vocab_size"], self.base["seq_len"])
        return self._flops[key]

    def plain_flops(self, data: str) -> float:
        return self.flops(Variant("plain", "none", data=data))

    def steps_for(self, v: Variant, axis: str) -> int:
        steps = self.cfg.steps
        return steps if axis == "tokens" or v.plain else equal_compute_steps(steps, self.flops(v), self.plain_flops(v.data))

    def folder(self, spec: RunSpec) -> str:
        return f"runs/{self.preset}/{spec.variant.name}/seed{spec.seed}-steps{spec.steps}"

    def identity(self, spec: RunSpec) -> dict[str, Any]:
        return identity(spec.variant.content(), spec.seed, spec.steps, self.base, self.measure)

    def result(self, spec: RunSpec) -> dict[str, Any] | None:
        """The run's result: OUT's, else the one --results holds, else None (not finished)."""
        import json

        path = self.out / self.folder(spec) / RESULT_FILE
        if path.is_file():
            result = json.loads(path.read_text())
            if result.get("identity") != self.identity(spec):
                raise UserError(f"{path} holds another run than {spec.variant.name} seed {spec.seed} of this study (its settings "
                                "differ): give a new --out, or the arguments that made it")
            return result
        return self.store.find(self.identity(spec)) if self.store else None

    def plan(self) -> Plan:
        runs: dict[RunSpec, list[str]] = {}
        picks: dict[str, list[str] | None] = {}
        for entries, seeds, axes, required in self.groups:
            for seed in seeds:
                for e in entries:
                    chosen = [e] if isinstance(e, Variant) else self.pick(e, required, picks)
                    for v in chosen or []:
                        for axis in axes:
                            runs.setdefault(RunSpec(v, seed, self.steps_for(v, axis)), []).append(axis)
        return Plan([(spec, tuple(axes)) for spec, axes in runs.items()], picks)

    def pick(self, p: Pick, required: bool, picks: dict[str, list[str] | None]) -> list[Variant] | None:
        """The configurations `p` chooses (config.py), or None while own runs it waits for are unfinished."""
        steps = self.cfg.steps
        plain = next((v for v in self.first if v.content() == Variant("plain", "none").content()), Variant("plain", "none"))

        def fits(v: Variant) -> bool:
            return v.data == "main" and not v.plain and (p.family is None or v.family == p.family)

        own = [v for v in self.first if fits(v)]
        stored = []
        for r in self.store.results() if self.store else []:
            c = r["config"]
            v = Variant(c["name"], c["heads"], c["weights"], c["mtp_lambda"], c["data"])
            new = all(v.content() != x.content() for x in own + stored)
            if fits(v) and new and r["identity"] == self.identity(RunSpec(v, 0, steps)):
                stored.append(v)
        plain_known = plain in self.first or self.result(RunSpec(plain, 0, steps)) is not None
        if required and (not (own or stored) or not plain_known):
            what = f"a finished {p.family} configuration" if p.family else "finished configurations"
            raise UserError(f"{p.text} chooses among {what} and plain at seed 0, equal tokens, these settings and data: "
                            f"{'no plain run' if (own or stored) else 'none'} found in --out or --results; "
                            "run the earlier phases first")
        if any(self.result(RunSpec(v, 0, steps)) is None for v in [*own, *([plain] if plain in self.first else [])]):
            picks[p.text] = None
            return None
        base = self.result(RunSpec(plain, 0, steps))
        if base is None:
            picks[p.text] = []
            return []
        gains = sorted((self.result(RunSpec(v, 0, steps))["bits_per_byte"] - base["bits_per_byte"], i, v)
                       for i, v in enumerate(own + stored))
        chosen = [v for _, _, v in gains[: p.k]]
        picks[p.text] = [v.name for v in chosen]
        return chosen

    def train_config(self, spec: RunSpec):
        from multitoken.config import TrainConfig

        v = spec.variant
        weights = v.weights if v.weights is None or v.weights[:1].isalpha() else [float(w) for w in v.weights.split(",")]
        return TrainConfig(**{**self.base, "heads": v.heads, "loss_weights": weights, "mtp_lambda": v.lambda_for(spec.steps),
                              "seed": spec.seed, "steps": spec.steps, "save_every": 0, "keep_checkpoints": 1})


# ---- building a study from its config ----------------------------------------------------------------


def _groups(cfg: StudyConfig) -> tuple[Any, list[tuple[list[Variant | Pick], tuple[int, ...], tuple[str, ...], bool]]]:
    """The suite's or --configs' groups with every entry parsed (a name refers to an earlier spec)."""
    s = suite(cfg.suite) if cfg.suite else None
    if s is not None and s.groups:
        for name, given in (("--configs", cfg.configs), ("--seeds", cfg.seeds), ("--axes", cfg.axes)):
            if given:
                raise UserError(f"{name}: --suite {cfg.suite} sets its own configurations, seeds and axes; drop {name}")
    grid = [*(s.grid if s else ()), *cfg.configs]
    if s is None and not grid:
        raise UserError("no configurations: give --suite phase1-seq-vs-plain (see --help for the phases) or --configs SPEC ...")
    axes = cfg.axes or GRID_AXES
    if not axes or any(a not in AXES for a in axes) or len(set(axes)) != len(axes):
        raise UserError(f"--axes {','.join(axes)!r}: choose tokens, compute or tokens,compute")
    if grid:
        seeds = cfg.seeds or GRID_SEEDS
        variants = [parse_variant(t) for t in grid]
        plains = [v.name for v in variants if v.plain]
        more = [Group(tuple(plains) + ((PICK + "2",) if len(plains) < len(variants) else ()), tuple(range(1, seeds)), axes)]
        groups = [(Group(tuple(grid), (0,), axes), True), *((g, False) for g in more if g.seeds)]
    else:
        groups = [(g, True) for g in s.groups]  # type: ignore[union-attr]
    named: dict[str, Variant] = {}
    out = []
    for g, required in groups:
        entries: list[Variant | Pick] = []
        for text in g.entries:
            if text.startswith(PICK):
                entries.append(parse_pick(text))
                continue
            v = named.get(text) or parse_variant(text)
            if named.get(v.name, v) != v:
                raise UserError(f"--configs: the name {v.name!r} is used twice: name each configuration once")
            named[v.name] = v
            entries.append(v)
        out.append((entries, g.seeds, g.axes, required))
    return s, out


def build_study(cfg: StudyConfig) -> Study:
    """The `Study` `cfg` asks for; one-line errors for everything wrong, before any work."""
    from multitoken.data.prepare import load_meta
    from multitoken.training.parallel import resolve_device
    from multitoken.training.trainer import load_toml, resolve_config

    s, groups = _groups(cfg)
    preset = cfg.preset or (s and s.preset) or "tiny"
    shape = (s and s.shape) or (1000, 16, 128)
    cfg = dataclasses.replace(cfg, steps=cfg.steps or shape[0], batch_size=cfg.batch_size or shape[1],
                              seq_len=cfg.seq_len or shape[2])
    variants = list(dict.fromkeys(e for g in groups for e in g[0] if isinstance(e, Variant)))
    data = {"main": Path(cfg.data)}
    if any(v.data == "bytes" for v in variants):
        if not cfg.byte_data:
            raise UserError("configurations with data=bytes need --byte-data DATA_DIR (prepare one with --tokenizer bytes)")
        data["bytes"] = Path(cfg.byte_data)
    for path in data.values():
        load_meta(path)  # a missing or unfinished DATA_DIR: one line now
    given = load_toml(cfg.train_config) if cfg.train_config else {}
    bad = sorted(set(given) & set(PER_RUN_FIELDS))
    if bad:
        raise UserError(f"--train-config sets {', '.join(bad)}: the study sets these per run; remove them from the file")
    cli = {"preset": preset, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "eval_every": cfg.eval_every}
    if cfg.device:
        cli["device"] = cfg.device
    train = resolve_config({**given, **cli})
    resolve_device(train.device)  # a typo or a missing GPU: one line now
    base = {k: v for k, v in train.to_dict().items() if k not in PER_RUN_FIELDS + ("save_every", "keep_checkpoints")}
    base["betas"] = list(base["betas"])
    for v in variants:  # a head spec that does not fit the preset (parallel:7 on 4 layers) fails now, not after hours
        flops_per_token(v, preset, 257, cfg.seq_len)
    outdir.check(Path(cfg.out), "ablate")
    say = (lambda m: None) if cfg.quiet else log.info
    study = Study(cfg, preset, groups, data, base, say=say)
    if cfg.results:
        study.store = ResultStore(Path(cfg.results), study.fingerprints)
    study.plan()  # a pick with nothing to choose from: one line now
    return study


# ---- training the plan ---------------------------------------------------------------------------------


def checkpoint_step(run_dir: Path) -> int:
    from multitoken.io.checkpoint import latest_checkpoint

    folder = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    return int(folder.name.split("_")[1]) if folder is not None else 0


def run_study(study: Study, max_minutes: float | None = None, max_steps: int | None = None,
              whole_runs: bool = False) -> dict[str, Any]:
    """Train and measure every planned run that is not finished, within the budgets.

    With `whole_runs`, a run not yet begun is not begun when, at the speed measured so far this
    call, it would not finish within `max_minutes` (on a machine whose disk does not survive, a
    half-trained run is lost).

    Returns:
        {"complete": all planned runs finished and every pick made, "trained_steps": optimizer
        steps this call, "trained_runs": folders finished this call}.
    """
    from multitoken.experiments.measure import measure_run
    from multitoken.training.trainer import train

    t0 = time.perf_counter()
    budget_s = max_minutes * 60 if max_minutes else math.inf
    steps_left = max_steps if max_steps is not None else math.inf
    sec_per_flop: float | None = None  # measured training speed, carried from run to run
    # Reserved before each chunk for the run's final measurement: the longest one so far, and
    # until one is timed, a guess: a tenth of the budget, at most a minute.
    measure_s = min(60.0, budget_s * 0.1) if max_minutes else 0.0
    trained, finished = 0, []

    def stop(msg: str) -> dict[str, Any]:
        study.say(msg + ": run the same command again to continue")
        return {"complete": False, "trained_steps": trained, "trained_runs": finished}

    while True:
        plan = study.plan()
        todo = [(spec, axes) for spec, axes in plan.runs if study.result(spec) is None]
        if not todo:
            return {"complete": plan.resolved, "trained_steps": trained, "trained_runs": finished}
        spec, axes = todo[0]
        folder = study.folder(spec)
        run_dir = study.out / folder
        cfg = study.train_config(spec)
        flops_per_step = study.flops(spec.variant) * cfg.batch_size * cfg.seq_len
        step = checkpoint_step(run_dir)
        need_s = sec_per_flop * flops_per_step * spec.steps + measure_s if sec_per_flop is not None else 0.0
        if whole_runs and step == 0 and time.perf_counter() - t0 + need_s > budget_s:
            return stop(f"{folder} would not finish within the budget (about {need_s / 60:.1f} min at this call's speed)")
        while step < spec.steps:
            left_s = budget_s - (time.perf_counter() - t0) - measure_s
            n = min(study.cfg.chunk_steps, spec.steps - step, steps_left)
            if sec_per_flop is not None and math.isfinite(left_s):
                n = min(n, int(left_s * 0.95 / (sec_per_flop * flops_per_step)))
            elif math.isfinite(left_s):
                n = min(n, 10)  # no speed known yet: a short first chunk measures it
            if n < 1 or left_s <= 0:
                return stop(f"budget reached at {folder} step {step}/{spec.steps}")
            study.say(f"{folder} ({', '.join(axes)}): steps {step} -> {step + n} of {spec.steps}")
            t = time.perf_counter()
            train(cfg, study.data[spec.variant.data], run_dir, resume=True, progress=False, stop_after=step + n)
            sec_per_flop = (time.perf_counter() - t) / (n * flops_per_step)
            step += n
            trained += n
            steps_left -= n
        if budget_s - (time.perf_counter() - t0) < measure_s:
            return stop(f"budget reached before measuring {folder}")
        t = time.perf_counter()
        result = measure_run(study, spec, run_dir)
        measure_s = max(measure_s, time.perf_counter() - t)
        if study.store is not None:
            study.store.save(folder, result)  # first: a run is kept once it is safe outside OUT
        outdir.write_json(run_dir / RESULT_FILE, result)  # marks the run finished
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # resume state of a finished run: GBs at base size
        if not study.cfg.keep_weights:
            (run_dir / "model.safetensors").unlink(missing_ok=True)
        finished.append(folder)
