"""``multitoken ablate``: head configurations trained side by side at equal tokens and equal
compute. The command line becomes an `experiments.config.StudyConfig` (help text from its field
docstrings); the study itself is multitoken.experiments."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from multitoken.cli.options import field_docs, floats, ints, path_arg, text_arg
from multitoken.experiments.config import SUITE_ALIASES, SUITES, StudyConfig
from multitoken.experiments.report import OUT_FILES, format_table, write_report
from multitoken.experiments.study import build_study, run_study
from multitoken.io import outdir


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``multitoken ablate``."""
    phases = "; ".join(f"{name}: {s.summary}" for name, s in SUITES.items())
    p = subparsers.add_parser("ablate", help="train head configurations side by side at equal tokens and equal compute",
                              description="Train a suite of head configurations on the same data, at equal tokens and at "
                              "equal compute, over several seeds; resumable (run the same command again to continue), and "
                              "with --results, runs already there are not trained again. Writes OUT/ablate.json, "
                              f"ablate.md and curves.png. Suites: {phases}.")
    docs = field_docs(StudyConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(StudyConfig)}

    def add(name: str, metavar: str | None = None, show_default: bool = True, **kw) -> None:
        default = defaults.get(name)
        shown = show_default and default is not None and default is not dataclasses.MISSING
        help_text = docs[name] + (f" (default {default})" if shown else "")
        p.add_argument("--" + name.replace("_", "-"), dest=name, help=help_text.replace("%", "%%"),
                       **({"metavar": metavar} if metavar else {}), **kw)

    add("data", "DATA_DIR", required=True, type=path_arg)
    add("byte_data", "DATA_DIR", type=path_arg)
    add("out", required=True, type=path_arg)
    add("results", "DIR", type=path_arg)
    add("suite", choices=sorted([*SUITES, *SUITE_ALIASES]))
    add("configs", "SPEC", nargs="+", default=(), type=text_arg, show_default=False)
    add("preset", type=text_arg)
    add("steps", type=ints(1))
    add("batch_size", type=ints(1, 1 << 20))
    add("seq_len", type=ints(2, 1 << 21))
    add("seeds", type=ints(1, 100))
    add("axes", type=_axes)
    add("eval_every", type=ints(1), default=defaults["eval_every"])
    add("eval_windows", type=ints(0), default=defaults["eval_windows"])
    add("line_cases", type=ints(1, 1 << 20), default=defaults["line_cases"])
    add("gen_prompts", type=ints(0, 1 << 20), default=defaults["gen_prompts"])
    add("gen_tokens", type=ints(1, 1 << 20), default=defaults["gen_tokens"])
    add("chunk_steps", type=ints(1), default=defaults["chunk_steps"])
    add("train_config", "FILE.toml", type=path_arg)
    add("device", type=text_arg)
    p.add_argument("--no-keep-weights", dest="keep_weights", action="store_false",
                   help="delete each finished run's model.safetensors (checkpoints are always deleted)")
    add("quiet", action="store_true", show_default=False)
    p.add_argument("--max-minutes", type=floats(0, lo_open=True), default=None,
                   help="stop (resumably) before this budget runs out")
    p.add_argument("--max-steps", type=ints(1), default=None, help="train at most this many steps in this invocation")
    p.add_argument("--whole-runs", action="store_true",
                   help="with --max-minutes: do not begin a run that would not finish in time at the speed measured so far")
    p.set_defaults(func=run, out_kind="ablate")


def _axes(text: str) -> tuple[str, ...]:
    """``--axes``: comma-separated names, checked against the suite by `build_study`."""
    axes = tuple(a.strip() for a in text.split(","))
    if not text.strip() or any(a not in ("tokens", "compute") for a in axes) or len(set(axes)) != len(axes):
        raise argparse.ArgumentTypeError(f"{text!r}: choose tokens, compute or tokens,compute")
    return axes


def study_config(args: argparse.Namespace) -> StudyConfig:
    """The `StudyConfig` of parsed ``ablate`` arguments."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(StudyConfig)
             if f.name != "command" and hasattr(args, f.name)}
    for name in ("data", "out", "byte_data", "results", "train_config"):
        if given.get(name) is not None:
            given[name] = Path(given[name])
    given["configs"] = tuple(given.get("configs") or ())
    argv = getattr(args, "argv", sys.argv[1:])
    return StudyConfig(**given, command="multitoken " + " ".join(argv))


def run(args: argparse.Namespace) -> int:
    study = build_study(study_config(args))
    outdir.claim(study.out, "ablate")
    outdir.remove_temporaries(study.out, OUT_FILES)
    status = run_study(study, args.max_minutes, args.max_steps, args.whole_runs)
    data = write_report(study)
    print(format_table(data))
    where = f"{study.out / 'ablate.json'}, ablate.md and curves.png" + (f"; results in {study.store.root}" if study.store else "")
    print(f"{'complete' if data['complete'] else 'not finished: run the same command again to continue'}; "
          f"trained {status['trained_steps']} steps ({len(status['trained_runs'])} runs finished); wrote {where}")
    return 0
