"""How far a pass over q tokens drifts from one-token steps, in the model's own dtype.

Speculative greedy output equals plain greedy output only while the verification pass (q = k+1
tokens for a chain, N nodes for a tree) gives the same argmax as plain one-token steps. In float32
that held everywhere we looked; in bfloat16 the H200 kept 13 of 14 prompts identical for chains
but only 6 of 14 for trees of 16 and 32 nodes (issue 23). On the CPU every pass width gives
bit-identical logits (kernels compute each row alike), so trees and chains match plain decoding
equally there: the GPU's GEMM picks other kernels (tiles, split-K, accumulation order) as the
number of rows grows, and wider passes round differently. `width_deviation` measures it: the
same tokens teacher-forced through passes of each width, against one-token steps.
"""

from __future__ import annotations

import torch

from multitoken.model.kv_cache import KVCache


@torch.no_grad()
def width_deviation(model, tokens: list[int], widths: list[int], start: int = 16) -> list[dict]:
    """For each pass width w: the largest |logit difference| against one-token steps, and how many
    positions' argmax changed, over tokens[start:] fed w at a time after a prefill of tokens[:start].

    Returns:
        [{"width", "max_abs_logit_diff", "argmax_flips", "positions"}] (width 1 is the reference).
    """
    p = next(model.parameters())
    idx = torch.tensor([tokens], device=p.device)
    T = idx.shape[1]
    out, ref = [], None
    for w in [1] + [w for w in widths if w != 1]:
        cache = KVCache.for_model(model.config, 1, dtype=p.dtype, device=p.device)
        model(idx[:, :start], cache=cache, heads=False)
        cache.advance(start)
        pieces = []
        for a in range(start, T, w):
            b = min(a + w, T)
            pieces.append(model.logits(model(idx[:, a:b], cache=cache, heads=False)[0]).float())
            cache.advance(b - a)
        lg = torch.cat(pieces, 1)[0]  # (T - start, V)
        if ref is None:
            ref = lg
        out.append(dict(width=w, max_abs_logit_diff=float((lg - ref).abs().max()),
                        argmax_flips=int((lg.argmax(-1) != ref.argmax(-1)).sum()), positions=T - start))
    return out
