"""Acceptance per position of several heads files on the same prompts, over the whole prompt set.

For each heads file: a greedy chain of k drafts over every prompt of each set (batch 1, fixed k),
its output checked against plain greedy decoding, and tau and acceptance per position from the
counts summed over the set (`GenerationStats.combine`). No timing: acceptance only, so a CPU gives
what a GPU in float32 gives (the same greedy text) and the heads files can be compared on a busy
machine.

    PYTHONPATH=src python bench/heads_acceptance.py --run RUN \
        --heads drafts_gpu/self-s4.safetensors:self-s4 src/multitoken/assets/...:self-kl2 \
        --sets humaneval,chat --prompts 8 --new-tokens 64 --out bench/results/drafts_gpu2/acceptance_fp32_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from multitoken.provenance import load_average, provenance
from multitoken.data.evalsets import prompt_ids
from multitoken.decoding import generate
from multitoken.decoding.api import GenerationStats
from multitoken.io.heads_file import attach_heads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the backbone's run directory")
    p.add_argument("--heads", nargs="+", required=True, metavar="FILE:LABEL", help="heads files to compare")
    p.add_argument("--sets", default="humaneval,chat")
    p.add_argument("--prompts", type=int, default=8, help="prompts spread over each set")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import multitoken.decoding.runner as runner

    runner.CPU_COSTS = False  # a fixed draft length: every position is drafted at every step
    record = provenance()
    rows, plain = [], {}
    for spec in args.heads:
        path, label = spec.rsplit(":", 1)
        model, tok = attach_heads(args.run, path, max_seq_len=1024)
        model = model.float().eval()
        for name in args.sets.split(","):
            prompts = prompt_ids(name, tok, args.prompts)
            if name not in plain:
                plain[name] = [generate(model, [q], args.new_tokens)[0][0] for q in prompts]
            outs, parts = [], []
            for q in prompts:
                o, st = generate(model, [q], args.new_tokens, mode="spec", draft=model.depth)
                outs.append(o[0])
                parts.append(st)
            st = GenerationStats.combine(parts)
            rows.append(dict(heads=label, file=path, set=name, prompts=len(prompts), draft=model.depth, tau=st.tau,
                             acceptance=st.acceptance_per_position, drafted=st.drafted, accepted=st.accepted,
                             identical_to_plain=outs == plain[name]))
            r = rows[-1]
            print(f"{label:10s} {name:10s} tau {r['tau']:.2f} acceptance {' '.join(f'{a:.2f}' for a in r['acceptance'])} "
                  f"identical {r['identical_to_plain']}", flush=True)
    record.update(new_tokens=args.new_tokens, dtype="float32", rows=rows, load_after=load_average())
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
