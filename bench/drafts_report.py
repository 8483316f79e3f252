"""Issue 18's table and plot from `bench decode` JSONs: heads side by side on prompts nobody here wrote.

    python bench/drafts_report.py bench/results/drafts_gpu/decode_shipped_fp32.json:shipped \
        bench/results/drafts_gpu/decode_self_fp32.json:self-s4 --out bench/results/drafts_gpu/heads_fp32

Writes OUT.md (per set, temperature and method: tau, acceptance per position, speed against our
plain decoding, token match) and OUT.png (acceptance per position, one panel per prompt set, a
line per heads file and method). Each JSON is one `bench decode` run; LABEL names its heads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(path: Path, label: str) -> list[dict]:
    d = json.loads(path.read_text())
    out = []
    for r in d["results"]:
        if r.get("tau") is None or r["method"] in ("ours plain", "ours plain eager"):
            continue
        out.append({"heads": label, "dtype": d["dtype"], "device": d["machine"]["device"], "set": r["prompts"],
                    "n": r.get("n_prompts"), "T": r["temperature"], "method": r["method"].removeprefix("ours "),
                    "tau": r["tau"], "acceptance": r.get("acceptance") or [], "vs_plain": r["vs_our_plain"],
                    "match": r.get("token_match")})
    return out


def table(all_rows: list[dict]) -> str:
    lines = ["| set | T | heads | dtype | method | tau | acceptance per position | vs our plain | greedy match |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(all_rows, key=lambda r: (r["set"], r["T"], r["method"], r["heads"])):
        acc = " / ".join(f"{a:.2f}" for a in r["acceptance"])
        match = "" if r["match"] is None else f"{r['match']:.3f}"
        lines.append(f"| {r['set']} ({r['n']}) | {r['T']:g} | {r['heads']} | {r['dtype']} | {r['method']} | {r['tau']:.2f} | "
                     f"{acc} | {r['vs_plain']:.2f}x | {match} |")
    return "\n".join(lines) + "\n"


def plot(all_rows: list[dict], out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'multitoken[viz]')")
        return
    sets = sorted({(r["set"], r["T"]) for r in all_rows})
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.8), squeeze=False)
    for ax, (name, T) in zip(axes[0], sets):
        for r in all_rows:
            if (r["set"], r["T"]) == (name, T) and r["method"] in ("chain", "tree") and r["acceptance"]:
                ax.plot(range(1, len(r["acceptance"]) + 1), r["acceptance"], marker="o",
                        linestyle="-" if r["method"] == "chain" else "--", label=f"{r['heads']} {r['method']} (tau {r['tau']:.2f})")
        ax.set_title(f"{name}, T={T:g}")
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance (share of steps)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="JSON:LABEL, a `bench decode` decode.json and the name of its heads")
    p.add_argument("--out", required=True, type=Path, help="OUT.md and OUT.png are written")
    args = p.parse_args(argv)
    all_rows = []
    for spec in args.runs:
        path, _, label = spec.rpartition(":")
        all_rows += rows(Path(path), label)
    args.out.with_suffix(".md").write_text(table(all_rows))
    plot(all_rows, args.out.with_suffix(".png"))
    print(table(all_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
