"""The multi-token-prediction loss: target alignment, per-depth weights, memory-efficient CE.

Alignment (docs/design.md has the table): the data loader yields plain windows w of T+1 tokens;
the model reads w[:, :T]. At depth k (k=0 is the main head) position i is trained to predict
w[i+k+1]. A target that falls past the window, or in another document than position i (documents
are packed and separated by EOS; an EOS belongs to the document it ends) is IGNORE_INDEX: never
wrapped around, never crossing a boundary. Each depth's cross-entropy is summed and divided by
that depth's own count of valid targets.

Memory: the (N, V) logits of a depth are never materialised whole. `linear_cross_entropy`
computes the loss and its gradients chunk by chunk in the forward pass (the backward only scales
the stored gradients), so peak memory is one chunk of logits whatever the number of heads.

Loss kernels (`LOSS_KERNELS`, ``--loss-kernel``): ``chunked`` is the code below (any device);
``naive`` builds full logits (the reference); ``liger`` runs each depth's linear + CE through
liger-kernel's fused Triton kernel (CUDA only, an optional package, imported on first use): one
call per depth with ``reduction="sum"``, the depth's weight / valid count applied as a scalar on
the result (its backward scales the gradients stored in forward, so the weighting is exact), and
per-token accuracy from the kernel's own argmax (first maximal index, as ``torch.argmax``).
Self-distillation targets (a soft distribution, distill.py) have their own chunked kernel under
``chunked``, ``auto`` and ``liger``: the teacher's distribution is computed once per chunk of
positions for all depths. ``auto`` is liger on CUDA when it imports, else chunked.

Loss mask: a (B, T+1) bool window aligned with the tokens marks tokens that must not be targets
(prompts and user turns of chat data the model wrote only partly); `shift_targets` ignores a
position whose target token is masked, at every depth, and each depth's count shrinks with it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from multitoken.config import LOSS_KERNELS, SCHEDULE_VALUE, parse_schedule, parse_weights
from multitoken.model.heads import default_loss_weights
from multitoken.errors import UserError
from multitoken.training.distill import distill_kl, naive_distill_kl

IGNORE_INDEX = -100


def shift_targets(window: Tensor, depth: int, eos_id: int | None = None, loss_mask: Tensor | None = None) -> Tensor:
    """Targets of depth `depth` for the inputs ``window[:, :-1]``.

    Args:
        window: (B, T+1) token ids.
        depth: 0 for the next token, k for the token k+1 places ahead.
        eos_id: document separator; None when the window holds a single document.
        loss_mask: optional (B, T+1) bool aligned with `window`: False marks tokens that must not
            be targets (prompts and user turns the model did not write); None trains on all.
    Returns:
        (B, T) long: ``window[:, i+depth+1]`` where it exists in the same document and is not
        masked, else IGNORE_INDEX.
    """
    B, T = window.shape[0], window.shape[1] - 1
    if loss_mask is not None and loss_mask.shape != window.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the token window's shape {tuple(window.shape)}")
    target = torch.full((B, T), IGNORE_INDEX, dtype=torch.long, device=window.device)
    n = T - depth  # positions whose target lies inside the window
    if n <= 0:
        return target
    ahead = window[:, depth + 1 : depth + 1 + n]
    keep = torch.ones_like(ahead, dtype=torch.bool)
    if eos_id is not None:
        is_eos = (window == eos_id).long()
        doc = is_eos.cumsum(1) - is_eos  # EOS counted in the document it closes
        keep = doc[:, :n] == doc[:, depth + 1 : depth + 1 + n]
    if loss_mask is not None:
        keep = keep & loss_mask[:, depth + 1 : depth + 1 + n].bool()  # the target token itself is masked
    target[:, :n] = torch.where(keep, ahead, IGNORE_INDEX)
    return target


@dataclass
class Targets:
    """Every depth's targets of one window, built once per micro-batch (the loss and the trainer's
    exact averaging both read them)."""

    tokens: Tensor
    """(D+1, B*T) long: depth k's `shift_targets`, flattened; IGNORE_INDEX where there is none."""
    counts: Tensor
    """(D+1,) valid targets per depth."""

    @classmethod
    def build(cls, window: Tensor, depth: int, eos_id: int | None = None, loss_mask: Tensor | None = None) -> "Targets":
        """Targets of depths 0..`depth` for ``window[:, :-1]`` (arguments as `shift_targets`)."""
        t = torch.stack([shift_targets(window, k, eos_id, loss_mask).flatten() for k in range(depth + 1)])
        return cls(t, (t != IGNORE_INDEX).sum(1))


def split_batch(batch: Tensor | tuple[Tensor, Tensor] | list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """(tokens (B, T+1), loss mask (B, T+1) or None) from what a loader yields: a token tensor, or
    a (tokens, mask) pair when the data carries a loss mask."""
    if isinstance(batch, Tensor):
        return batch, None
    tokens, mask = batch
    return tokens, mask


LIGER_FIX = "install it (pip install liger-kernel) or pass --loss-kernel chunked"


@functools.cache
def liger_available() -> bool:
    """True when liger-kernel is installed (found without importing it: Triton is slow to import)."""
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_loss_kernel(name: str, device: torch.device | str) -> str:
    """The loss kernel ``--loss-kernel name`` means on `device`: 'auto' -> liger on CUDA when
    liger-kernel is installed, else chunked.

    Raises:
        UserError: an unknown name, or liger asked for without CUDA or without the package (one line).
    """
    if name not in LOSS_KERNELS:
        raise UserError(f"--loss-kernel {name!r}: choose one of {', '.join(LOSS_KERNELS)}")
    cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return "liger" if cuda and liger_available() else "chunked"
    if name == "liger" and not cuda:
        raise UserError("--loss-kernel liger needs a CUDA device (Triton kernels): use --loss-kernel chunked on "
                        f"{torch.device(device).type}")
    if name == "liger" and not liger_available():
        raise UserError(f"--loss-kernel liger: the liger-kernel package is not importable; {LIGER_FIX}")
    return name


def schedule_value(schedule: list[tuple[int, float]], step: int) -> float:
    value = schedule[0][1]
    for start, v in schedule:
        if step >= start:
            value = v
    return value


def resolve_weights(spec: str | list | None, kind: str, depth: int) -> list[float] | None:
    """The per-depth weights `MTPLoss` takes for a ``--loss-weights`` value and a model of `depth`
    extra depths; None means DeepSeek's ``1, lambda/D, ...`` form (the lambda schedule applies)."""
    spec = parse_weights(spec)
    if spec is None:
        return default_loss_weights(kind, depth)
    if isinstance(spec, list):
        return [float(w) for w in spec]
    if spec == "equal":
        return [1.0] * (depth + 1)
    if spec == "lambda":
        return None
    if spec.startswith("decay:"):  # DFlash: exp(-(k-1)/gamma) at extra depth k; the main head keeps 1
        gamma = float(spec.partition(":")[2])
        return [1.0] + [math.exp(-(k - 1) / gamma) for k in range(1, depth + 1)]
    ratio = float(spec.partition(":")[2])
    return [ratio**k for k in range(depth + 1)]


@dataclass
class LossOutput:
    """What one loss call returns; per-depth tensors are detached, index 0 is the main head."""

    loss: Tensor
    """Weighted total, differentiable."""
    per_depth_loss: Tensor
    """(D+1,) mean loss per depth over its valid targets: cross-entropy, or the KL to the teacher
    at distilled depths (NaN at 0 when `skip_main`)."""
    per_depth_acc: Tensor
    """(D+1,) top-1 accuracy per depth (against the teacher's argmax when distilling; NaN at 0
    when `skip_main`)."""
    per_depth_count: Tensor
    """(D+1,) valid targets per depth."""


class MTPLoss:
    """Weighted sum of per-depth losses: cross-entropy to the data, or with `distill` the KL to
    the model's own distribution at depths >= 1. Built once per run; each call gets its targets
    (or builds them) and optionally its own weights.

    Args:
        depth: extra depths D (the model's ``config.heads.depth``).
        weights: D+1 explicit weights, main first; None for DeepSeek's ``1, lambda/D, ...``.
        mtp_lambda: lambda schedule when ``weights`` is None (``"0.3,0.1@10000"``).
        eos_id: document separator for `shift_targets`.
        distill: train depths >= 1 towards the main head's distribution at the later position
            (self-distillation for heads on a frozen backbone; distill.py), the teacher's logits
            computed once per chunk of positions for all depths; their per-depth loss is the KL.
        chunk_rows: rows per chunk of the memory-efficient kernels; 0 picks the device's budget.
        kernel: one of `LOSS_KERNELS` (``naive``: full logits, the reference); ``auto`` is
            resolved once per device type (`resolve_loss_kernel`).
        skip_main: leave the main head's loss out (no LM-head matmul, no CE) when it can have no
            gradient (frozen backbone); its per-depth loss and accuracy are NaN. The teacher of
            `distill` is still computed.
        compile: run the distillation kernel's per-chunk elementwise math under torch.compile
            (`distill.distill_kl`'s `compiled`).
    """

    def __init__(self, depth: int, weights: list[float] | None = None, mtp_lambda: str | float = 0.3,
                 eos_id: int | None = None, distill: bool = False, chunk_rows: int = 0, kernel: str = "chunked",
                 skip_main: bool = False, compile: bool = False) -> None:
        if not (isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0):
            raise UserError(f"MTPLoss depth {depth!r}: give the model's number of extra depths (model.depth)")
        if kernel not in LOSS_KERNELS:
            raise UserError(f"loss kernel {kernel!r}: choose one of {', '.join(LOSS_KERNELS)}")
        if weights is not None and len(weights) != depth + 1:
            raise UserError(f"loss weights {weights} need {depth + 1} values (main head first, then one per extra depth)")
        if weights is not None:
            weights = [SCHEDULE_VALUE.check("loss weight", w) for w in weights]
        self.depth, self.weights, self.eos_id = depth, weights, eos_id
        self.schedule = parse_schedule(mtp_lambda)
        self.distill, self.chunk_rows, self.kernel, self.skip_main = distill, chunk_rows, kernel, skip_main
        self.compile = compile
        self._resolved: dict[str, str] = {}

    def depth_weights(self, step: int = 0) -> list[float]:
        if self.weights is not None:
            return list(self.weights)
        lam = schedule_value(self.schedule, step)
        return [1.0] + [lam / self.depth] * self.depth

    def kernel_on(self, device: torch.device | str) -> str:
        """The kernel this loss runs on `device` (``auto`` resolved once per device type)."""
        kind = torch.device(device).type
        if kind not in self._resolved:
            self._resolved[kind] = resolve_loss_kernel(self.kernel, device)
        return self._resolved[kind]

    def __call__(self, model, hiddens: list[Tensor], window: Tensor, step: int = 0, loss_mask: Tensor | None = None, *,
                 targets: Targets | None = None, weights: Tensor | list[float] | None = None) -> LossOutput:
        """Loss of the hidden states `model` returned for ``window[:, :-1]``.

        Args:
            model: the Transformer (for its unembedding matrices).
            hiddens: ``model(window[:, :-1])``, one (B, T, C) per depth.
            window: (B, T+1) token ids.
            step: training step, for the lambda schedule.
            loss_mask: (B, T+1) bool, False where a token must not be a target (`shift_targets`).
            targets: the window's `Targets` when the caller built them already (the trainer).
            weights: (D+1,) weights for this call (the trainer's exact-averaging weights);
                default `depth_weights(step)`.
        """
        D = len(hiddens) - 1
        if D != self.depth:
            raise UserError(f"MTPLoss(depth={self.depth}) was given {D + 1} hidden states (a model of depth {D}): "
                            f"build it as MTPLoss(model.depth)")
        B, T = window.shape[0], window.shape[1] - 1
        n = B * T
        kernel = self.kernel_on(window.device)
        if targets is None:
            targets = Targets.build(window, D, self.eos_id, loss_mask)
        if weights is None:
            weights = self.depth_weights(step)
        w = torch.as_tensor(weights, device=window.device)[: D + 1] if not isinstance(weights, Tensor) else weights[: D + 1]
        counts = targets.counts[: D + 1]
        scales = (w / counts.clamp(min=1)).float()  # (D+1,)
        first = 1 if self.skip_main else 0
        if self.skip_main and (hiddens[0].requires_grad or model.unembed_weight(0).requires_grad):
            raise ValueError("skip_main: the main head's loss has a gradient here (is the backbone frozen?)")
        hard = [k for k in range(first, D + 1) if not (self.distill and k > 0)]
        total = hiddens[0].new_zeros((), dtype=torch.float32)
        ce_sum = torch.zeros(D + 1, device=window.device)
        correct = torch.zeros(D + 1, device=window.device)
        if self.distill and D:
            fn = naive_distill_kl if kernel == "naive" else distill_kl
            valid = (targets.tokens[1 : D + 1] != IGNORE_INDEX).view(D, B, T)
            loss, ce_sum[1:], correct[1:] = fn(hiddens[0], model.unembed_weight(0), hiddens[1:],
                                               [model.unembed_weight(k) for k in range(1, D + 1)], valid, scales[1:],
                                               self.chunk_rows, self.compile)
            total = total + loss
        # Hard depths sharing an unembedding go through one call: the matrix is streamed once.
        groups: dict[int, list[int]] = {}
        for k in hard:
            groups.setdefault(id(model.unembed_weight(k)), []).append(k)
        fn = naive_linear_cross_entropy if kernel == "naive" else linear_cross_entropy
        for ks in groups.values():
            if kernel == "liger":
                for k in ks:  # one call per depth: the depth's scale is a scalar on liger's summed loss
                    loss, ce_sum[k], correct[k] = liger_linear_cross_entropy(hiddens[k].flatten(0, 1),
                                                                             model.unembed_weight(k), targets.tokens[k], counts[k])
                    total = total + loss * scales[k]
                continue
            h = torch.cat([hiddens[k].flatten(0, 1) for k in ks])  # (len(ks) * N, C)
            t = torch.cat([targets.tokens[k] for k in ks])
            scale = torch.cat([scales[k].expand(n) for k in ks])
            loss, ce, ok = fn(h, model.unembed_weight(ks[0]), t, scale, None, None, self.chunk_rows)
            total = total + loss
            for j, k in enumerate(ks):
                ce_sum[k] = ce[j * n : (j + 1) * n].sum()
                correct[k] = ok[j * n : (j + 1) * n].sum()
        if self.skip_main:
            ce_sum[0], correct[0] = float("nan"), float("nan")
        c = counts.clamp(min=1).float()
        return LossOutput(total, ce_sum / c, correct / c, counts)


def liger_linear_cross_entropy(h: Tensor, w: Tensor, t: Tensor, count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Summed CE of ``h @ w.T`` against `t` through liger-kernel's fused kernel (CUDA).

    The kernel computes the gradients during forward, chunk by chunk in the logits' dtype (bf16
    under autocast), accumulating the weight's gradient in float32; its backward multiplies them
    by the upstream gradient (here the depth's scale).

    Args:
        h: (N, C) hidden states; w: (V, C) unembedding; t: (N,) targets or IGNORE_INDEX.
        count: valid targets in `t` (a tensor; liger counts them again itself, with a host sync).
    Returns:
        (summed CE, differentiable; the same detached; correct top-1 predictions, float).
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    out = liger_fused_linear_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX, reduction="sum",
                                           accum_dtype=torch.float32, return_token_accuracy=True)
    # token_accuracy is a mean over valid targets (NaN for none): back to a count.
    correct = torch.nan_to_num(out.token_accuracy.float() * count, nan=0.0)
    return out.loss, out.loss.detach().float(), correct


def _chunk_ce(logits: Tensor, t: Tensor, teacher_logits: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row CE, correctness, and dCE/dlogits for one chunk; logits are float32 (n, V)."""
    valid = t != IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[:, None])
    if teacher_logits is None:
        idx = t.clamp(min=0)
        ce = lse - logits.gather(1, idx[:, None])[:, 0]
        grad = probs.clone()
        grad[torch.arange(len(t), device=t.device), idx] -= 1.0
        ref = idx
    else:
        p_t = torch.softmax(teacher_logits, dim=-1)
        ce = lse - (p_t * logits).sum(-1)
        grad = probs - p_t
        ref = p_t.argmax(-1)
    ce = torch.where(valid, ce, 0.0)
    ok = (logits.argmax(-1) == ref) & valid
    return ce, ok, grad, valid


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, t, scale, teacher_h, teacher_w, chunk_rows):
        N, V = h.shape[0], w.shape[0]
        # ~64 MB of float32 logits per chunk on the CPU; ~1 GB on a GPU, where each chunk's ~15 kernel
        # launches, not memory, bound a small chunk (341 rows at SmolLM2's 49k vocabulary).
        rows = chunk_rows or max(1, (1 << (28 if h.is_cuda else 24)) // V)
        wc = w.to(h.dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        ce_all = torch.empty(N, dtype=torch.float32, device=h.device)
        ok_all = torch.empty(N, dtype=torch.bool, device=h.device)
        for s in range(0, N, rows):
            e = min(s + rows, N)
            hc = h[s:e]
            logits = (hc @ wc.t()).float()  # (n, V): the only chunk of logits alive
            tl = None if teacher_h is None else (teacher_h[s:e] @ teacher_w.to(h.dtype).t()).float()
            ce, ok, g, valid = _chunk_ce(logits, t[s:e], tl)
            ce_all[s:e], ok_all[s:e] = ce, ok
            if need_h or need_w:
                g = (g * (scale[s:e] * valid)[:, None]).to(h.dtype)
                if need_h:
                    grad_h[s:e] = g @ wc
                if need_w:
                    grad_w += g.t().float() @ hc.float()
        loss = (ce_all * scale).sum()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        ctx.mark_non_differentiable(ce_all, ok_all)
        return loss, ce_all, ok_all

    @staticmethod
    def backward(ctx, grad_loss, _ce, _ok):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.w_dtype)
        return gh, gw, None, None, None, None, None


def linear_cross_entropy(h: Tensor, w: Tensor, t: Tensor, scale: Tensor, teacher_h: Tensor | None = None,
                         teacher_w: Tensor | None = None, chunk_rows: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """sum_n scale[n] * CE(h[n] @ w.T, t[n]) without materialising all logits.

    Args:
        h: (N, C) hidden states; w: (V, C) unembedding; t: (N,) targets or IGNORE_INDEX.
        scale: (N,) per-row weight (depth weight / valid count of the row's depth).
        teacher_h, teacher_w: optional teacher states (N, C) and unembedding (V, C): the targets
            become softmax(teacher_h @ teacher_w.T); `t` then only marks valid rows.
        chunk_rows: rows per chunk (0: automatic).
    Returns:
        (loss, per-row CE (N,), per-row top-1 correct (N,)); only `loss` carries gradients.
    """
    return _LinearCrossEntropy.apply(h, w, t, scale, teacher_h, teacher_w, chunk_rows)


def naive_linear_cross_entropy(h: Tensor, w: Tensor, t: Tensor, scale: Tensor, teacher_h: Tensor | None = None,
                               teacher_w: Tensor | None = None, chunk_rows: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Reference for `linear_cross_entropy`: full logits and autograd."""
    logits = (h @ w.to(h.dtype).t()).float()
    valid = t != IGNORE_INDEX
    if teacher_h is None:
        ce = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="none")
        ref = t
    else:
        p_t = torch.softmax((teacher_h @ teacher_w.to(h.dtype).t()).float(), -1)
        ce = torch.where(valid, -(p_t * torch.log_softmax(logits, -1)).sum(-1), 0.0)
        ref = p_t.argmax(-1)
    ok = (logits.argmax(-1) == ref) & valid
    return (ce * scale).sum(), ce.detach(), ok
