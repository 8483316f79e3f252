"""Retrofitting MTP heads onto a frozen pretrained model, from backbone features computed once.

(The real pretrained model the project retrofits, SmolLM2-135M-Instruct, is located and cached by
io/smollm2.py.)

**Precomputed backbone features** (`precompute_features`; ``multitoken retrofit --features DIR`` keeps them).
   With a frozen backbone, every epoch of head training recomputes the same backbone forward
   pass. Medusa heads read only the final normed hidden state, so storing it once (bf16, one
   safetensors shard per chunk of windows) plus the backbone's own next-token distribution (the
   self-distillation target, stored as its top-k logits) turns head training into a tiny MLP
   problem: per training step the backbone forward (~2*N_backbone FLOPs per token) disappears and
   only the heads (and the shared LM-head projection for the loss) remain. For SmolLM2-135M that
   is ~2*(135M-28M) of ~2*135M+heads FLOPs per token, i.e. the backbone is ~75% of a Medusa-1
   training step's forward compute. The cost: 2 bytes * d per token of disk (576 d ->
   1.15 KB/token, ~1.2 GB per million tokens) plus the top-k targets.
   Sequential MTP modules need h^0 (the same final hidden state, *before* the final norm) and the
   embeddings of later tokens (cheap, recomputed), so the stored un-normed last hidden state
   serves them too; parallel heads branch off the trunk (the first L-1 blocks), so for them the
   trunk output is stored instead. Which state: the one after the heads' `Transformer.trunk_layers()`
   blocks (the "cut", recorded in the feature set's metadata). Heads that also read earlier states
   (fused sequential heads, `Transformer.tapped_layers`) are refused in one line (`check_features_serve`):
   train them with ``multitoken train --freeze-backbone`` instead.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from multitoken.config import HeadsConfig, ModelConfig
from multitoken.errors import UserError
from multitoken.io import outdir
from multitoken.io.checkpoint import load_config, load_run, read_json, read_safetensors, save_run
from multitoken.io.outdir import atomic_write, write_json
from multitoken.model import Transformer
from multitoken.model.heads import family
from multitoken.training.evaluate import check_same_tokenizer
from multitoken.training.trainer import lr_schedule, optimizer_update

FEATURES_META = "features.json"
FEATURES_FORMAT = 2  # 2: the cut (blocks run) is recorded, not a kind name
FEATURE_SHARD = re.compile(r"\.?features-\d{5}\.safetensors(?:\.[a-z0-9_]+\.tmp)?")  # a shard or atomic_write's temporary of one


@torch.no_grad()
def backbone_features(model: Transformer, inputs: Tensor, cut: int) -> Tensor:
    """(B, T, C) backbone state after the first `cut` blocks for input ids (B, T)."""
    rope = model.rope(torch.arange(inputs.shape[1], device=inputs.device))
    return model.run_layers(model.embed_tokens(inputs), 0, cut, rope)


def feature_windows(data_dir: str | Path, seq_len: int, max_tokens: int, batch_size: int, seed: int):
    """(loader, windows to store): at most one epoch of distinct windows, and at least one batch."""
    from multitoken.data.loader import TokenLoader

    loader = TokenLoader(data_dir, "train", batch_size, seq_len, seed)
    n_windows = min(max(1, max_tokens // seq_len), len(loader._epoch_starts))
    if n_windows < batch_size:  # the head fit needs one full batch
        raise UserError(f"{data_dir} holds {n_windows} training window(s) of {seq_len} tokens, fewer than one batch of "
                        f"{batch_size}: lower --batch-size or --seq-len, or prepare more data")
    return loader, n_windows


def precompute_features(run_dir: str | Path, data_dir: str | Path, out: str | Path, cut: int, seq_len: int = 256,
                        max_tokens: int = 200_000, batch_size: int = 8, seed: int = 0, shard_windows: int = 256,
                        progress: bool = True) -> dict[str, Any]:
    """Run the frozen backbone of `run_dir` once over training windows of `data_dir` and store its states.

    Writes ``out/features-{i:05d}.safetensors`` shards, each with ``tokens`` (n, seq_len+1) int32
    windows and ``features`` (n, seq_len, C) bf16 states of the inputs ``tokens[:, :-1]``, then
    ``out/features.json`` last (its presence marks a complete set; an existing complete set made
    with the same arguments is reused).

    Args:
        run_dir: the pretrained model (a run directory, e.g. `smollm2_run_dir()`).
        data_dir: a DATA_DIR prepared with that model's tokenizer.
        out: folder for the shards.
        cut: backbone blocks to run, the heads' `Transformer.trunk_layers()` (all of them for
            Medusa and sequential modules, L-1 for parallel heads).
        seq_len: tokens per window.
        max_tokens: input tokens to cover (rounded down to whole windows).
        batch_size: windows per backbone forward.
        seed: the data loader's window order.
        shard_windows: windows per shard file.
    Returns:
        The features.json dict (windows, tokens, seconds, bytes, tokens_per_s).
    """
    from multitoken.data.loader import TokenLoader

    out = Path(out)
    outdir.check(out, "features", "--features")
    args = {"run_dir": str(Path(run_dir).resolve()), "data_dir": str(Path(data_dir).resolve()), "cut": cut,
            "seq_len": seq_len, "max_tokens": max_tokens, "seed": seed}
    meta_path = out / FEATURES_META
    if meta_path.is_file():
        meta = read_json(meta_path)
        if meta.get("args") == args and meta.get("format") == FEATURES_FORMAT:
            return meta
        raise UserError(f"{out} holds features made with other settings ({meta.get('args')}): choose another --features folder or delete it")
    model, _ = load_run(run_dir, with_tokenizer=False)
    if not 1 <= cut <= model.config.n_layers:
        raise UserError(f"features after {cut} blocks: choose between 1 and the model's {model.config.n_layers}")
    if seq_len > model.config.max_seq_len:
        raise UserError(f"seq_len={seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}: lower --seq-len")
    loader, n_windows = feature_windows(data_dir, seq_len, max_tokens, batch_size, seed)
    outdir.claim(out, "features", "--features")
    for stale in out.iterdir():  # an incomplete earlier set (no features.json): our shard names only
        if stale.name.startswith(".") != stale.name.endswith(".tmp"):
            continue
        if FEATURE_SHARD.fullmatch(stale.name) and stale.is_file():
            stale.unlink()
    outdir.remove_temporaries(out, [FEATURES_META])
    t0, done, shard, nbytes = time.perf_counter(), 0, 0, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_windows * seq_len, desc="backbone features", unit="tok", unit_scale=True, file=sys.stderr)
    buf_t: list[Tensor] = []
    buf_f: list[Tensor] = []

    def flush() -> None:
        nonlocal shard, nbytes, buf_t, buf_f
        if not buf_t:
            return
        tensors = {"tokens": torch.cat(buf_t).to(torch.int32), "features": torch.cat(buf_f).to(torch.bfloat16).contiguous()}
        path = out / f"features-{shard:05d}.safetensors"
        atomic_write(path, lambda tmp: save_file(tensors, tmp))
        nbytes += path.stat().st_size
        shard, buf_t, buf_f = shard + 1, [], []

    while done < n_windows:
        window = next(loader)[: n_windows - done]  # (b, T+1)
        buf_t.append(window)
        buf_f.append(backbone_features(model, window[:, :-1], cut).to(torch.bfloat16))
        done += len(window)
        if bar is not None:
            bar.update(len(window) * seq_len)
        if sum(len(t) for t in buf_t) >= shard_windows:
            flush()
    flush()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    meta = {"format": FEATURES_FORMAT, "args": args, "windows": n_windows, "tokens": n_windows * seq_len,
            "dim": model.config.dim, "dtype": "bfloat16", "shards": shard, "bytes": nbytes, "seconds": seconds,
            "tokens_per_s": n_windows * seq_len / max(seconds, 1e-9)}
    write_json(meta_path, meta)
    return meta


class FeatureSet:
    """The stored windows and backbone states of a `precompute_features` folder, in memory."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        meta_path = folder / FEATURES_META
        if not meta_path.is_file():
            raise UserError(f"{folder} holds no complete feature set: run `multitoken retrofit ... --features {folder}` to make one")
        self.meta = read_json(meta_path)
        tokens, feats = [], []
        for path in sorted(folder.glob("features-*.safetensors")):
            part = read_safetensors(path, f"delete {folder} and run `multitoken retrofit` again to recompute it")
            tokens.append(part["tokens"].long())
            feats.append(part["features"])
        self.tokens = torch.cat(tokens)  # (N, T+1)
        self.features = torch.cat(feats)  # (N, T, C) bf16
        self.cut: int = self.meta["args"]["cut"]

    def __len__(self) -> int:
        return len(self.tokens)

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless shuffled (windows (B, T+1), features (B, T, C) float32) batches, epoch after epoch."""
        if len(self) < batch_size:  # would loop forever yielding nothing
            raise UserError(f"the feature set holds {len(self)} window(s), fewer than one batch of {batch_size}: "
                            "lower --batch-size or use more data")
        g = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self), generator=g)
            for s in range(0, len(order) - batch_size + 1, batch_size):
                idx = order[s : s + batch_size]
                yield self.tokens[idx], self.features[idx].float()


def check_features_serve(cfg: ModelConfig) -> None:
    """Refuse, in one line, heads that read backbone states before the cut: stored features hold only
    the state after `trunk_layers` blocks (the blocks after it are rerun from there)."""
    if cfg.heads.kind == "none":
        return
    fam = family(cfg.heads.kind)
    cut = fam.trunk_layers(cfg)
    early = [i for i in fam.tapped_layers(cfg) if i < cut]
    if early:
        raise UserError(f"{cfg.heads} heads read the backbone's states after blocks {', '.join(map(str, early))}, and retrofit "
                        f"features hold only the state after block {cut}: train them with `multitoken train --init RUN "
                        f"--heads {cfg.heads} --freeze-backbone --distill` (or examples/smollm2_gpu.py)")


def hiddens_from_features(model: Transformer, window: Tensor, feats: Tensor, cut: int) -> list[Tensor]:
    """``model(window[:, :-1])``'s ``[main, d1..dD]`` computed from stored backbone states.

    Args:
        model: the model with heads (backbone frozen).
        window: (B, T+1) token ids.
        feats: (B, T, C) states after the first `cut` blocks for ``window[:, :-1]``.
        cut: the blocks `feats` went through.
    Returns:
        The hidden states per depth, as `Transformer.forward` gives them (the main one detached:
        only the heads learn).
    """
    idx = window[:, :-1]
    rope = model.rope(torch.arange(idx.shape[1], device=idx.device))
    with torch.no_grad():
        states = model.states_from(idx, feats, cut, rope)
    return [states.main] + model.mtp(model.shared, states, rope)


def fit_heads(model: Transformer, features: FeatureSet, steps: int, batch_size: int = 8, lr: float = 1e-3,
              weights: list[float] | None = None, warmup: int = 10, seed: int = 0, log_every: int = 10,
              freeze_head_lm: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Train the heads of `model` (backbone frozen) on stored features with self-distillation.

    Each depth k learns the backbone's own next-token distribution k positions later (MTPLoss with
    ``distill=True``), AdamW with the trainer's schedule (linear warmup, cosine decay to lr/10) and
    update (`trainer.lr_schedule`, `trainer.optimizer_update`).

    Args:
        model: the model with fresh heads on the pretrained backbone.
        features: what `precompute_features` stored for this backbone.
        steps: optimizer steps.
        batch_size: windows per step.
        lr: peak learning rate.
        weights: per-depth loss weights (default: the family's, `Transformer.default_loss_weights`).
        warmup: warmup steps.
        seed: batch order.
        log_every: steps between log records.
        freeze_head_lm: keep Medusa heads' own vocabulary projections at their initial copy of the
            LM head and train only the residual blocks. On a CPU this makes a step ~1.5x cheaper
            (no (V, C) weight gradients; for SmolLM2 V*C = 28M per head dwarfs the block's C*C).
    Returns:
        Log records: step, loss per depth, teacher-agreement accuracy per depth, tokens/s.
    """
    from multitoken.training.loss import MTPLoss

    check_features_serve(model.config)
    if features.cut != model.trunk_layers():
        raise UserError(f"the feature set holds states after {features.cut} blocks, the heads ({model.config.heads}) "
                        f"branch off after {model.trunk_layers()}: make features for these heads (another --features folder)")
    model.freeze_backbone()
    if freeze_head_lm:
        for name, p in model.mtp.named_parameters():
            if name.endswith("lm_head.weight"):
                p.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    D = model.depth
    loss_fn = MTPLoss(D, weights or model.default_loss_weights(), eos_id=model.config.eos_id, distill=True)
    records, t0, batches = [], time.perf_counter(), features.batches(batch_size, seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="fit heads", unit="step", file=sys.stderr)
    for step in range(steps):
        window, feats = next(batches)
        out = loss_fn(model, hiddens_from_features(model, window, feats, features.cut), window, step)
        out.loss.backward()
        optimizer_update(opt, params, lr_schedule(step, lr, lr / 10, warmup, steps), grad_clip=1.0)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(" ".join(f"+{k}:{a:.2f}" for k, a in enumerate(out.per_depth_acc.tolist()) if k), refresh=False)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            records.append({"step": step + 1, "loss_per_depth": out.per_depth_loss.tolist(),
                            "accuracy_per_depth": out.per_depth_acc.tolist(),
                            "tokens_per_s": (step + 1) * batch_size * (window.shape[1] - 1) / (time.perf_counter() - t0)})
    if bar is not None:
        bar.close()
    model.eval()
    return records


# ---- `multitoken retrofit` -------------------------------------------------------------------------


def add_heads(run_dir: str | Path, heads: HeadsConfig, max_seq_len: int | None = None) -> tuple[Transformer, Any]:
    """The pretrained model of `run_dir` with fresh `heads` initialised from its backbone, and its tokenizer.

    Args:
        run_dir: a plain (headless) run directory.
        heads: the heads to add.
        max_seq_len: a shorter context (see `model.build.limit_context`); default the run's.
    """
    from multitoken.model.build import build_model, limit_context

    base, tok = load_run(run_dir)
    if base.mtp is not None:
        raise UserError(f"{run_dir} already has {base.config.heads} heads: retrofit starts from a plain model")
    model = build_model(base.config.with_heads(heads), base.state_dict(), fresh_heads=True)
    return (limit_context(model, max_seq_len) if max_seq_len else model), tok


def retrofit(init: str | Path, data_dir: str | Path, heads: HeadsConfig, out: str | Path, features: str | Path | None = None,
             tokens: int = 200_000, seq_len: int = 256, steps: int = 200, batch_size: int = 8, lr: float = 1e-3,
             eval_batches: int = 8, seed: int = 0, freeze_head_lm: bool = False, max_seq_len: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Add `heads` to the frozen model `init`, train them by self-distillation on stored backbone
    features, evaluate, and write the result as run directory `out`.

    Args:
        init: the pretrained run directory.
        data_dir: a DATA_DIR prepared with its tokenizer.
        heads: heads to add (medusa:N, sequential:N or parallel:N).
        out: the run directory to write.
        features: where backbone features are stored/reused (default ``out/features``).
        tokens: training tokens to precompute features for.
        seq_len, steps, batch_size, lr: training windows and optimisation.
        eval_batches: validation batches for the final per-depth accuracy and expected tau.
        seed: data order and head init.
        freeze_head_lm: train only Medusa heads' residual blocks (see `fit_heads`).
        max_seq_len: context of the written run (default the pretrained one's; see `model.build.limit_context`).
    Returns:
        A summary: feature cost, training log, validation metrics and timings.
    """
    from multitoken.training.evaluate import evaluate

    out = Path(out)
    if tokens // seq_len < batch_size:
        raise UserError(f"--tokens {tokens} covers {tokens // seq_len} window(s) of {seq_len}, fewer than one batch of "
                        f"{batch_size}: give --tokens {batch_size * seq_len} or more, or lower --batch-size")
    if heads.kind == "none":
        raise UserError("retrofitting needs heads: pass --heads medusa:N, sequential:N or parallel:N")
    outdir.check(out, "retrofit")  # before the slow part: folders holding someone else's files are refused
    features = Path(features) if features is not None else out / "features"
    outdir.check(features, "features", "--features")
    feature_windows(data_dir, seq_len, tokens, batch_size, seed)  # refuse too little data before writing anything
    check_same_tokenizer(init, data_dir, f"prepare the data with the --init model's tokenizer "
                         f"(--tokenizer {Path(init) / 'tokenizer.json'})")
    torch.manual_seed(seed)
    check_features_serve(load_config(init).with_heads(heads))  # before the model is read
    model, tok = add_heads(init, heads, max_seq_len)  # and a missing or damaged --init
    outdir.claim(out, "retrofit")
    t0 = time.perf_counter()
    meta = precompute_features(init, data_dir, features, model.trunk_layers(), seq_len, tokens, batch_size, seed,
                               progress=progress)
    t1 = time.perf_counter()
    log = fit_heads(model, FeatureSet(features), steps, batch_size, lr, seed=seed, freeze_head_lm=freeze_head_lm, progress=progress)
    t2 = time.perf_counter()
    val = evaluate(model, data_dir, eval_batches, batch_size=batch_size, seq_len=seq_len)
    t3 = time.perf_counter()
    summary = {"init": str(init), "heads": str(heads), "features": {k: meta[k] for k in ("windows", "tokens", "bytes", "seconds", "tokens_per_s")},
               "features_reused": t1 - t0 < 0.5 * meta["seconds"], "train_log": log, "val": val,
               "seconds": {"features": t1 - t0, "fit": t2 - t1, "eval": t3 - t2}}
    save_run(out, model, tok, extra={"retrofit": {k: v for k, v in summary.items() if k != "train_log"}})
    write_json(out / "retrofit.json", summary)
    return summary
