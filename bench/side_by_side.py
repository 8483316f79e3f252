"""Side by side, one run, same model, prompts and machine: transformers vs multitoken decoding.

Methods (batch 1, greedy, each prompt decoded separately, one warm-up prompt first):
  hf_greedy        transformers ``generate(do_sample=False)`` (eager, dynamic cache)
  hf_prompt_lookup transformers ``generate(prompt_lookup_num_tokens=N)`` (n-gram drafts from the prompt)
  ntp              multitoken plain decoding (static KV cache)
  spec             multitoken chain self-speculative decoding with the run's MTP heads
  tree             multitoken tree self-speculative decoding (parallel / Medusa heads only)

The transformers model is the run's own backbone, exported with `multitoken.io.hf.export_hf` and
loaded with ``AutoModelForCausalLM.from_pretrained``: identical weights (the heads ride along unused).
For each method: tokens/s over all prompts, the ratio against our plain decoding and against
transformers greedy, tau (tokens per forward pass after prefill) and whether every output equals
our plain greedy output token for token (up to and including EOS).

    python bench/side_by_side.py --run RUN_DIR [--data DATA_DIR] [--prompts 8] [--max-new-tokens 128]

writes bench/results/side_by_side_<name>.json and .md (with the command and the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from multitoken.decoding.api import generate
from multitoken.io.checkpoint import load_run
from multitoken.io.hf import export_hf, limit_context

RESULTS = Path(__file__).parent / "results"

# Held-out code prompts used when no DATA_DIR is given (written for this benchmark, not from a corpus).
BUILTIN_PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "import os\n\n\ndef list_python_files(root):\n    \"\"\"Yield the paths of all .py files under root.\"\"\"\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n",
    "import json\n\n\ndef load_config(path):\n",
    "def is_prime(n):\n    if n < 2:\n        return False\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def __repr__(self):\n",
    "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n    result = []\n",
]


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def data_prompts(data_dir: str, n: int, prompt_tokens: int) -> list[list[int]]:
    """`n` prompts of `prompt_tokens` tokens from the validation split, starting at line starts, evenly spaced."""
    from multitoken.data.loader import TokenLoader

    tokens = TokenLoader(data_dir, "val", 1, prompt_tokens).tokens
    step = len(tokens) // (n + 1)
    return [tokens[(i + 1) * step : (i + 1) * step + prompt_tokens].astype("int64").tolist() for i in range(n)]


def decode_one(method: str, hf, model, prompt: list[int], max_new: int, eos: int, lookup: int, tree) -> tuple[list[int], int]:
    """Greedy continuation of one prompt by `method`; returns (new tokens, forward passes after prefill or 0)."""
    if method.startswith("hf_"):
        x = torch.tensor([prompt])
        kw = {"prompt_lookup_num_tokens": lookup} if method == "hf_prompt_lookup" else {}
        y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                        pad_token_id=eos, **kw)
        return y[0, len(prompt):].tolist(), 0
    out, stats = generate(model, [prompt], max_new, mode=method, eos_id=eos, tree=tree if method == "tree" else None)
    return out[0], stats.row_steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run directory with MTP heads (e.g. from examples/retrofit_smollm2.py)")
    ap.add_argument("--data", default=None, help="DATA_DIR whose val split gives the prompts (default: built-in code prompts)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length when taken from --data")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=1024, help="our static cache size (the run's context is cut to this)")
    ap.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens for transformers")
    ap.add_argument("--tree", default="16", help="tree for --mode tree: a node count (dynamic tree) or a JSON file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--name", default=None, help="result file stem (default: side_by_side_<run name>)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model, tok = load_run(args.run)
    limit_context(model, min(args.max_seq_len, model.config.max_seq_len))
    eos = model.config.eos_id
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(args.run, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    prompts = data_prompts(args.data, args.prompts, args.prompt_tokens) if args.data else \
        [tok.encode(p) for p in BUILTIN_PROMPTS[: args.prompts]]
    tree = int(args.tree) if args.tree.isdigit() else None
    if tree is None:
        from multitoken.decoding.trees import load_tree

        tree = load_tree(args.tree)
    kind = model.config.heads.kind
    methods = ["hf_greedy", "hf_prompt_lookup", "ntp", "spec"] + (["tree"] if kind in ("parallel", "medusa") else [])

    outputs = {m: [] for m in methods}
    secs = {m: 0.0 for m in methods}
    steps = {m: 0 for m in methods}
    with torch.no_grad():
        for m in methods:  # warm-up: first calls allocate caches and pick kernels
            decode_one(m, hf, model, prompts[0], 8, eos, args.lookup, tree)
        # Prompt by prompt, every method in turn: on a shared machine, load changes slow all methods alike.
        for i, p in enumerate(prompts):
            for m in methods:
                t = time.perf_counter()
                out, n_steps = decode_one(m, hf, model, p, args.max_new_tokens, eos, args.lookup, tree)
                secs[m] += time.perf_counter() - t
                outputs[m].append(out)
                steps[m] += n_steps
            print(f"prompt {i + 1}/{len(prompts)}: " + ", ".join(f"{m} {sum(map(len, outputs[m])) / secs[m]:.1f}" for m in methods)
                  + " tok/s so far", file=sys.stderr)
    results = {}
    for m in methods:
        n = sum(len(o) for o in outputs[m])
        results[m] = {"tokens": n, "seconds": secs[m], "tokens_per_s": n / secs[m],
                      "tau": (n - len(prompts)) / steps[m] if steps[m] else None}  # the prefill's token is no step's
    plain = outputs["ntp"]
    for m in methods:
        r = results[m]
        r["vs_ours_plain"] = r["tokens_per_s"] / results["ntp"]["tokens_per_s"]
        r["vs_hf_greedy"] = r["tokens_per_s"] / results["hf_greedy"]["tokens_per_s"]
        r["equals_plain_greedy"] = outputs[m] == plain
        r["prompts_equal"] = sum(a == b for a, b in zip(outputs[m], plain))

    name = args.name or f"side_by_side_{Path(args.run).name}"
    command = "python bench/side_by_side.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    report = {"command": command, "machine": machine(), "run": str(args.run), "heads": str(model.config.heads),
              "prompts": len(prompts), "prompt_source": args.data or "built-in", "max_new_tokens": args.max_new_tokens,
              "max_seq_len": model.config.max_seq_len, "prompt_lookup_num_tokens": args.lookup, "tree": args.tree,
              "results": results, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (RESULTS / f"{name}.md").write_text(md)
    print(md)
    return 0


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Side by side: {r['run']} ({r['heads']} heads)", "",
             f"Command: `{r['command']}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
             f"transformers {m['transformers']}, Python {m['python']}  ",
             f"{r['prompts']} prompts ({r['prompt_source']}), batch 1, greedy, up to {r['max_new_tokens']} new tokens each, "
             f"stop at EOS; {r['time']}", "",
             "| method | tokens/s | vs our plain | vs HF greedy | tau | output == plain greedy |",
             "|---|---:|---:|---:|---:|---|"]
    label = {"hf_greedy": "transformers generate, greedy", "hf_prompt_lookup": f"transformers prompt lookup ({r['prompt_lookup_num_tokens']})",
             "ntp": "multitoken plain", "spec": "multitoken chain (self-speculative)", "tree": f"multitoken tree ({r['tree']} nodes)"}
    for k, v in r["results"].items():
        tau = f"{v['tau']:.2f}" if v["tau"] else "-"
        eq = "yes" if v["equals_plain_greedy"] else f"no ({v['prompts_equal']}/{r['prompts']} prompts)"
        lines.append(f"| {label[k]} | {v['tokens_per_s']:.1f} | {v['vs_ours_plain']:.2f}x | {v['vs_hf_greedy']:.2f}x | {tau} | {eq} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
