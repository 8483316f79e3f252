"""One GPU call: train small MTP models on python-stdlib, then measure exact self-speculative decoding.

Self-contained (prepare, train, measure), so it fits one call on a lent GPU machine:

    PYTHONPATH=src python3 bench/gpu_run.py --out $OUT

For each head family it trains the same backbone shape for the same tokens (bf16 autocast),
recording training throughput and peak memory, then decodes held-out code prompts in float32
with plain greedy decoding, chain and tree speculative decoding (eager PyTorch, batch 1, no CUDA
graphs), checks every speculative output equals plain greedy, and reports tau, acceptance per
position and tokens/s ratios measured side by side in this process. Writes gpu_run.json and
gpu_run.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from multitoken.config import TrainConfig
from multitoken.data.prepare import prepare
from multitoken.decoding.api import generate
from multitoken.io.checkpoint import load_run
from multitoken.training.evaluate import evaluate
from multitoken.training.trainer import train


def prompts_from_val(data_dir: Path, tok, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens cut from the validation split at fixed, spread-out offsets."""
    from multitoken.data.prepare import shard_path
    from multitoken.data.shards import read_shard

    val = read_shard(shard_path(data_dir, "val"))
    step = (len(val) - length) // n
    return [val[i * step : i * step + length].astype("int64").tolist() for i in range(n)]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_bench(model, prompts, new_tokens: int, modes: list[tuple[str, dict]]) -> dict:
    out = {}
    ref_tokens = None
    for name, kw in modes:
        tps, taus, accs, same = [], [], [], True
        for p in prompts:
            generate(model, p, 8, **kw)  # warm-up
            sync()
            toks, st = generate(model, p, new_tokens, **kw)
            sync()
            tps.append(st.tokens_per_second)
            taus.append(st.tau)
            accs.append(st.acceptance_per_position)
            if name == "plain":
                ref_tokens = ref_tokens or {}
                ref_tokens[tuple(p)] = toks
            else:
                same &= toks == ref_tokens[tuple(p)]
        acc = [statistics.mean(a[j] for a in accs) for j in range(len(accs[0]))] if accs[0] else []
        out[name] = {"tokens_per_s_median": statistics.median(tps), "tau_mean": statistics.mean(taus),
                     "acceptance_per_position": acc, "identical_to_plain_greedy": same}
    base = out["plain"]["tokens_per_s_median"]
    for v in out.values():
        v["speedup_vs_plain"] = v["tokens_per_s_median"] / base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--families", default="none,parallel:3,sequential:2,medusa:3")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    out = Path(a.out)
    work = out / "work" if a.device != "cuda" else Path("/tmp/mt-gpu")
    t0 = time.time()
    meta = prepare("python-stdlib", "bpe:8192", work / "data", progress=False)
    print(f"prepared {meta['splits']['train']['tokens']:,} tokens in {time.time() - t0:.0f}s", flush=True)
    result = {"command": "PYTHONPATH=src python3 bench/gpu_run.py " + " ".join(sys.argv[1:]),
              "machine": {"gpu": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor(), "torch": torch.__version__,
                          "python": platform.python_version()},
              "setup": {"preset": a.preset, "steps": a.steps, "batch": "32 x 512 tokens", "train_dtype": "bf16 autocast",
                        "decode_dtype": "float32, eager, batch 1", "prompts": a.prompts, "prompt_tokens": 64,
                        "new_tokens": a.new_tokens, "data": "python-stdlib, bpe:8192"},
              "families": {}}
    for heads in a.families.split(","):
        run = work / heads.replace(":", "-")
        cfg = TrainConfig(preset=a.preset, heads=heads, steps=a.steps, batch_size=32, seq_len=512, lr=3e-3, warmup=100,
                          eval_every=0, eval_batches=16, save_every=0, log_every=50, device=a.device)
        if a.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        tr = train(cfg, work / "data", run, progress=False)
        model, tok = load_run(run, device=a.device)
        ev = evaluate(model, work / "data", n_batches=16)
        row = {"train": {k: tr[k] for k in ("tokens_per_s", "seconds", "tokens", "val_loss_per_depth",
                                              "val_accuracy_per_depth", "max_memory_gib") if k in tr},
               "eval": {k: ev[k] for k in ("loss_per_depth", "accuracy_per_depth", "expected_tau")}}
        if heads != "none":
            prompts = prompts_from_val(work / "data", tok, a.prompts, 64)
            modes = [("plain", dict(mode="ntp")), ("chain", dict(mode="spec"))]
            if not heads.startswith("sequential"):
                modes.append(("tree-dynamic-16", dict(mode="tree", tree=16)))
            else:
                modes.append(("tree-depth1-8", dict(mode="tree", draft=1, tree=8)))
            row["decode"] = decode_bench(model, prompts, a.new_tokens, modes)
        result["families"][heads] = row
        print(heads, json.dumps(row)[:600], flush=True)
        (out / "gpu_run.json").write_text(json.dumps(result, indent=2) + "\n")
    base = result["families"].get("none", {}).get("train", {}).get("tokens_per_s")
    for row in result["families"].values():
        if base:
            row["train"]["throughput_vs_no_heads"] = row["train"]["tokens_per_s"] / base
    (out / "gpu_run.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "gpu_run.png")
    print_table(result)


def print_table(result: dict) -> None:
    print(f"{'heads':<14}{'train tok/s':>12}{'mem GiB':>9}{'val L0':>8}{'mode':>17}{'tau':>6}{'tok/s':>8}{'x plain':>8}{'exact':>7}")
    for heads, row in result["families"].items():
        t = row["train"]
        for mode, d in (row.get("decode") or {"-": None}).items():
            dd = d or {}
            print(f"{heads:<14}{t['tokens_per_s']:>12.0f}{t.get('max_memory_gib', 0):>9.2f}{row['eval']['loss_per_depth'][0]:>8.3f}"
                  f"{mode:>17}{dd.get('tau_mean', 1):>6.2f}{dd.get('tokens_per_s_median', 0):>8.0f}"
                  f"{dd.get('speedup_vs_plain', 1):>8.2f}{str(dd.get('identical_to_plain_greedy', '')):>7}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for heads, row in result["families"].items():
        d = row.get("decode", {}).get("chain")
        if d:
            acc = d["acceptance_per_position"]
            ax1.plot(range(1, len(acc) + 1), acc, marker="o", label=heads)
    ax1.set(xlabel="draft position", ylabel="acceptance rate (chain, greedy)", title="Acceptance per position", ylim=(0, 1))
    ax1.legend()
    labels, vals = [], []
    for heads, row in result["families"].items():
        for mode, d in row.get("decode", {}).items():
            if mode != "plain":
                labels.append(f"{heads}\n{mode}")
                vals.append(d["speedup_vs_plain"])
    ax2.bar(range(len(vals)), vals)
    ax2.set_xticks(range(len(vals)), labels, fontsize=7)
    ax2.axhline(1.0, color="k", lw=0.5)
    ax2.set(ylabel="tokens/s vs plain (same model, eager)", title="Speed-up, outputs identical")
    fig.suptitle(f"{result['machine']['gpu']}: {result['setup']['preset']} preset, {result['setup']['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
