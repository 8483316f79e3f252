"""Why a draft tree barely accepts at temperature 1, measured on SmolLM2-135M with the shipped heads (CPU).

The model samples a few texts at temperature 1 (plain decoding); then, teacher-forced on them, at
every position the main head's distribution p (next token) is compared with depth 1's draft
distribution q for the same token:
- a chain's acceptance of its sampled draft: sum_t min(p(t), q(t)) (= 1 - TV(p, q));
- a tree whose root has the W top tokens of q as children (the tree we had at temperature > 0,
  where one token drawn from p is followed): the mass of those children under p;
- a tree whose W children are drawn from q without replacement and verified by recursive
  rejection sampling (decoding/verify.py's `verify_tree_sampling`): its acceptance at the root,
  by Monte Carlo over draws.
Prints a table and writes bench/results/tree_sampling_acceptance.json.

    PYTHONPATH=src python bench/tree_sampling_acceptance.py [--texts 4 --tokens 96 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def rrs_accept(p: torch.Tensor, q: torch.Tensor, W: int, draws: int, g: torch.Generator) -> torch.Tensor:
    """P(one of W children drawn from q without replacement is accepted) per row of p, q (n, V), Monte Carlo."""
    n, V = p.shape
    p = p.repeat_interleave(draws, 0)
    qq = q.repeat_interleave(draws, 0).clone()
    r = p.clone()
    acc = torch.zeros(n * draws, dtype=torch.bool)
    for _ in range(W):
        Q = qq / qq.sum(-1, keepdim=True)
        c = torch.multinomial(Q, 1, generator=g)[:, 0]
        u = torch.rand(n * draws, generator=g)
        rc, Qc = r.gather(1, c[:, None])[:, 0], Q.gather(1, c[:, None])[:, 0]
        ok = ~acc & (u * Qc < rc)
        acc |= ok
        r = (r - Q).clamp(min=0)
        r = r / r.sum(-1, keepdim=True).clamp(min=1e-30)
        qq.scatter_(1, c[:, None], 0.0)
    return acc.view(n, draws).float().mean(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/tree_sampling_acceptance.json")
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="instead: tau of chain, top-k tree and sampled tree through generate, N tokens per text")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from multitoken.decoding.api import generate
    from multitoken.demo import CHAT, PROMPTS, SMOLLM2_HEADS
    from multitoken.io.heads_file import attach_heads
    from multitoken.io.smollm2 import smollm2_run_dir

    model, tok = attach_heads(smollm2_run_dir(), SMOLLM2_HEADS, max_seq_len=1024)
    model.eval()
    prompts = [tok.encode(p) for p in PROMPTS] + [tok.chat([{"role": "user", "content": c}]) for c in CHAT]
    prompts = prompts[: args.texts]
    t0 = time.perf_counter()
    if args.generate:
        return tau_through_generate(model, prompts, args)
    rows = {"min(p,q) chain": []}
    Ws = (1, 2, 4, 8)
    for W in Ws:
        rows[f"top-{W} of q, p-mass (old tree)"] = []
        rows[f"{W} sampled children, RRS"] = []
    g = torch.Generator().manual_seed(0)
    for i, prompt in enumerate(prompts):
        out, _ = generate(model, [prompt], args.tokens, temperature=1.0, seed=i)
        seq = torch.tensor([prompt + out[0]])
        with torch.no_grad():
            hs = model(seq)
            p = model.logits(hs[0][0]).float().softmax(-1)[len(prompt):-1]  # predicts token i+1 from position i
            q = model.logits(hs[1][0], 1).float().softmax(-1)[len(prompt) - 1:-2]  # depth 1 at i-1: the same token
        rows["min(p,q) chain"] += torch.minimum(p, q).sum(-1).tolist()
        top = q.topk(max(Ws), -1).indices
        for W in Ws:
            rows[f"top-{W} of q, p-mass (old tree)"] += p.gather(1, top[:, :W]).sum(-1).tolist()
            rows[f"{W} sampled children, RRS"] += torch.cat([rrs_accept(p[i:i + 16], q[i:i + 16], W, 8, g)
                                                             for i in range(0, len(p), 16)]).tolist()
        print(f"text {i + 1}/{len(prompts)}: {len(p)} positions, {time.perf_counter() - t0:.0f} s", flush=True)
    summary = {k: sum(v) / len(v) for k, v in rows.items()}
    n = len(rows["min(p,q) chain"])
    print(f"root acceptance at temperature 1, {n} positions of {len(prompts)} sampled texts ({time.perf_counter() - t0:.0f} s):")
    for k, v in summary.items():
        print(f"  {k:34s} {v:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(
        command="PYTHONPATH=src python bench/tree_sampling_acceptance.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        model="SmolLM2-135M-Instruct + shipped sequential:4:shared heads", temperature=1.0, positions=n,
        root_acceptance=summary), indent=1) + "\n")


def tau_through_generate(model, prompts, args) -> None:
    """tau at temperature 1 of the chain (all heads), the top-k tree and the sampled tree (16 nodes)."""
    from multitoken.decoding.api import engine_for, generate
    from multitoken.decoding.strategies import Tree

    out = {}
    for name, kw in (("chain", dict(mode="spec")), ("sampled tree", dict(mode="tree", tree=16)),
                     ("top-k tree", dict(mode="tree", tree=16))):
        taus = []
        for i, p in enumerate(prompts):
            if name == "top-k tree":  # the tree before issue 23: top-R candidates, one draw from p per node
                for st in engine_for(model, 1)._strategies.values():
                    if isinstance(st, Tree):
                        st.sampled = False
            _, stats = generate(model, [p], args.generate, temperature=1.0, seed=i, **kw)
            taus.append(stats.tau)
        out[name] = sum(taus) / len(taus)
        print(f"  {name:14s} tau {out[name]:.2f}", flush=True)
    Path(args.out).with_name("tree_sampling_tau.json").write_text(json.dumps(dict(
        command="PYTHONPATH=src python bench/tree_sampling_acceptance.py --generate " + str(args.generate) + f" --texts {args.texts}",
        model="SmolLM2-135M-Instruct + shipped sequential:4:shared heads", temperature=1.0, tau=out), indent=1) + "\n")


if __name__ == "__main__":
    main()
