"""One GPU call: the decoding engine's exactness on GPU-sized models, then its speed side by side.

    PYTHONPATH=src python3 bench/gpu_engine.py --out $OUT

1. Exactness (random weights, `small` preset with 3 heads of each family, float32 and bf16,
   compiled blocks and CUDA graphs, the CUDA defaults): greedy chain and tree output against plain greedy output of the same model,
   batch 1 and 8: token-match rate and first divergence. In float32 they must be identical.
2. Speed: `multitoken bench decode` on a SmolLM2-135M-shaped model (random weights, 8192
   context, medusa:3 heads) in bf16, against transformers on the same weights.
Writes gpu_engine.json (+ decode.json/decode.png from the bench).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from multitoken.bench.decode import match_rate
from multitoken.config import HeadsConfig, ModelConfig
from multitoken.decoding.api import generate
from multitoken.model import Transformer


def exactness(dtype: torch.dtype, new_tokens: int) -> list[dict]:
    rows = []
    for kind in ("parallel", "sequential", "medusa"):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset("small", heads=HeadsConfig(kind, 3))).cuda().to(dtype).eval()
        with torch.no_grad():  # larger weights than init: peaked, varied logits
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.05)
        for B in (1, 8):
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(3, model.config.vocab_size, (B, 32), generator=g).tolist()
            ref, _ = generate(model, prompts, new_tokens)
            modes = [("spec", dict(draft=3)), ("spec", dict(draft=1))]
            modes.append(("tree", dict(tree=16)) if kind != "sequential" else ("tree", dict(tree=4, draft=1)))
            for mode, kw in modes:
                out, st = generate(model, prompts, new_tokens, mode=mode, **kw)
                rate, first = match_rate(out, ref)
                rows.append(dict(kind=kind, dtype=str(dtype), batch=B, mode=mode, **{k: str(v) for k, v in kw.items()},
                                 token_match=rate, first_divergence=first, tau=st.tau))
                print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-exactness", action="store_true")
    ap.add_argument("--exact-tokens", type=int, default=128)
    ap.add_argument("--bench-args", default="--preset smollm2-135m --heads medusa:3 --max-seq-len 8192 "
                    "--batch 1,16,64 --temperature 0,1 --new-tokens 256 --repeats 3 --hf-max-batch 1")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = dict(command="PYTHONPATH=src python3 bench/gpu_engine.py " + " ".join(sys.argv[1:]),
                  gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    if not args.skip_exactness:
        result["exactness"] = exactness(torch.float32, args.exact_tokens) + exactness(torch.bfloat16, args.exact_tokens)
        result["exactness_seconds"] = time.perf_counter() - t0
        (out / "gpu_engine.json").write_text(json.dumps(result, indent=1) + "\n")
    from multitoken.cli import main as cli

    cli(["bench", "decode", *args.bench_args.split(), "--out", str(out)])
    result["seconds"] = time.perf_counter() - t0
    (out / "gpu_engine.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
