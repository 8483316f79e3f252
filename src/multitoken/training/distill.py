"""Self-distillation targets for every depth, with the teacher's distribution computed once per batch.

Heads on a frozen model learn the model itself: depth k at position i is trained towards the main
head's distribution at position i+k, p_teacher(. | t_<=i+k), the distribution of t_{i+k+1} that
the model will verify the draft against. Every depth reads the same teacher rows, only shifted,
so the teacher's logits (the LM head over the main state) are computed once per chunk of
positions and shared by all depths, instead of once per depth.

Loss: KL(p_teacher || q_depth) per valid target, summed with each depth's scale (its weight over
its count of valid targets). Its gradient with respect to the student's logits is
``scale * (q - p_teacher)``, the same as the cross-entropy to the teacher's distribution; the KL
differs from that cross-entropy by the teacher's entropy only, so a perfect head scores 0.

Memory: the positions are cut into chunks along T; per chunk the teacher's (B, n+D, V) rows and
one depth's (B, n, V) student logits are alive, never (B, T, V) for several depths. As in
loss.py's chunked kernel the gradients are computed in forward and only scaled in backward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

# Float32 logit elements per chunk: ~64 MB on a CPU (cache-friendly), ~1 GB on a GPU, where the
# ~20 kernel launches per chunk and depth, not memory, bound small chunks.
CHUNK_ELEMENTS_CPU, CHUNK_ELEMENTS_GPU = 1 << 24, 1 << 28


def chunk_positions(batch: int, vocab: int, depth: int, cuda: bool, chunk_rows: int = 0) -> int:
    """Positions per chunk: `chunk_rows` rows (B * n) when given, else the device's budget."""
    rows = chunk_rows or (CHUNK_ELEMENTS_GPU if cuda else CHUNK_ELEMENTS_CPU) // vocab
    return max(1, rows // batch - depth)


def teacher_terms(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's rows (n, V): probabilities, argmax, and sum_v p log p (minus the entropy)."""
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    return p, logp.argmax(-1), torch.linalg.vecdot(p, logp)


def depth_terms(logits: Tensor, p: Tensor, neg_h: Tensor, t_arg: Tensor, valid: Tensor, scale: Tensor,
                grad: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """One depth's chunk: summed KL over valid rows, agreements with the teacher's argmax, and
    d(scale * KL)/dlogits in the logits' dtype (None without `grad`).

    Args:
        logits: (n, V) the student's logits (bf16 under autocast; the math runs in float32).
        p, neg_h, t_arg: the teacher's rows (`teacher_terms`), aligned with `logits`.
        valid: (n,) bool; scale: () weight over valid count.
    """
    x = logits.to(p.dtype)
    lse = torch.logsumexp(x, -1)
    kl = neg_h - torch.linalg.vecdot(p, x) + lse  # sum p log p - sum p log q, log q = x - lse
    kl_sum = torch.where(valid, kl, 0.0).sum()
    ok = ((x.argmax(-1) == t_arg) & valid).sum()
    if not grad:
        return kl_sum, ok, None
    g = (torch.exp(x - lse[:, None]) - p) * (scale * valid)[:, None]  # softmax - p, scaled
    return kl_sum, ok, g.to(logits.dtype)


@functools.cache
def _compiled():
    """`teacher_terms` and `depth_terms` under torch.compile (their elementwise passes fuse; dynamic
    shapes: the last chunk is shorter)."""
    return torch.compile(teacher_terms, dynamic=True), torch.compile(depth_terms, dynamic=True)


class _DistillKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, teacher_h, teacher_w, valid, scales, chunk, compiled, *students):
        hs, ws = students[0::2], students[1::2]
        B, T, _ = teacher_h.shape
        D = len(hs)
        need_h = [ctx.needs_input_grad[6 + 2 * j] for j in range(D)]
        need_w = [ctx.needs_input_grad[7 + 2 * j] for j in range(D)]
        grad_h = [torch.zeros_like(h) if n else None for h, n in zip(hs, need_h)]
        grad_w: dict[int, Tensor] = {}  # one float32 buffer per distinct matrix (a shared LM head sums)
        for w, n in zip(ws, need_w):
            if n and id(w) not in grad_w:
                grad_w[id(w)] = torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
        kl_sum = torch.zeros(D, dtype=torch.promote_types(teacher_h.dtype, torch.float32), device=teacher_h.device)
        correct = torch.zeros(D, dtype=torch.float32, device=teacher_h.device)
        tw = teacher_w.to(teacher_h.dtype)
        acc = torch.promote_types(teacher_h.dtype, torch.float32)  # float32 logits (float64 stays float64)
        teacher_fn, depth_fn = (_compiled() if compiled else (teacher_terms, depth_terms))
        for s in range(0, T, chunk):
            e, te = min(s + chunk, T), min(s + chunk + D, T)
            # Rows are time-major ((position, batch) order), so each depth's shifted slice of the
            # teacher is a contiguous view, not a copy of (B * m, V) floats.
            th = teacher_h[:, s:te].transpose(0, 1).flatten(0, 1)  # ((te-s) * B, C)
            t_p, t_arg, t_neg_h = teacher_fn((th @ tw.t()).to(acc))  # the teacher, once for all depths
            for j in range(D):
                k = j + 1
                m = min(e, T - k) - s  # student positions of this chunk whose teacher row exists
                if m <= 0:
                    continue
                hk = hs[j][:, s : s + m].transpose(0, 1).flatten(0, 1)  # (m * B, C)
                wk = ws[j].to(hk.dtype)
                rows = slice(k * B, (k + m) * B)
                v = valid[j][:, s : s + m].t().flatten()
                need = need_h[j] or need_w[j]
                kl, ok, g = depth_fn(hk @ wk.t(), t_p[rows], t_neg_h[rows], t_arg[rows], v, scales[j], need)
                kl_sum[j] += kl
                correct[j] += ok
                if need:
                    if need_h[j]:
                        grad_h[j][:, s : s + m] = (g @ wk).view(m, B, -1).transpose(0, 1)
                    if need_w[j]:
                        # Under autocast a bf16 matmul (float32 accumulation inside), summed in float32:
                        # casting the (m*B, V) gradient to float32 first would cost a pass and a slower matmul.
                        grad_w[id(ws[j])] += (g.t() @ hk).to(acc)
        loss = (kl_sum * scales.to(kl_sum.dtype)).sum()
        ctx.grads = (grad_h, [grad_w.get(id(w)) if n else None for w, n in zip(ws, need_w)],
                     [w.dtype for w in ws], [id(w) for w in ws])
        ctx.mark_non_differentiable(kl_sum, correct)
        return loss, kl_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, _kl, _ok):
        grad_h, grad_w, w_dtypes, w_ids = ctx.grads
        out: list[Tensor | None] = [None] * 6
        given: set[int] = set()
        for j, (gh, gw) in enumerate(zip(grad_h, grad_w)):
            out.append(None if gh is None else gh * grad_loss.to(gh.dtype))
            # A matrix shared by several depths holds its whole gradient once; autograd sums the
            # gradients of every argument position, so the others get none.
            if gw is None or w_ids[j] in given:
                out.append(None)
            else:
                given.add(w_ids[j])
                out.append((gw * grad_loss).to(w_dtypes[j]))
        ctx.grads = None
        return tuple(out)


def distill_kl(teacher_h: Tensor, teacher_w: Tensor, students: list[Tensor], student_ws: list[Tensor], valid: Tensor,
               scales: Tensor, chunk_rows: int = 0, compiled: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """sum_k scales[k-1] * sum_i KL(softmax(teacher_h[:, i+k] @ teacher_w.T) || softmax(students[k-1][:, i] @ W_k.T)).

    Args:
        teacher_h: (B, T, C) the main head's states (no gradient flows into them).
        teacher_w: (V, C) the main head's unembedding.
        students: D states (B, T, C), depth k = 1..D.
        student_ws: D unembeddings (V, C), one per depth (the same tensor when shared).
        valid: (D, B, T) bool: where depth k's target exists (`loss.shift_targets` != IGNORE_INDEX).
        scales: (D,) per-depth weight over valid count.
        chunk_rows: rows (B * positions) per chunk; 0 picks the device's budget.
        compiled: run each chunk's elementwise math under torch.compile (`_compiled`; for GPUs,
            where the passes over (n, V) floats, not the matmuls, bound an eager chunk).
    Returns:
        (loss, differentiable; (D,) summed KL per depth; (D,) top-1 agreements with the teacher's argmax).
    """
    B, T, _ = teacher_h.shape
    chunk = chunk_positions(B, teacher_w.shape[0], len(students), teacher_h.is_cuda, chunk_rows)
    args = [a for pair in zip(students, student_ws) for a in pair]
    return _DistillKL.apply(teacher_h.detach(), teacher_w.detach(), valid, scales, chunk, compiled, *args)


def naive_distill_kl(teacher_h: Tensor, teacher_w: Tensor, students: list[Tensor], student_ws: list[Tensor],
                     valid: Tensor, scales: Tensor, chunk_rows: int = 0, compiled: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Reference for `distill_kl`: full logits per depth and autograd."""
    t_logits = (teacher_h.detach() @ teacher_w.detach().to(teacher_h.dtype).t()).float()  # (B, T, V)
    t_logp = torch.log_softmax(t_logits, -1)
    T = teacher_h.shape[1]
    loss, kls, oks = teacher_h.new_zeros((), dtype=torch.float32), [], []
    for j, (h, w) in enumerate(zip(students, student_ws)):
        k = j + 1
        logq = torch.log_softmax((h @ w.to(h.dtype).t()).float(), -1)[:, : T - k]
        lp = t_logp[:, k:]
        kl = F.kl_div(logq, lp, log_target=True, reduction="none").sum(-1)  # (B, T-k)
        v = valid[j][:, : T - k]
        kls.append(torch.where(v, kl, 0.0).sum())
        oks.append(((logq.argmax(-1) == lp.argmax(-1)) & v).sum().float())
        loss = loss + kls[-1] * scales[j]
    return loss, torch.stack(kls).detach(), torch.stack(oks)
