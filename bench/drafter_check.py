"""Is a drafter weak, or does drafting feed it something other than what it trained on?

For each prompt: decode it plainly (greedy), then on that exact text compare
- teacher-forced agreement per depth: a full forward pass of model + heads over prompt + output
  (what training computes), depth d at position i predicting the greedy token at i+d+1;
- acceptance while decoding the same prompt with a chain of 1 and a chain of k drafts.
If drafting matched training, depth 1's acceptance with one draft equals its teacher-forced
agreement on the model's own greedy text (both count how often depth 1's argmax is the next
greedy token after the same committed text); a gap means a mismatch, equality with a low value
means a weak drafter.

    PYTHONPATH=src python bench/drafter_check.py --run RUN --heads-file HEADS --sets chat,humaneval \
        --prompts 3 --new-tokens 96 --out bench/results/drafts_gpu/drafter_check_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from multitoken.provenance import provenance
from multitoken.data.evalsets import prompt_ids
from multitoken.decoding import generate
from multitoken.io.heads_file import attach_heads


@torch.no_grad()
def teacher_forced(model, seq: list[int], start: int) -> list[float]:
    """Per depth d >= 1: the share of positions i >= start - 1 whose depth-d argmax is seq[i+d+1]."""
    x = torch.tensor([seq])
    hs = model(x)  # [main, d1, ..., dD], each (1, T, C)
    out = []
    for d in range(1, len(hs)):
        pred = model.logits(hs[d][0], d).argmax(-1)  # (T,)
        idx = torch.arange(start - 1, len(seq) - d - 1)
        out.append(float((pred[idx] == x[0, idx + d + 1]).float().mean()) if idx.numel() else float("nan"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the backbone's run directory")
    p.add_argument("--heads-file", required=True, help="sequential heads to check")
    p.add_argument("--sets", default="chat,humaneval")
    p.add_argument("--prompts", type=int, default=3, help="prompts spread over each set")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import multitoken.decoding.runner as runner

    runner.CPU_COSTS = False  # fixed draft lengths: acceptance at every position is measured
    model, tok = attach_heads(args.run, args.heads_file, max_seq_len=1024)
    model = model.float().eval()
    k = model.depth
    rows = []
    for name in args.sets.split(","):
        for prompt in prompt_ids(name, tok, args.prompts):
            out, _ = generate(model, prompt, args.new_tokens, mode="ntp")
            seq = prompt + out[0]
            tf = teacher_forced(model, seq, len(prompt))
            one, s1 = generate(model, prompt, args.new_tokens, mode="spec", draft=1)
            full, sk = generate(model, prompt, args.new_tokens, mode="spec", draft=k)
            assert one[0] == out[0] and full[0] == out[0], "speculative greedy output differs from plain"
            rows.append({"set": name, "prompt_tokens": len(prompt), "new_tokens": len(out[0]),
                         "teacher_forced_per_depth": tf, "decode_draft1_acceptance": s1.acceptance_per_position,
                         f"decode_draft{k}_acceptance": sk.acceptance_per_position, f"decode_draft{k}_tau": sk.tau})
            print(json.dumps(rows[-1]), flush=True)
            write(args, rows, complete=False)  # a run cut short keeps what it measured
    write(args, rows, complete=True)
    return 0


def write(args, rows: list[dict], complete: bool) -> None:
    summary = {}
    for name in args.sets.split(","):
        rs = [r for r in rows if r["set"] == name]
        if rs:
            summary[name] = {"prompts": len(rs),
                             "teacher_forced_depth1": sum(r["teacher_forced_per_depth"][0] for r in rs) / len(rs),
                             "decode_draft1_acceptance": sum(r["decode_draft1_acceptance"][0] for r in rs) / len(rs)}
    result = {**provenance(sys.argv), "run": args.run, "heads_file": args.heads_file, "dtype": "float32",
              "complete": complete, "summary": summary, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if complete:
        print(json.dumps(summary))


if __name__ == "__main__":
    raise SystemExit(main())
