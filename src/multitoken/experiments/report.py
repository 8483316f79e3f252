"""A study's report: per (axis, configuration) the mean and spread of each metric over seeds and the
difference from plain on the same data; OUT/ablate.json (everything), ablate.md (the table) and
curves.png (main-head validation loss against tokens or FLOPs, one line per configuration, the
seeds' min-max as a band). With ``--results`` the same three go beside the stored runs, named
after the suite (``phase1-seq-vs-plain.md``, ...), so a committed folder reads on its own.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from multitoken.experiments.config import DATA_KEYS, SUITE_ALIASES
from multitoken.io import outdir

METRICS = ("val_loss", "bits_per_byte", "second_token_acceptance_teacher_forced", "second_token_acceptance_generation",
           "expected_tau", "next_line_exact_match")
OUT_FILES = ("ablate.json", "ablate.md", "curves.png", outdir.MARKER_FILE)


def _mean_sd(xs: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def summarize_study(study) -> dict[str, Any]:
    """Rows per (axis, configuration) over the finished seeds, every run's result, and what the picks chose."""
    plan = study.plan()
    variants = plan.variants()
    rows = []
    for axis in study.axes:
        for v in variants:
            results = [r for spec, axes in plan.runs if spec.variant == v and axis in axes and (r := study.result(spec))]
            if not any(spec.variant == v and axis in axes for spec, axes in plan.runs):
                continue
            if not results:
                rows.append({"axis": axis, "config": v.name, "seeds": 0})
                continue
            row: dict[str, Any] = {"axis": axis, "config": v.name, "heads": v.heads, "weights": v.describe(), "data": v.data,
                                   "plain": v.plain, "steps": results[0]["steps"], "tokens": results[0]["tokens"],
                                   "flops": results[0]["flops"], "seeds": len(results), "seed_list": [r["seed"] for r in results]}
            for m in METRICS:
                vals = [r[m] for r in results if r.get(m) is not None]
                row[m], row[m + "_sd"] = _mean_sd(vals) if vals else (None, None)
            depth = len(results[0]["accuracy_per_depth"])
            row["accuracy_per_depth"] = [statistics.fmean(r["accuracy_per_depth"][k] for r in results) for k in range(depth)]
            speeds = [r["timing"]["tokens_per_s"] for r in results if r["timing"]["tokens_per_s"]]
            row["tokens_per_s"] = statistics.fmean(speeds) if speeds else None
            rows.append(row)
    for row in rows:
        base = next((r for r in rows if r["axis"] == row["axis"] and r.get("seeds") and r.get("plain")
                     and r["data"] == row.get("data")), None)
        if row.get("seeds") and base:
            row["val_loss_vs_plain"] = row["val_loss"] - base["val_loss"]
            row["bits_per_byte_vs_plain"] = row["bits_per_byte"] - base["bits_per_byte"]
    runs = [{"folder": study.folder(spec), "axes": list(axes), "result": study.result(spec)} for spec, axes in plan.runs]
    return {"rows": rows, "runs": runs, "picks": plan.picks,
            "flops_per_token": {v.name: study.flops(v) for v in variants},
            "plain_flops_per_token": {k: study.plain_flops(k) for k in study.data},
            "complete": all(r["result"] is not None for r in runs) and plan.resolved}


def _f(x: Any, fmt: str, sd: Any = None) -> str:
    if x is None:
        return "-"
    return format(x, fmt) + (f" ± {format(sd, fmt)}" if sd is not None else "")


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["axis", "config", "heads", "weights", "steps", "seeds", "val loss (main)", "vs plain", "bits/byte",
            "acc per depth", "2nd-token acc. (TF)", "2nd-token acc. (gen)", "tau (TF)", "tok/s", "next-line EM"]
    body = []
    for r in summary["rows"]:
        if not r.get("seeds"):
            body.append([r["axis"], r["config"], *["-"] * (len(head) - 2)])
            continue
        body.append([r["axis"], r["config"], r["heads"] + (" (bytes)" if r["data"] == "bytes" else ""), r["weights"],
                     str(r["steps"]), str(r["seeds"]),
                     _f(r["val_loss"], ".4f", r["val_loss_sd"]), _f(r.get("val_loss_vs_plain"), "+.4f"),
                     _f(r["bits_per_byte"], ".4f", r["bits_per_byte_sd"]),
                     " ".join(f"{a:.3f}" for a in r["accuracy_per_depth"]),
                     _f(r["second_token_acceptance_teacher_forced"], ".3f", r["second_token_acceptance_teacher_forced_sd"]),
                     _f(r["second_token_acceptance_generation"], ".3f", r["second_token_acceptance_generation_sd"]),
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


def plot_curves(study, summary: dict[str, Any], path: Path) -> None:
    """Main-head validation loss against tokens (equal tokens) or FLOPs (equal compute): one panel
    per axis and DATA_DIR, one line per configuration (mean over seeds), min-max of seeds as a band."""
    from multitoken.viz import pyplot

    plt = pyplot(path.name)
    if plt is None:
        return
    variants = study.plan().variants()
    groups = [k for k in DATA_KEYS if any(v.data == k for v in variants)]
    fig, axs = plt.subplots(len(groups), len(study.axes), figsize=(6 * len(study.axes), 4 * len(groups)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, group in enumerate(groups):
        for j, axis in enumerate(study.axes):
            ax = axs[i][j]
            for n, v in enumerate(x for x in variants if x.data == group):
                curves = [r["result"]["curve"] for r in summary["runs"] if r["result"] and axis in r["axes"]
                          and r["result"]["identity"]["config"] == v.content()]
                if not curves:
                    continue
                steps = sorted(set.intersection(*(set(s for s, _, _ in cv) for cv in curves)))
                by = [{s: (t, loss) for s, t, loss in cv} for cv in curves]
                scale = study.flops(v) if axis == "compute" else 1.0
                xs = [by[0][s][0] * scale for s in steps]
                ys = [[b[s][1] for b in by] for s in steps]
                color = colors[n % len(colors)]
                ax.plot(xs, [statistics.fmean(y) for y in ys], "-o", color=color, markersize=2.5, linewidth=1.2,
                        label=f"{v.name} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
                if len(curves) > 1:
                    ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.2, linewidth=0)
            ax.set(xlabel="training FLOPs" if axis == "compute" else "training tokens",
                   ylabel="main-head val loss (nats/token)", title=f"equal {axis}, {group} data")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    outdir.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(study) -> dict[str, Any]:
    """Write the report to OUT (and, with --results, beside the stored runs); returns ablate.json's contents."""
    import torch

    summary = summarize_study(study)
    cfg = study.cfg
    data = {"command": cfg.command, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
                        "torch": torch.__version__, "python": platform.python_version()},
            "study": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
            "preset": study.preset, "data": {k: str(v) for k, v in study.data.items()},
            "data_sha256": study.fingerprints, "train": study.base, "axes": list(study.axes),
            "equal_compute": "steps_c = max(1, round(steps * F_plain / F_c)), "
                             "F = training.flops.train_flops(...)['total'] per token",
            "train_tokens": {k: m["splits"]["train"]["tokens"] for k, m in study.meta.items()},
            **summary}
    status = "complete" if summary["complete"] else "INCOMPLETE (run the same command again to continue)"
    picks = "".join(f"; {k} chose {', '.join(v) if v else 'nothing'}" for k, v in summary["picks"].items() if v is not None)
    md = (f"# multitoken ablate{f' --suite {cfg.suite}' if cfg.suite else ''}\n\n`{data['command']}`\n\n"
          f"{data['machine']['device']}, {data['date']}; {status}{picks}.\n\n"
          f"Data fingerprints (meta.json data_sha256): "
          + ", ".join(f"{k} {v[:16]}" for k, v in study.fingerprints.items())
          + f".\n\nEqual compute: {data['equal_compute']}.\n\n{markdown_table(summary)}\n")
    targets = [(study.out, "ablate", "curves")]
    if study.store is not None:
        label = SUITE_ALIASES.get(cfg.suite, cfg.suite) if cfg.suite else "ablate"
        outdir.claim(study.store.root, "results", "--results")
        targets.append((study.store.root, label, label))
    for folder, name, png in targets:
        outdir.write_json(folder / f"{name}.json", data)
        outdir.write_text(folder / f"{name}.md", md)
        plot_curves(study, summary, folder / f"{png}.png")
    return data
