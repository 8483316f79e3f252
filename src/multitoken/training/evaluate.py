"""`multitoken eval`: per-depth validation loss and accuracy, and the expected speed-up of drafting.

Per depth k (0 is the main head) we report the mean cross-entropy and top-1 accuracy against the
data tokens over the validation windows, with the alignment of `loss.shift_targets`.

`expected_tau` estimates the mean accepted length (tokens emitted per verification step, bonus
included) that greedy chain drafting with all D heads would reach, from teacher-forced passes:

- main head argmax at position j, m[j], is the model's prediction of token j+1;
- depth k's argmax at position i, d_k[i], is its prediction of token i+k+1;
- so draft k made at position i is accepted when d_k[i] == m[i+k] (the main head's own choice for
  the same token, one step later); the accepted run at i is the number of consecutive k = 1..D
  that agree, and tau(i) = 1 + run(i) (the bonus token always counts).

We then simulate decoding: start at position 0, emit tau(i) tokens, jump to i + tau(i), and
average tau over the visited steps (not over all positions: a step that accepts several tokens
skips the positions in between, exactly as decoding does). Steps are taken while all D drafts
have a position to be checked against (i + D < T).

The estimate uses the data as context: m[i+k] is the main head's choice given the true tokens up
to i+k (and sequential modules read the true t_{i+k} where decoding feeds them their own drafts),
while in decoding the context is the model's own greedy continuation. It is exact when the data
is the model's own greedy continuation, and a good proxy for code and text the model predicts
well; `multitoken generate` measures the real tau.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from multitoken.errors import BadValue, UserError
from multitoken.training.loss import IGNORE_INDEX, MTPLoss, shift_targets, split_batch


@dataclass
class EvalStats:
    """Sums over validation windows; add them up across batches and ranks, then `summarize`."""

    ce_sum: Tensor
    """(D+1,) summed cross-entropy per depth."""
    correct: Tensor
    """(D+1,) top-1 hits per depth."""
    count: Tensor
    """(D+1,) valid targets per depth."""
    tau_sum: Tensor
    """() tokens emitted over the simulated steps."""
    tau_steps: Tensor
    """() simulated verification steps."""
    accepted: Tensor
    """(D,) simulated steps whose draft k was accepted (all earlier drafts accepted too)."""
    tokens: Tensor
    """() input tokens evaluated."""

    @classmethod
    def zeros(cls, depth: int, device: torch.device | str = "cpu") -> "EvalStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(depth + 1), z(depth + 1), z(depth + 1), z(()), z(()), z(depth), z(()))

    def add_(self, other: "EvalStats") -> "EvalStats":
        for name in self.__dataclass_fields__:
            getattr(self, name).add_(getattr(other, name).to(getattr(self, name).device))
        return self

    def flat(self) -> Tensor:
        """All sums as one float64 vector (one all-reduce for everything)."""
        return torch.cat([getattr(self, n).reshape(-1) for n in self.__dataclass_fields__])

    def load_flat_(self, v: Tensor) -> "EvalStats":
        i = 0
        for n in self.__dataclass_fields__:
            t = getattr(self, n)
            t.copy_(v[i : i + t.numel()].reshape(t.shape))
            i += t.numel()
        return self


def accepted_runs(main: Tensor, drafts: list[Tensor]) -> Tensor:
    """Consecutive accepted drafts at every position.

    Args:
        main: (B, T) main-head argmax; main[:, j] predicts token j+1.
        drafts: D tensors (B, T); drafts[k-1][:, i] predicts token i+k+1.
    Returns:
        (B, T) long: the largest r <= D with drafts[k-1][:, i] == main[:, i+k] for k = 1..r
        (comparisons past the window count as rejections).
    """
    B, T = main.shape
    run = torch.zeros(B, T, dtype=torch.long, device=main.device)
    alive = torch.ones(B, T, dtype=torch.bool, device=main.device)
    for k, d in enumerate(drafts, start=1):
        ok = torch.zeros(B, T, dtype=torch.bool, device=main.device)
        if k < T:
            ok[:, : T - k] = d[:, : T - k] == main[:, k:]
        alive &= ok
        run += alive.long()
    return run


def simulate_steps(run: Tensor, depth: int, written: Tensor | None = None) -> tuple[int, int, list[int]]:
    """Walk each row as decoding would: at i emit 1 + run[i] tokens, jump there.

    Args:
        run: (B, T) from `accepted_runs`.
        depth: D; steps are taken while i + D < T.
        written: optional (B, T) bool, whether token i+1 is one the model writes (the loss mask
            shifted by one); a position whose next token is a prompt's is stepped over uncounted.
    Returns:
        (tokens emitted, steps, per-k count of steps where draft k was accepted).
    """
    tokens, steps, accepted = 0, 0, [0] * depth
    T = run.shape[1]
    rows = written.tolist() if written is not None else [None] * run.shape[0]
    for row, wrote in zip(run.tolist(), rows):
        i = 0
        while i + depth < T:
            if wrote is not None and not wrote[i]:
                i += 1
                continue
            r = row[i]
            tokens += 1 + r
            steps += 1
            for k in range(r):
                accepted[k] += 1
            i += 1 + r
    return tokens, steps, accepted


def _argmax_rows(h: Tensor, w: Tensor, rows: int = 4096) -> Tensor:
    """argmax over the vocabulary of h @ w.T, (N, C) x (V, C) -> (N,), one chunk of logits at a time."""
    out = torch.empty(h.shape[0], dtype=torch.long, device=h.device)
    wc = w.to(h.dtype)
    for s in range(0, h.shape[0], rows):
        out[s : s + rows] = (h[s : s + rows] @ wc.t()).argmax(-1)
    return out


@torch.no_grad()
def eval_stats(model, windows: Iterable[Tensor], eos_id: int | None, device: torch.device | str | None = None,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> EvalStats:
    """Sums of per-depth loss/accuracy and simulated drafting over `windows`.

    Args:
        model: a Transformer (or anything with ``__call__(idx) -> [main, d1..dD]``, ``depth`` and
            ``unembed_weight(k)``); FSDP2 models are called as they are.
        windows: (B, T+1) token batches, or (tokens, loss mask) pairs (`loss.split_batch`).
        eos_id: document separator (targets never cross it).
        device: where to run; default the model's.
        autocast: a context factory wrapping the forward pass (bf16 autocast on GPU).
    """
    D = model.depth
    if device is None:
        device = next(model.parameters()).device
    loss_fn = MTPLoss(D, weights=[1.0] * (D + 1), eos_id=eos_id)
    stats = EvalStats.zeros(D)
    for batch in windows:
        window, mask = split_batch(batch)
        window = window.to(device)
        mask = None if mask is None else mask.to(device)
        with autocast():
            hiddens = model(window[:, :-1])  # D+1 x (B, T, C)
            out = loss_fn(model, hiddens, window, loss_mask=mask)
            B, T = window.shape[0], window.shape[1] - 1
            argmax = [_argmax_rows(h.flatten(0, 1), model.unembed_weight(k)).view(B, T) for k, h in enumerate(hiddens)]
        count = out.per_depth_count.double().cpu()
        written = None if mask is None else mask[:, 1:].bool()
        tokens, steps, accepted = simulate_steps(accepted_runs(argmax[0], argmax[1:]), D, written)
        stats.add_(EvalStats(
            ce_sum=out.per_depth_loss.double().cpu() * count,
            correct=out.per_depth_acc.double().cpu() * count,
            count=count,
            tau_sum=torch.tensor(float(tokens), dtype=torch.float64),
            tau_steps=torch.tensor(float(steps), dtype=torch.float64),
            accepted=torch.tensor(accepted, dtype=torch.float64).reshape(D),
            tokens=torch.tensor(float(B * T), dtype=torch.float64),
        ))
    return stats


@torch.no_grad()
def measure_topk_accuracy(model, batches, ranks: int = 10, eos_id: int | None = None) -> tuple[list[list[float]], int]:
    """Per-depth top-r accuracy of the heads on token windows (teacher forcing).

    Args:
        model: a Transformer with MTP heads.
        batches: iterable of (B, T+1) windows.
        ranks: candidates per depth to measure.
    Returns:
        (accuracy[d][r] for depth d+1 and rank r, number of scored positions at depth 1).
    """
    D = model.depth
    hits = torch.zeros(D, ranks, dtype=torch.float64)
    count = torch.zeros(D, dtype=torch.float64)
    device = next(model.parameters()).device
    for batch in batches:
        window, mask = split_batch(batch)
        window = window.to(device)
        mask = None if mask is None else mask.to(device)
        out = model(window[:, :-1])
        for d in range(1, D + 1):
            target = shift_targets(window, d, eos_id, mask)  # (B, T)
            top = model.logits(out[d], d).topk(ranks, dim=-1).indices  # (B, T, R)
            valid = target != IGNORE_INDEX
            hits[d - 1] += ((top == target[..., None]) & valid[..., None]).sum((0, 1)).double().cpu()
            count[d - 1] += valid.sum().double().cpu()
    acc = (hits / count.clamp(min=1)[:, None]).tolist()
    return acc, int(count[0])


def summarize(stats: EvalStats) -> dict[str, Any]:
    """Means from sums: the JSON that `multitoken eval --json` prints."""
    c = stats.count.clamp(min=1)
    steps = max(stats.tau_steps.item(), 1.0)
    return {
        "depth": stats.count.numel() - 1,
        "loss_per_depth": (stats.ce_sum / c).tolist(),
        "accuracy_per_depth": (stats.correct / c).tolist(),
        "count_per_depth": [int(x) for x in stats.count.tolist()],
        "expected_tau": stats.tau_sum.item() / steps if stats.tau_steps.item() else 1.0,
        "acceptance_per_position": (stats.accepted / steps).tolist(),
        "tau_steps": int(stats.tau_steps.item()),
        "tokens": int(stats.tokens.item()),
    }


def evaluate(model, data, n_batches: int = 20, eos_id: int | None = None, *, batch_size: int = 8,
             seq_len: int | None = None, device: torch.device | str | None = None) -> dict[str, Any]:
    """Validation metrics of `model` (see the module docstring for `expected_tau`).

    Args:
        model: a Transformer (eval mode is set here).
        data: a DATA_DIR (its val split is read) or a `TokenLoader` (its `eval_batches` are used).
        n_batches: validation batches (they repeat, in order, if the split is small).
        eos_id: document separator; default the model config's.
        batch_size, seq_len: windows per batch and tokens per window when `data` is a directory
            (seq_len defaults to min(256, the model's max_seq_len)).
        device: where to run; default the model's.
    Returns:
        {"loss_per_depth", "accuracy_per_depth", "count_per_depth", "expected_tau",
         "acceptance_per_position", "tau_steps", "tokens", "depth"}.
    """
    from multitoken.data.loader import TokenLoader

    if eos_id is None:
        eos_id = model.config.eos_id
    if isinstance(data, (str, Path)):
        from multitoken.data.prepare import load_meta

        meta = load_meta(data)
        if meta["vocab_size"] > model.config.vocab_size:
            raise UserError(f"{data} uses a tokenizer of {meta['vocab_size']} ids, more than the model's vocabulary "
                            f"({model.config.vocab_size}): evaluate on data prepared with the run's tokenizer")
        seq_len = seq_len or min(256, model.config.max_seq_len)
        data = TokenLoader(data, "val", batch_size=batch_size, seq_len=seq_len)
    if n_batches < 1:
        raise BadValue("batches", n_batches, "evaluate at least one batch")
    was_training = model.training
    model.eval()
    autocast = contextlib.nullcontext
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if dev.type == "cuda":
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    try:
        stats = eval_stats(model, data.eval_batches(n_batches), eos_id, dev, autocast)
    finally:
        model.train(was_training)
    return summarize(stats)


def run_tokenizer_sha256(run_dir: str | Path) -> str | None:
    """The identity (`Tokenizer.fingerprint`) of the tokenizer a run was trained with: config.json's record, else
    computed from the run's tokenizer files; None for a run that holds neither (only its vocabulary size is known)."""
    from multitoken.io.checkpoint import CONFIG_FILE, read_json
    from multitoken.data.tokenizer import TOKENIZER_FILE, Tokenizer

    run_dir = Path(run_dir)
    try:
        config = read_json(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).is_file() else {}
    except UserError:  # a damaged config.json (resume restores it from the checkpoint): use the tokenizer file
        config = {}
    if not isinstance(config, dict):
        config = {}
    recorded = (config.get("data") or {}).get("tokenizer_sha256")
    if recorded:
        return recorded
    try:
        return Tokenizer.load(run_dir).fingerprint() if (run_dir / TOKENIZER_FILE).is_file() else None
    except UserError:  # damaged too: resume rewrites it from the data's, whose ids the vocabulary check bounds
        return None


def check_same_tokenizer(run_dir: str | Path, data_dir: str | Path, fix: str) -> None:
    """Refuse DATA_DIR when its tokenizer is not the run's (compared by identity: equal sizes are not enough).

    Args:
        run_dir: the run directory.
        data_dir: a prepared DATA_DIR.
        fix: what the user should do instead, for the error message.
    """
    from multitoken.data.prepare import tokenizer_sha256

    mine = run_tokenizer_sha256(run_dir)
    theirs = tokenizer_sha256(data_dir)
    if mine is not None and mine != theirs:
        raise UserError(f"{data_dir} was prepared with a different tokenizer from the run {run_dir} (fingerprints "
                        f"{theirs[:12]} and {mine[:12]}): {fix}")


def plot_accuracy(result: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Bar chart of top-1 accuracy per depth, with the per-position acceptance of simulated drafting."""
    from multitoken.io.outdir import atomic_write
    from multitoken.viz import pyplot

    plt = pyplot(str(path))
    if plt is None:
        return

    acc = result["accuracy_per_depth"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(range(len(acc)), acc, color="tab:blue", label="top-1 accuracy vs data")
    acc_pos = result.get("acceptance_per_position", [])
    if acc_pos:
        ax.plot(range(1, len(acc_pos) + 1), acc_pos, "o-", color="tab:orange", label="draft accepted (simulated)")
    ax.set_xticks(range(len(acc)), ["main"] + [f"+{k}" for k in range(1, len(acc))])
    ax.set_xlabel("depth")
    ax.set_ylim(0, 1)
    ax.set_title(title or f"expected tau = {result['expected_tau']:.2f}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def format_table(result: dict[str, Any]) -> str:
    """A readable per-depth table plus tau."""
    lines = [f"{'depth':>6} {'loss':>8} {'acc':>7} {'targets':>9}"]
    for k, (l, a, c) in enumerate(zip(result["loss_per_depth"], result["accuracy_per_depth"], result["count_per_depth"])):
        lines.append(f"{'main' if k == 0 else '+' + str(k):>6} {l:8.4f} {a:7.3f} {c:9d}")
    lines.append(f"expected tau (greedy chain drafting, teacher-forced): {result['expected_tau']:.3f} "
                 f"over {result['tau_steps']} steps, {result['tokens']} tokens")
    return "\n".join(lines)
