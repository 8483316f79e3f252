"""What a study is: head configurations (`Variant`), named suites (the phases of issue 24) and the
typed `StudyConfig` that `multitoken ablate` builds from its command line.

A suite is a list of `Group`s: configurations trained at some seeds on some axes. An entry of a
group is a configuration spec (``[NAME=]HEADS[/w=WEIGHTS][/lambda=SCHEDULE][/data=main|bytes]``),
the name of a configuration an earlier group defined, or a pick, ``best:K[:FAMILY]``: the K
configurations on the main DATA_DIR (of head family FAMILY when given) whose seed-0 main-head
bits per byte at equal tokens improve most on the plain run's, among the finished runs of the
same settings, this study's and those under ``--results`` (study.py resolves it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitoken.errors import UserError

AXES = ("tokens", "compute")
DATA_KEYS = ("main", "bytes")
# TrainConfig fields a configuration or the study sets per run; refused in --train-config.
PER_RUN_FIELDS = ("heads", "loss_weights", "mtp_lambda", "seed", "steps", "init", "freeze_backbone", "distill")
PICK = "best:"


@dataclass(frozen=True)
class Variant:
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

    @property
    def family(self) -> str:
        """The head family ('none' for plain)."""
        return self.heads.partition(":")[0]

    def describe(self) -> str:
        """The loss weights as the tables write them."""
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

    def content(self) -> dict[str, Any]:
        """What the run trains (the name left out: a configuration is the same run under any label)."""
        return {"heads": self.heads, "weights": self.weights, "mtp_lambda": self.mtp_lambda, "data": self.data}


def parse_variant(text: str) -> Variant:
    """``[NAME=]HEADS[/w=WEIGHTS][/lambda=SCHEDULE][/data=main|bytes]``, e.g.
    ``seq1-decay=sequential:1/lambda=0.3,0.1@67%``; one-line `UserError` when malformed."""
    from multitoken.checks import Floats
    from multitoken.config import LOSS_WEIGHT_RANGE, HeadsConfig, parse_schedule, parse_weights

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
            _, _, step = part.strip().partition("@")
            if step.endswith("%"):
                Floats(0, 100).parse(step[:-1])
        parse_schedule(Variant("x", head, mtp_lambda=lam).lambda_for(1000))
    except (UserError, ValueError) as e:
        raise UserError(f"--configs {text!r}: lambda {lam!r}: {e}") from None
    if not all(c.isalnum() or c in "-_." for c in kw["name"]):
        raise UserError(f"--configs {text!r}: name {kw['name']!r} must be letters, digits, '-', '_' or '.' (it names a folder)")
    return Variant(heads=head, **kw)


@dataclass(frozen=True)
class Pick:
    """``best:K[:FAMILY]``: configurations chosen from finished runs (see the module docstring)."""

    k: int
    """How many configurations."""
    family: str | None = None
    """Only this head family (parallel, sequential, medusa), or any."""

    @property
    def text(self) -> str:
        return f"{PICK}{self.k}" + (f":{self.family}" if self.family else "")


def parse_pick(text: str) -> Pick:
    from multitoken.model.heads.registry import kinds

    k, _, family = text[len(PICK):].partition(":")
    if not k.isascii() or not k.isdigit() or int(k) < 1 or (family and family not in kinds()):
        raise UserError(f"{text!r}: expected best:K[:FAMILY], K >= 1, FAMILY one of {', '.join(kinds())}")
    return Pick(int(k), family or None)


@dataclass(frozen=True)
class Group:
    """Runs of a suite: these entries (specs, earlier names or picks) at these seeds on these axes."""

    entries: tuple[str, ...]
    """Configuration specs, names of configurations an earlier group defined, or picks."""
    seeds: tuple[int, ...] = (0,)
    """The seeds each entry is trained at."""
    axes: tuple[str, ...] = ("tokens",)
    """equal tokens, equal compute or both."""


@dataclass(frozen=True)
class Suite:
    """A named study: its groups of runs and, optionally, the model preset it is about."""

    summary: str
    """One line for --help."""
    groups: tuple[Group, ...] = ()
    """The runs, in the order they are trained."""
    preset: str | None = None
    """The preset used when the command line gives none."""
    shape: tuple[int, int, int] | None = None
    """(steps, batch_size, seq_len) used where the command line gives none."""
    grid: tuple[str, ...] = ()
    """Instead of groups: these configurations at seed 0 on --axes, then plain and best:2 at seeds
    1 .. --seeds-1 (the form of `--configs`)."""


PLAIN, SEQ1 = "plain=none", "seq1=sequential:1/lambda=0.3"
PROTOCOL = (1000, 32, 1024)  # steps of batch x seq_len: 32.8M tokens a run (docs/results.md)
BYTES = ("bytes-plain=none/data=bytes", "bytes-par8=parallel:7/w=equal/data=bytes")
PARALLEL_WEIGHTS = ("par4-equal=parallel:3/w=equal", "par4-geo=parallel:3/w=geometric:0.5",
                    "par4-lambda=parallel:3/w=lambda/lambda=0.3", "par2-geo=parallel:1/w=geometric:0.5")
SEQUENTIAL_MORE = ("seq1-decay=sequential:1/lambda=0.3,0.1@67%", "seq3=sequential:3/lambda=0.3")

# Issue 24's phases, in order, at the base preset (100M) but the last: each one is whole runs whose
# results later phases reuse through --results (plain seed 0 is in every table, trained once).
SUITES: dict[str, Suite] = {
    "phase1-seq-vs-plain": Suite(
        "plain and sequential:1 (lambda 0.3), seeds 0-2, equal tokens: DeepSeek-V3's question with a spread",
        (Group((PLAIN, SEQ1), seeds=(0, 1, 2)),), preset="base", shape=PROTOCOL),
    "phase2-parallel-weights": Suite(
        "parallel:3 with equal, geometric:0.5 and lambda-0.3 weights; parallel:1 geometric:0.5; "
        "sequential:1 lambda 0.3 -> 0.1 at 67%; sequential:3; seed 0, equal tokens",
        (Group((PLAIN, *PARALLEL_WEIGHTS, *SEQUENTIAL_MORE)),), preset="base", shape=PROTOCOL),
    "phase3-equal-compute-and-bytes": Suite(
        "the best parallel and the best sequential configuration at equal compute; plain against "
        "parallel:7 on bytes at equal tokens; seed 0",
        (Group((PLAIN, "best:1:parallel", "best:1:sequential"), axes=("compute",)), Group(BYTES)),
        preset="base", shape=PROTOCOL),
    "phase4-seeds": Suite(
        "seeds 1 and 2 of the best two configurations (with plain's three seeds), equal tokens",
        (Group((PLAIN, "best:2"), seeds=(0, 1, 2)),), preset="base", shape=PROTOCOL),
    "phase5-large": Suite(
        "the large preset (317M): plain against sequential:1 (lambda 0.3), seeds 0-1, equal tokens",
        (Group((PLAIN, SEQ1), seeds=(0, 1)),), preset="large", shape=PROTOCOL),
    "grid": Suite(
        "issue 14's twelve configurations at seed 0 on both axes, then plain and the best two at more seeds",
        grid=(PLAIN, "par2-equal=parallel:1/w=equal", PARALLEL_WEIGHTS[3], "par2-lambda=parallel:1/w=lambda/lambda=0.3",
              *PARALLEL_WEIGHTS[:3], SEQ1, *SEQUENTIAL_MORE, *BYTES)),
}
SUITE_ALIASES = {"issue14": "grid"}
"""Old names that still work."""


def suite(name: str) -> Suite:
    """The suite called `name` (or an alias of it)."""
    name = SUITE_ALIASES.get(name, name)
    if name not in SUITES:
        raise UserError(f"--suite {name!r}: choose one of {', '.join([*SUITES, *SUITE_ALIASES])}")
    return SUITES[name]


@dataclass
class StudyConfig:
    """Everything `multitoken ablate` is asked for (cli/ablate.py builds it from the command line)."""

    data: Path
    """The DATA_DIR of every configuration with data=main."""
    out: Path
    """The study's folder: runs/ (train RUN_DIRs, checkpoints while unfinished), ablate.json, ablate.md, curves.png."""
    byte_data: Path | None = None
    """A DATA_DIR prepared with --tokenizer bytes, for configurations with data=bytes."""
    results: Path | None = None
    """A folder of finished runs' ablate_result.json (e.g. bench/results/study): a run found there with
    the same settings, seed and data fingerprint is not trained again; each run finished here is
    added to it, and the table is written beside them."""
    suite: str | None = None
    """A named list of runs (SUITES: the phases of issue 24, or grid)."""
    configs: tuple[str, ...] = ()
    """Configurations [NAME=]HEADS[/w=WEIGHTS][/lambda=SCHEDULE][/data=main|bytes] (lambda steps may be
    N% of the run), trained as a grid: seed 0 on every axis, then plain and the best two at more seeds."""
    preset: str | None = None
    """Model preset of every run (default: the suite's, else tiny)."""
    steps: int | None = None
    """Steps at equal tokens (default: the suite's, else 1000)."""
    batch_size: int | None = None
    """Windows per optimizer step (default: the suite's, else 16)."""
    seq_len: int | None = None
    """Tokens per window (default: the suite's, else 128)."""
    seeds: int | None = None
    """Grid only: seeds for plain and the best two configurations (default 3)."""
    axes: tuple[str, ...] | None = None
    """Grid only: tokens, compute or both (default both)."""
    eval_every: int = 100
    """Validation points of the learning curves."""
    eval_windows: int = 0
    """Validation windows measured per run, evenly spaced (0: all)."""
    line_cases: int = 200
    """Next-line exact-match cases per run."""
    gen_prompts: int = 32
    """Held-out prompts decoded greedily with chain drafts per run (second-token acceptance in generation)."""
    gen_tokens: int = 128
    """New tokens per generation prompt (prompts are seq_len // 2 tokens)."""
    chunk_steps: int = 250
    """Steps between checkpoints."""
    train_config: Path | None = None
    """TOML of train settings every run shares (lr, warmup, dtype, compile, ...)."""
    device: str | None = None
    """auto, cpu, cuda or cuda:N (default: the train config's, auto)."""
    keep_weights: bool = True
    """Keep each finished run's model.safetensors (checkpoints are always deleted)."""
    quiet: bool = False
    """No progress messages."""
    command: str = ""
    """The command line, recorded in ablate.json."""
