"""Issue 18, item 2, at CPU scale: each head-training option alone, on held-out acceptance per depth.

A target model (the tiny preset on python-stdlib through a 1k BPE, trained plainly until its greedy
text is code-like) gets sequential:3 heads retrofitted, frozen, for the same steps and data under
each recipe: hard targets (the data's tokens), soft targets (KL to the frozen model, its
distribution computed once per batch), and KL plus one change at a time (training-time test,
DFlash's decaying depth weights, an eh_proj that starts by passing the hidden state through), then
all of them. Every recipe starts from the same heads and reads the same batches.

Measured per recipe, per draft position k = 1..3 (acceptance of draft k = the share of
verification steps that accepted drafts 1..k; tau = tokens per step, bonus included):
- teacher-forced, on held-out corpus windows (the val split): the simulated greedy chain of
  `training.evaluate` (the context is the corpus text, not the model's), and each depth's top-1
  accuracy against the data;
- real greedy speculative decoding (chain of 3 drafts, a fixed draft length) of held-out prompts
  (64-token windows of val documents, 128 new tokens), its output checked identical to plain
  greedy decoding;
- teacher-forced on the text that decoding produced (prompt + the model's own greedy
  continuation), walked as decoding walks it: on its own greedy text the training forward reads
  what the drafter reads (docs/training.md), so this equals the decoding numbers up to the last
  few tokens of each row, which the walk leaves out (a check of the setting).

    PYTHONPATH=src python bench/recipe_cpu.py --out bench/results/recipe_cpu --work /tmp/recipe_work

Recipes run as subprocesses, --jobs at a time, one thread each; each writes WORK/rows/NAME.json,
and a later call reuses the rows it finds (a cut run continues). Writes OUT/recipe_cpu.json
(commit, machine, load, command, settings, every number), OUT/recipe_cpu.md (the table) and
OUT/recipe_cpu.png (acceptance per depth per recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RECIPES = {  # slug: (name, TrainConfig options)
    "hard": ("hard targets", dict(distill=False)),
    "kl": ("KL soft targets (distill)", dict(distill=True)),
    "kl_ttt": ("KL + ttt", dict(distill=True, ttt=True)),
    "kl_decay": ("KL + decay:2 weights", dict(distill=True, loss_weights="decay:2")),
    "kl_eh": ("KL + eh_pass_through", dict(distill=True, eh_pass_through=True)),
    "kl_all": ("KL + all three", dict(distill=True, ttt=True, loss_weights="decay:2", eh_pass_through=True)),
    "kl_decay_eh": ("KL + decay:2 + eh_pass_through", dict(distill=True, loss_weights="decay:2", eh_pass_through=True)),
    "kl_seed2": ("KL, another seed (noise)", dict(distill=True, seed=2)),
}
DEPTH = 3


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return out + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("MULTITOKEN_COMMIT", "unknown")


def settings(args) -> dict:
    return dict(tokenizer=args.tokenizer, preset="tiny", batch_size=16, seq_len=256, target_steps=args.target_steps,
                head_steps=args.steps, heads=f"sequential:{DEPTH}", lr=3e-3, prompts=args.prompts, prompt_len=64,
                new_tokens=args.new_tokens, eval_batches=args.eval_batches, draft=DEPTH)


def common_train(args) -> dict:
    return dict(preset="tiny", batch_size=16, seq_len=256, warmup=30, log_every=50, device="cpu", dtype="fp32",
                lr=3e-3, eval_every=0, save_every=0)


def held_out_prompts(data: Path, n: int, length: int, eos: int, docs: bool = False) -> list:
    """n windows of `length` tokens spread over the val split, each inside one document (with
    `docs`: the index of each one's document in the split instead)."""
    from multitoken.data.loader import TokenLoader

    val = TokenLoader(data, "val", batch_size=1, seq_len=length).tokens.astype("int64")
    starts = [s for s in range(0, len(val) - length, 8) if eos not in val[s: s + length]]
    pick = [starts[round(i * (len(starts) - 1) / max(n - 1, 1))] for i in range(n)]
    if docs:
        return [int((val[:s] == eos).sum()) for s in pick]
    return [val[s: s + length].tolist() for s in pick]


def own_text_walk(model, prompts: list[list[int]], outputs: list[list[int]]) -> dict:
    """Teacher-forced chain acceptance on prompt + the model's own greedy output, counted from the
    first generated token on (the prompt's positions are stepped over, as `simulate_steps` does)."""
    import torch

    from multitoken.training.evaluate import EvalStats, eval_stats, summarize

    stats, per_prompt = EvalStats.zeros(model.depth), []
    for p, o in zip(prompts, outputs):
        seq = torch.tensor([p + o])
        mask = torch.zeros_like(seq)
        mask[:, len(p):] = 1
        one = eval_stats(model, [(seq, mask)], model.config.eos_id)
        per_prompt.append(round(summarize(one)["expected_tau"], 3))
        stats.add_(one)
    s = summarize(stats)
    return dict(acceptance=s["acceptance_per_position"], tau=s["expected_tau"], steps=s["tau_steps"], tau_per_prompt=per_prompt)


def run_one(slug: str, args) -> dict:
    """Train one recipe's heads and measure them (run in its own process, one thread)."""
    import torch

    torch.set_num_threads(1)
    from multitoken.config import TrainConfig
    from multitoken.decoding import generate
    from multitoken.io.checkpoint import load_run
    from multitoken.training.evaluate import evaluate
    from multitoken.training.trainer import train

    name, opts = RECIPES[slug]
    data, run = args.work / "data", args.work / "heads" / slug
    load0, t0 = os.getloadavg(), time.perf_counter()
    res = train(TrainConfig(heads=f"sequential:{DEPTH}", init=str(args.work / "target"), freeze_backbone=True,
                            steps=args.steps, eval_batches=1, **opts, **common_train(args)), data, run, progress=False)
    train_s = time.perf_counter() - t0
    model, _ = load_run(run)
    model.eval()  # teacher-forced evaluation without the training-time test, for every recipe alike
    tf = evaluate(model, data, n_batches=args.eval_batches, batch_size=8, seq_len=256)
    meta = json.loads((data / "meta.json").read_text())
    prompts = held_out_prompts(data, args.prompts, 64, meta["eos_id"])
    t1 = time.perf_counter()
    plain, _ = generate(model, prompts, args.new_tokens, mode="ntp")
    spec, st = generate(model, prompts, args.new_tokens, mode="spec", draft=DEPTH)
    gen_s = time.perf_counter() - t1
    own = own_text_walk(model, prompts, plain)
    row = dict(slug=slug, recipe=name, options=opts, commit=commit(), command=" ".join(sys.argv), train_seconds=round(train_s, 1), tokens_per_s=res["tokens_per_s"],
               loadavg_start=load0, loadavg_end=os.getloadavg(), train_loss_per_depth=res.get("train_loss_per_depth"),
               teacher_forced=dict(acceptance=tf["acceptance_per_position"], tau=tf["expected_tau"],
                                   accuracy_vs_data=tf["accuracy_per_depth"][1:], loss_vs_data=tf["loss_per_depth"][1:],
                                   main_accuracy=tf["accuracy_per_depth"][0], steps=tf["tau_steps"]),
               generation=dict(acceptance=st.acceptance_per_position, tau=st.tau, steps=st.row_steps,
                               chosen_draft=st.chosen_draft, identical_to_plain=spec == plain,
                               new_tokens=st.new_tokens, seconds=round(gen_s, 1)),
               own_text=own)
    return row


def tree_decoding(slug: str, args) -> dict:
    """Greedy tree decoding (a dynamic tree of 16 nodes, depth 3) of the held-out prompts with one
    recipe's heads: sequential modules condition every branch of depth k on the top-1 drafts of
    the depths before, so the tree's side branches use depth k after a wrong draft, the case the
    training-time test trains."""
    import torch

    torch.set_num_threads(1)
    from multitoken.decoding import generate
    from multitoken.io.checkpoint import load_run

    model, _ = load_run(args.work / "heads" / slug)
    meta = json.loads((args.work / "data" / "meta.json").read_text())
    prompts = held_out_prompts(args.work / "data", args.prompts, 64, meta["eos_id"])
    plain, _ = generate(model, prompts, args.new_tokens, mode="ntp")
    out, st = generate(model, prompts, args.new_tokens, mode="tree", draft=DEPTH)
    return dict(nodes=16, acceptance=st.acceptance_per_position, tau=st.tau, steps=st.row_steps,
                identical_to_plain=out == plain)


def train_target(args) -> None:
    import torch

    torch.set_num_threads(1)
    from multitoken.config import TrainConfig
    from multitoken.training.trainer import train

    target, done = args.work / "target", args.work / "target_done.json"  # the marker: a run saves weights midway too
    if done.is_file() and json.loads(done.read_text())["steps"] == args.target_steps:
        return
    print(f"training the target: {args.target_steps} steps", flush=True)
    res = train(TrainConfig(heads="none", steps=args.target_steps, eval_batches=16, **common_train(args)), args.work / "data",
                target, progress=False)
    done.write_text(json.dumps({"steps": res["step"], "tokens_per_s": res["tokens_per_s"]}) + "\n")


def target_quality(args) -> dict:
    """The target's held-out loss and accuracy, and what its greedy text looks like."""
    import torch

    torch.set_num_threads(1)
    from multitoken.decoding import generate
    from multitoken.io.checkpoint import load_run
    from multitoken.training.evaluate import evaluate

    model, tok = load_run(args.work / "target")
    ev = evaluate(model, args.work / "data", n_batches=args.eval_batches, batch_size=8, seq_len=256)
    meta = json.loads((args.work / "data" / "meta.json").read_text())
    prompts = held_out_prompts(args.work / "data", args.prompts, 64, meta["eos_id"])
    out, _ = generate(model, prompts, args.new_tokens, mode="ntp")
    grams = [tuple(o[i: i + 4]) for o in out for i in range(len(o) - 3)]
    return dict(val_loss=ev["loss_per_depth"][0], val_accuracy=ev["accuracy_per_depth"][0],
                prompt_docs=held_out_prompts(args.work / "data", args.prompts, 64, meta["eos_id"], docs=True),
                val_docs=meta["sources"]["val"],
                distinct_4grams_of_greedy_text=len(set(grams)) / max(len(grams), 1),
                greedy_sample=tok.decode(prompts[1]) + " <<< " + tok.decode(out[1]))


def table(rows: list[dict]) -> str:
    f = lambda xs: " / ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    lines = ["| recipe | teacher-forced acceptance 1 / 2 / 3 | tau | accuracy vs data 1 / 2 / 3 "
             "| decoding acceptance 1 / 2 / 3 | tau | own-text walk tau | tree tau | identical | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tf, g, t = r["teacher_forced"], r["generation"], r.get("tree")
        same = g["identical_to_plain"] and (t is None or t["identical_to_plain"])
        tree = "-" if t is None else f"{t['tau']:.2f}"
        lines.append(f"| {r['recipe']} | {f(tf['acceptance'])} | {tf['tau']:.2f} | {f(tf['accuracy_vs_data'])} "
                     f"| {f(g['acceptance'])} | {g['tau']:.2f} | {r['own_text']['tau']:.2f} "
                     f"| {tree} | {same} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    width = 0.84 / len(rows)
    colors = plt.get_cmap("tab10").colors
    for ax, key, label in ((axes[0], "teacher_forced", "teacher-forced, held-out corpus windows"),
                           (axes[1], "generation", "greedy speculative decoding (chain of 3), held-out prompts")):
        for j, r in enumerate(rows):
            acc = r[key]["acceptance"]
            xs = [k + (j - (len(rows) - 1) / 2) * width for k in range(1, len(acc) + 1)]
            ax.bar(xs, acc, width, color=colors[j % len(colors)], label=f"{r['recipe']} (tau {r[key]['tau']:.2f})")
        ax.set_xticks(range(1, DEPTH + 1), [f"draft {k}" for k in range(1, DEPTH + 1)])
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, 1.12)  # the legend above the bars
        ax.legend(fontsize=7, loc="upper right", ncol=2)
    axes[0].set_ylabel("acceptance (drafts 1..k all accepted)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/recipe_cpu"))
    p.add_argument("--work", type=Path, default=Path("runs/recipe_cpu"))
    p.add_argument("--tokenizer", default="bpe:1024")
    p.add_argument("--target-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=300, help="head-training steps per recipe")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--eval-batches", type=int, default=40, help="val batches of 8 x 256 for teacher-forced numbers")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated slugs: " + ", ".join(RECIPES))
    p.add_argument("--jobs", type=int, default=2, help="recipes trained at once, one thread each")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one recipe, write its row
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    rows_dir = args.work / "rows"
    if args.one:
        row = run_one(args.one, args)
        rows_dir.mkdir(parents=True, exist_ok=True)
        (rows_dir / f"{args.one}.json").write_text(json.dumps(row, indent=2) + "\n")
        return 0
    slugs = [s for s in args.recipes.split(",") if s]
    unknown = [s for s in slugs if s not in RECIPES]
    if unknown:
        p.error(f"unknown recipes {unknown}: choose from {', '.join(RECIPES)}")
    t0, load0 = time.perf_counter(), os.getloadavg()
    import torch

    torch.set_num_threads(1)
    from multitoken.data.prepare import prepare

    prepare("python-stdlib", args.tokenizer, args.work / "data", progress=False)
    train_target(args)
    quality = target_quality(args)
    print(json.dumps(quality), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    todo = [s for s in slugs if not (rows_dir / f"{s}.json").is_file()]
    forwarded = ["--work", str(args.work), "--tokenizer", args.tokenizer, "--target-steps", str(args.target_steps),
                 "--steps", str(args.steps), "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens),
                 "--eval-batches", str(args.eval_batches)]
    running: list[tuple[str, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            s = todo.pop(0)
            print(f"start {s}", flush=True)
            running.append((s, subprocess.Popen([sys.executable, __file__, "--one", s, *forwarded], env=env)))
        time.sleep(5)
        for s, proc in list(running):
            if proc.poll() is not None:
                running.remove((s, proc))
                print(f"done {s} (exit {proc.returncode})", flush=True)
    rows = [json.loads((rows_dir / f"{s}.json").read_text()) for s in slugs if (rows_dir / f"{s}.json").is_file()]
    for r in rows:
        if "tree" not in r:
            r["tree"] = tree_decoding(r["slug"], args)
            (rows_dir / f"{r['slug']}.json").write_text(json.dumps(r, indent=2) + "\n")
    out = {"what": "issue 18 item 2 at CPU scale: head-training recipes on a tiny target, held-out acceptance per depth",
           "commit": commit(),
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "threads_per_recipe": 1, "jobs": args.jobs, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                       "torch": torch.__version__, "python": platform.python_version(),
                       "note": "a 2-core machine shared with other engineers' jobs: the seconds are not comparable"},
           "command": " ".join(["python", "bench/recipe_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
           "settings": settings(args), "target": quality,
           "rows_note": "each row records the commit and command that trained and measured it, its load average "
                        "and seconds; this call reused the rows it found in WORK/rows and measured what they lacked",
           "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipe_cpu.json").write_text(json.dumps(out, indent=2) + "\n")
    md = table(rows)
    (args.out / "recipe_cpu.md").write_text(md)
    plot(rows, args.out / "recipe_cpu.png",
         f"sequential:{DEPTH} heads on a frozen tiny target ({args.tokenizer}, {args.target_steps} steps), "
         f"{args.steps} head steps of 16 x 256 tokens per recipe")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
