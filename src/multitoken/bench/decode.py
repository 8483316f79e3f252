"""``multitoken bench decode``: decoding speed and exactness, ours and transformers', side by side.

For one model (a run directory, a Hugging Face folder, or a preset with random weights), in one
process and on the same prompts:
- ours: plain decoding eager (the old path's launch pattern, batch 1), plain with CUDA graphs
  of eager blocks (batch 1), plain with compiled blocks and CUDA graphs (the default on CUDA),
  and every speculative mode that applies (chain with all heads, chain with the automatic
  draft length, tree);
- transformers' generate on the same weights (exported in-process): default cache, static
  cache, prompt lookup (batch 1) and, for sequential modules, its own MTP drafting with our
  modules (`use_mtp`, batch 1), where transformers is installed;
- a reference line: `bench/reference.py`'s minimal decoder, compiled as one whole model with
  ``mode="reduce-overhead"`` over a 2,048-slot static cache on CUDA (eager on the CPU), on the
  same weights and prompts (`--no-reference` skips it);
- with `--draft-vocab 4096,8192,16384,full`, the chain with all heads drafting over the N most
  frequent tokens (counted on `--data`'s training split, else the N lowest ids, which a BPE
  tokenizer orders roughly by frequency), with tau and the measured seconds of one draft's
  logits (`draft_cost_s`) per size;
at each batch size and temperature asked. Reported: tokens/s as medians over repeats (the first
call of each method is warm-up and holds its compile and capture time, reported apart), tau,
acceptance per position, speed-up over our plain decoding with graphs, the measured cost of
one step of each kind relative to a plain step, and at temperature 0 the token-match rate
against our plain greedy output and the first position where they diverge.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from multitoken.errors import UserError


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def match_rate(out: list[list[int]], ref: list[list[int]]) -> tuple[float, int | None]:
    """(fraction of reference tokens reproduced before the first divergence, earliest divergence or None)."""
    same, total, first = 0, 0, None
    for o, r in zip(out, ref):
        n = 0
        while n < min(len(o), len(r)) and o[n] == r[n]:
            n += 1
        same += n
        total += len(r)
        if n < max(len(o), len(r)):
            first = n if first is None else min(first, n)
    return (same / total if total else 1.0), first


def code_prompts(tokenizer, vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` tokens: code from this interpreter's standard library through the
    model's tokenizer, or random ids when there is no tokenizer."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, vocab, (n, length), generator=g).tolist()
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    out = []
    for i in range(n):
        text = files[(i * 37 + seed) % len(files)].read_text(errors="replace")
        ids = tokenizer.encode(text[: length * 8])
        out.append(ids[:length] if len(ids) >= length else (ids * (length // max(len(ids), 1) + 1))[:length])
    return out


def val_prompts(data_dir: str, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens cut from DATA_DIR's validation split (held-out documents) at spread-out offsets."""
    from multitoken.data.loader import TokenLoader

    val = TokenLoader(data_dir, "val", batch_size=1, seq_len=length).tokens
    step = max((len(val) - length) // n, 1)
    return [val[i * step : i * step + length].astype("int64").tolist() for i in range(n)]


def load_model(args) -> tuple:
    """(model, tokenizer, run_dir or None, description) from --run, --hf or --preset."""
    from multitoken.io.checkpoint import load_run

    dtype = getattr(torch, args.dtype)
    if args.run and args.heads_file:
        from multitoken.io.heads_file import attach_heads

        model, tok = attach_heads(args.run, args.heads_file, args.max_seq_len)
        return model.to(args.device, dtype), tok, None, f"run {args.run} + heads {Path(args.heads_file).name} ({model.config.heads})"
    if args.run:
        model, tok = load_run(args.run, device=args.device, dtype=dtype)
        if args.max_seq_len:
            from multitoken.io.hf import limit_context

            limit_context(model, args.max_seq_len)
        return model, tok, Path(args.run), f"run {args.run}"
    if args.hf:
        from multitoken.io.hf import convert_hf

        tmp = Path(tempfile.mkdtemp(prefix="mt-bench-"))
        convert_hf(args.hf, tmp / "run", None, None, None, args.max_seq_len)
        model, tok = load_run(tmp / "run", device=args.device, dtype=dtype)
        return model, tok, tmp / "run", f"hf {args.hf}"
    from multitoken.config import HeadsConfig, ModelConfig
    from multitoken.model import Transformer

    over = {"max_seq_len": args.max_seq_len} if args.max_seq_len else {}
    cfg = ModelConfig.from_preset(args.preset, heads=HeadsConfig.parse(args.heads), **over)
    torch.manual_seed(0)
    model = Transformer(cfg).to(args.device, dtype).eval()
    return model, None, None, f"preset {args.preset} ({args.heads}, random weights)"


def hf_peer(model, run_dir: Path | None, device: str, dtype: torch.dtype):
    """transformers' model with our weights, or None when transformers (or an export) is unavailable;
    heads that the export refuses (fused sequential heads) leave the peer without use_mtp."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    from multitoken.io.checkpoint import save_run
    from multitoken.io.hf import export_hf

    tmp = Path(tempfile.mkdtemp(prefix="mt-bench-hf-"))
    if model.mtp is not None and model.mtp.hf_export_problem(model.config):  # fused heads: the backbone alone
        from multitoken.config import HeadsConfig
        from multitoken.model.build import build_model

        model = build_model(model.config.with_heads(HeadsConfig()),
                            {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}, fresh_heads=False)
        run_dir = None
    if run_dir is None:
        run_dir = tmp / "run"
        save_run(run_dir, model)
    export_hf(run_dir, tmp / "hf")
    if model.mtp is not None and not model.mtp.drafts_from_verify:  # sequential modules: transformers' use_mtp too
        from multitoken.io.hf import load_transformers_mtp

        return load_transformers_mtp(tmp / "hf", dtype=dtype).to(device).eval()
    return AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=dtype).to(device).eval()


def time_calls(fn, repeats: int) -> tuple[float, list[float], object]:
    """(warm-up seconds, timed seconds per repeat, last result)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    warm = time.perf_counter() - t0
    times, res = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        res = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return warm, times, res


def draft_vocabs(model, sizes: list, data: str | None) -> list[tuple[str, object]]:
    """(label, draft ids or None for the full vocabulary) for each --draft-vocab size."""
    if not sizes or model.mtp is None:
        return []
    V = model.config.vocab_size
    counts = None
    if data and any(s != "full" for s in sizes):
        from multitoken.data.draft_vocab import count_tokens

        counts = count_tokens(data)
        if len(counts) != V:
            raise UserError(f"--data {data} has a vocabulary of {len(counts)} tokens, the model {V}: use data made with the model's tokenizer")
    out = []
    for size in sizes:
        if size == "full":
            out.append(("full", None))
            continue
        if size > V:
            raise UserError(f"--draft-vocab {size} is larger than the model's vocabulary of {V} tokens")
        from multitoken.data.draft_vocab import frequent_tokens

        eos = [model.config.eos_id] if model.config.eos_id is not None and model.config.eos_id < V else []
        ids = frequent_tokens(counts, size, eos) if counts is not None else torch.arange(size)
        out.append((str(size), ids))
    return out


def reference_run(model, groups, new_tokens: int, temperature: float, compile: bool):
    """The minimal compiled decoder over each group in turn: (outputs, None) like `decode_groups`."""
    from multitoken.bench.reference import MinimalDecoder

    out = []
    for g in groups:
        dec = _REFERENCE.get(len(g))
        if dec is None:
            dec = _REFERENCE[len(g)] = MinimalDecoder(model, len(g), compile=compile)
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(1)
        out += dec.generate(g, new_tokens, temperature, gen)
    return out, None


_REFERENCE: dict = {}


def ours_row(generate, model, groups, args, name: str, kw: dict, T: float, B: int) -> tuple[dict, list]:
    """One of our methods over every group, timed: (its result row, its outputs)."""
    from multitoken.bench.reference import draft_cost

    kw, extra = dict(kw), {}
    if "vocab" in kw:  # a chain drafting over a reduced vocabulary, for this row only
        model.mtp.set_draft_vocab(kw.pop("vocab"))
        extra = dict(draft_vocab=name.split("=")[-1], draft_cost_s=draft_cost(model, B))
    call = lambda: decode_groups(generate, model, groups, args.new_tokens, T, kw)  # noqa: E731
    try:
        warm, times, (out, st) = time_calls(call, args.repeats)
    finally:
        if extra:
            model.mtp.set_draft_vocab(None)
    tps = statistics.median(sum(len(r) for r in out) / t for t in times)
    return dict(method=name, temperature=T, tokens_per_s=tps, warmup_s=warm, compile_s=st.compile_time_s, tau=st.tau,
                acceptance=st.acceptance_per_position, chosen_draft=st.chosen_draft, host_syncs=st.host_syncs,
                times_s=times, **extra), out


def reference_row(model, groups, args, T: float, compiled: bool, ref) -> dict:
    """The reference line's result row (an error row when it cannot run here)."""
    name = "reference: minimal compiled decoder" if compiled else "reference: minimal decoder (eager)"
    call = lambda: reference_run(model, groups, args.new_tokens, T, compiled)  # noqa: E731
    try:
        warm, times, (out, _) = time_calls(call, args.repeats)
    except Exception as e:  # a reference that cannot run here is reported, not fatal
        return dict(method=name, temperature=T, error=f"{type(e).__name__}: {e}"[:300])
    row = dict(method=name, temperature=T, tokens_per_s=statistics.median(sum(len(r) for r in out) / t for t in times),
               warmup_s=warm, times_s=times)
    if T == 0 and ref is not None:
        row["token_match"], row["first_divergence"] = match_rate(out, ref)
    return row


class _Rows(list):
    """The result rows, handed to `on_row` after each one is added (a run cut short keeps them)."""

    def __init__(self, on_row=None) -> None:
        super().__init__()
        self.on_row = on_row

    def append(self, row: dict) -> None:
        super().append(row)
        if self.on_row is not None:
            self.on_row(list(self))


def bench(model, tok, run_dir, args, on_row=None) -> dict:
    """Every method over every prompt set and temperature. `on_row(rows so far)` runs after each
    result row (`bench decode` writes a partial decode.json with it)."""
    from multitoken.bench.numerics import width_deviation
    from multitoken.decoding.api import engine_for, generate

    device = args.device
    dtype = getattr(torch, args.dtype)
    hf = hf_peer(model, run_dir, device, dtype) if args.transformers else None
    results = _Rows(on_row)
    step_costs = {}
    modes: list[tuple[str, dict]] = [("ours plain eager", dict(mode="ntp", graphs=False, compile=False))] if args.eager else []
    if device.startswith("cuda") and args.eager:
        modes.append(("ours plain graphs, eager blocks", dict(mode="ntp", compile=False)))
    modes.append(("ours plain", dict(mode="ntp")))
    if model.depth:
        shorter = sorted({k for k in getattr(args, "chain_drafts", None) or [] if k < model.depth})
        modes += [(f"ours chain:{k}", dict(mode="spec", draft=k)) for k in shorter]
        modes += [("ours chain", dict(mode="spec", draft=model.depth)),
                  ("ours chain auto", dict(mode="spec")),
                  ("ours tree", dict(mode="tree", tree=args.tree_nodes, draft=model.depth))]  # fixed, as the chain: auto is its own row
    vocabs = draft_vocabs(model, getattr(args, "draft_vocab", None) or [], args.data)
    modes += [(f"ours chain V'={label}", dict(mode="spec", draft=model.depth, vocab=ids)) for label, ids in vocabs]
    reference = getattr(args, "reference", True)
    _REFERENCE.clear()
    sets = {}
    for B in args.batch:
        n = args.prompts or B
        if getattr(args, "sets", None):  # named evaluation sets (HumanEval, our chat prompts): whole prompts, ragged
            if tok is None:
                raise UserError("--sets needs a model with a tokenizer (--run or --hf)")
            from multitoken.data.evalsets import prompt_ids

            for name in args.sets:
                sets[B, name] = prompt_ids(name, tok, args.prompts)
            continue
        sets[B, "code"] = (val_prompts(args.data, n, args.prompt_tokens) if args.data
                           else code_prompts(tok, model.config.vocab_size, n, args.prompt_tokens))
        if args.chat:
            if tok is None:
                raise UserError("--chat needs a model with a tokenizer (--run or --hf)")
            sets[B, "chat"] = [tok.chat(m) for m in CHAT_PROMPTS[: args.chat]]
    for (B, kind), all_prompts in sets.items():
        groups = [all_prompts[i: i + B] for i in range(0, len(all_prompts), B)]
        for T in args.temperature:
            ref = None
            base_tps = None
            for name, kw in modes:
                if B > 1 and name.startswith("ours plain ") and name != "ours plain":
                    continue
                row, out = ours_row(generate, model, groups, args, name, kw, T, B)
                row.update(batch=B, prompts=kind, n_prompts=len(all_prompts))
                if name == "ours plain":
                    ref, base_tps = out, row["tokens_per_s"]
                if T == 0 and ref is not None:
                    row["token_match"], row["first_divergence"] = match_rate(out, ref)
                results.append(row)
            if reference:
                row = reference_row(model, groups, args, T, device.startswith("cuda"), ref)
                results.append(dict(row, batch=B, prompts=kind, n_prompts=len(all_prompts)))
            if hf is not None and B <= args.hf_max_batch:
                peers = [("transformers generate", {}), ("transformers static cache", dict(cache_implementation="static"))]
                if B == 1:
                    peers.append(("transformers prompt lookup", dict(prompt_lookup_num_tokens=10)))
                if B == 1 and getattr(hf.config, "num_mtp_layers", None):
                    peers.append(("transformers use_mtp", dict(use_mtp=True)))
                chosen = getattr(args, "peers", None)
                peers = [(n, kw) for n, kw in peers if not chosen or PEERS[n] in chosen]
                for name, kw in peers:
                    sample = dict(do_sample=True, temperature=T, top_k=0) if T else dict(do_sample=False)

                    def call(kw=kw, sample=sample):
                        out = []
                        for g in groups:  # equal-length prompts per group (code), or batch 1 (chat)
                            ids = torch.tensor(g, device=device)
                            o = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                            min_new_tokens=args.new_tokens, pad_token_id=0, **sample, **kw)
                            out += o[:, ids.shape[1]:].tolist()
                        return out

                    try:
                        warm, times, out = time_calls(call, args.repeats)
                    except Exception as e:  # a peer that cannot run here is reported, not fatal
                        results.append(dict(method=name, batch=B, prompts=kind, temperature=T, error=f"{type(e).__name__}: {e}"[:300]))
                        continue
                    tps = statistics.median(sum(len(r) for r in out) / t for t in times)
                    row = dict(method=name, batch=B, prompts=kind, n_prompts=len(all_prompts), temperature=T, tokens_per_s=tps,
                               warmup_s=warm, times_s=times)
                    if T == 0 and ref is not None:
                        row["token_match"], row["first_divergence"] = match_rate(out, ref)
                    results.append(row)
            here = [r for r in results if (r["batch"], r.get("prompts"), r["temperature"]) == (B, kind, T) and "tokens_per_s" in r]
            for r in here:
                if base_tps:
                    r["vs_our_plain"] = r["tokens_per_s"] / base_tps
            compare_auto_with_fixed(here)
        eng = engine_for(model, B)  # the default engine (compiled blocks, graphs on CUDA)
        step_costs[B] = [dict(step=key[0], detail=str(key[1]), temperature=key_temperature(key[-1]), live=live, seconds=v)
                         for (key, live), v in eng.runner.costs.items()]
    # bf16 exactness: how a verification pass of each width drifts from one-token steps, on the first
    # prompt and our own greedy continuation of it (bench/numerics.py).
    first = next(iter(sets.values()))[0]
    cont, _ = generate(model, [first], args.new_tokens)
    widths = sorted({model.depth + 1, args.tree_nodes, 32} if model.depth else {5, 16, 32})
    deviation = width_deviation(model, (first + cont[0])[: model.config.max_seq_len], widths, start=min(16, len(first)))
    return dict(results=results, step_costs_s=step_costs, width_deviation=deviation)


PEERS = {"transformers generate": "default", "transformers static cache": "static",
         "transformers prompt lookup": "prompt-lookup", "transformers use_mtp": "use-mtp"}
"""transformers' decoders that `--peers` names."""

CHAT_PROMPTS = [
    [{"role": "user", "content": "Write a Python function that checks whether a string is a palindrome."}],
    [{"role": "user", "content": "Explain what a Python generator is, with a short example."}],
    [{"role": "user", "content": "How do I read a CSV file and print the sum of its second column in Python?"}],
    [{"role": "user", "content": "Give three tips for writing clear commit messages."}],
    [{"role": "user", "content": "Write a function that merges two sorted lists into one sorted list."}],
    [{"role": "user", "content": "What is the difference between a list and a tuple?"}],
]
"""Chat prompts for `--chat`, rendered through the model's chat template (`Tokenizer.chat`)."""


def decode_groups(generate, model, groups: list[list[list[int]]], new_tokens: int, temperature: float, kw: dict):
    """Our decoding of each group of prompts in turn (one batch each): (outputs of all, their
    statistics combined: tau and acceptance over every group, not the last group's)."""
    from multitoken.decoding.api import GenerationStats

    out, parts = [], []
    for g in groups:
        o, st = generate(model, g, new_tokens, temperature=temperature, seed=1, **kw)
        out += o
        parts.append(st)
    return out, GenerationStats.combine(parts)


def key_temperature(s) -> float:
    """The temperature a step's cost was measured at: a strategy's key holds a `Sampling` (one
    temperature) or a `RowSampling`, which names only greedy or not; its per-row values are the
    ones the last call set (bench decode runs one temperature at a time)."""
    t = s.temperature
    if isinstance(t, (int, float)):
        return float(t)
    return 0.0 if s.greedy else float(t.max())


def compare_auto_with_fixed(here: list[dict]) -> None:
    """Give the automatic length's row (`ours chain auto`) of one (batch, prompts, temperature) group
    `vs_best_fixed` and `best_fixed`: its speed over the fastest fixed-length chain it could have
    picked (`ours chain`, `ours chain:K`; not itself, not the reduced-vocabulary rows)."""
    fixed = [r for r in here if r["method"] == "ours chain" or r["method"].startswith("ours chain:")]
    for r in here:
        if r["method"] == "ours chain auto" and fixed:
            best = max(fixed, key=lambda f: f["tokens_per_s"])
            r["vs_best_fixed"], r["best_fixed"] = r["tokens_per_s"] / best["tokens_per_s"], best["method"]


def relative_step_costs(step_costs: dict) -> dict:
    """Per batch size: each step kind's measured cost over a plain step's at the same temperature and live bucket."""
    out = {}
    for B, rows in step_costs.items():
        plain = {(r["temperature"], r["live"]): r["seconds"] for r in rows if r["step"] == "plain"}
        out[B] = {f"{r['step']}:{r['detail']}@{r['live']},T={r['temperature']:g}": r["seconds"] / plain[(r["temperature"], r["live"])]
                  for r in rows if r["step"] != "plain" and (r["temperature"], r["live"]) in plain}
    return out


def plot(data: dict, path: Path) -> None:
    """Tokens/s per method (log scale) and speed-up over our plain decoding, per (batch, temperature)."""
    from multitoken.viz import pyplot

    plt = pyplot(path.name)
    if plt is None:
        return

    rows = [r for r in data["results"] if "tokens_per_s" in r]
    groups = sorted({(r["batch"], r.get("prompts", ""), r["temperature"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.6 * len(groups) + 3), 7), sharex=True)
    w = 0.8 / max(len(methods), 1)
    for ax, key in zip(axes, ("tokens_per_s", "vs_our_plain")):
        for i, m in enumerate(methods):
            xs, ys = [], []
            for j, g in enumerate(groups):
                v = [r.get(key) for r in rows if r["method"] == m and (r["batch"], r.get("prompts", ""), r["temperature"]) == g]
                if v and v[0] is not None:
                    xs.append(j + i * w)
                    ys.append(v[0])
            ax.bar(xs, ys, w, label=m)
    axes[0].set(ylabel="tokens/s (median)", yscale="log")
    axes[1].set(ylabel="speed-up vs our plain decoding")
    axes[1].axhline(1.0, color="k", lw=0.6)
    axes[1].set_xticks([j + 0.4 - w / 2 for j in range(len(groups))], [f"B={b}, {k}, T={t:g}" for b, k, t in groups])
    axes[0].set_title(f"{data['model'][:80]} ({data.get('machine', {}).get('device', '')}, {data.get('dtype', '')})",
                      fontsize=9)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(data: dict) -> str:
    lines = [f"{'method':36s} {'B':>3s} {'set':>4s} {'T':>4s} {'tok/s':>9s} {'vs plain':>8s} {'tau':>5s} {'match':>6s} {'warm-up s':>9s}"]
    for r in data["results"]:
        if "error" in r:
            lines.append(f"{r['method']:36s} {r['batch']:3d} {r.get('prompts', ''):>4s} {r['temperature']:4g} {'error: ' + r['error'][:60]}")
            continue
        lines.append(f"{r['method']:36s} {r['batch']:3d} {r.get('prompts', ''):>4s} {r['temperature']:4g} {r['tokens_per_s']:9.1f} "
                     f"{r.get('vs_our_plain', float('nan')):8.2f} {r.get('tau', float('nan')):5.2f} "
                     f"{r.get('token_match', float('nan')):6.3f} {r['warmup_s']:9.1f}")
    for d in data.get("width_deviation", []):
        if d["width"] > 1:
            lines.append(f"pass of {d['width']} tokens vs one-token steps: max |logit diff| {d['max_abs_logit_diff']:.3g}, "
                         f"argmax changed at {d['argmax_flips']} of {d['positions']} positions")
    for B, rel in data.get("relative_step_costs", {}).items():
        if rel:
            lines.append(f"step cost vs plain (B={B}): " + ", ".join(f"{k} {v:.2f}x" for k, v in sorted(rel.items())))
    return "\n".join(lines)
