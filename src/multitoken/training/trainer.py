"""`multitoken train`: one training loop for a single process and for torchrun.

The loop: windows from `TokenLoader` -> ``model(window[:, :-1])`` -> `MTPLoss` -> backward
(gradient accumulation over micro-batches) -> clip -> AdamW with linear warmup and cosine decay.
Every `eval_every` steps it measures per-depth validation loss/accuracy and expected tau, every
`save_every` steps it writes a checkpoint. Under torchrun the model is wrapped with DDP or FSDP2
from the outside (parallel.py); rank 0 alone writes files and shows progress.

Exact averaging: each depth's loss is a mean over its valid targets, and the number of valid
targets differs between micro-batches and ranks (document boundaries). So that 2 ranks x B/2,
or 1 rank x 2 micro-batches of B/2, give the gradient of the same loss as one batch of B, each
micro-batch's depth weights are rescaled by (its valid targets / the global step's valid targets)
x world size, the global counts being one all-reduce of D+1 numbers per step.

Weight decay (AdamW, decoupled) applies to matrices only: norms, biases and the token embedding
(which is also the tied LM head) get none, as in most Llama-style training recipes.

Run directory (see checkpoint.py for the checkpoint layout):
    config.json  tokenizer files  model.safetensors  (what `load_run` reads: the latest weights)
    checkpoints/step_*/ checkpoints/latest.json       (exact resume)
    metrics.jsonl  tb/  loss.png  accuracy_per_depth.png
"""

from __future__ import annotations

import logging
import contextlib
import dataclasses
import json
import math
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multitoken.config import HeadsConfig, ModelConfig, TrainConfig, from_dict
from multitoken.errors import UserError
from multitoken.io import checkpoint as ckpt
from multitoken.io import outdir
from multitoken.io.heads_file import load_heads_into
from multitoken.model import Transformer
from multitoken.training import parallel
from multitoken.training.evaluate import EvalStats, check_same_tokenizer, eval_stats, plot_accuracy, summarize
from multitoken.training.loss import MTPLoss, Targets, resolve_weights, split_batch

log = logging.getLogger(__name__)

METRICS_FILE, PLOT_FILE, TB_DIR = "metrics.jsonl", "loss.png", "tb"
# The files train writes into RUN_DIR besides config.json and model.safetensors: the only names
# whose leftover temporaries it deletes (see checkpoint.remove_stale_temporaries).
RUN_FILES = ("tokenizer.json", "tokenizer_config.json", METRICS_FILE, PLOT_FILE, "accuracy_per_depth.png", outdir.MARKER_FILE)

# On --resume the run keeps its model: these options would reshape it, so a value that differs
# from the run's is an error. RESUME_OPTIONS apply on resume (how long to train, how often to
# log/evaluate/save, on what hardware); every other option keeps the run's value and, when given
# with another value, is named in one "ignored on resume" line.
MODEL_OPTIONS = ("preset", "heads", "init", "max_seq_len")
RESUME_OPTIONS = ("steps", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "log_every", "device",
                  "dtype", "compile", "fsdp", "loss_kernel", "loss_chunk_rows", "recompute")


# ---- configuration: TOML, precedence, resume ----------------------------------------------------


def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML config file as a flat dict of TrainConfig field values (``a-b`` keys become ``a_b``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: file not found")
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path} is not valid TOML ({e})") from None
    if isinstance(data.get("train"), dict) and len(data) == 1:
        data = data["train"]  # a [train] table is accepted too
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve_config(cli: dict[str, Any], toml_path: str | Path | None = None, saved: dict[str, Any] | None = None) -> TrainConfig:
    """Merge, later wins: TrainConfig defaults, a saved run's config (on --resume), TOML, the CLI.

    Raises:
        UserError: a key that is not a TrainConfig field (the message lists the known ones).
    """
    merged = dict(saved or {})
    if toml_path:
        merged.update(load_toml(toml_path))
    merged.update(cli)
    cfg = from_dict(TrainConfig, merged)
    cfg.validate()
    return cfg


# ---- model, optimizer, schedule -----------------------------------------------------------------


def _option(key: str, value: Any) -> str:
    return f"--{key.replace('_', '-')} {value if value != '' else repr(value)}"


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "heads":
        return HeadsConfig.parse(a) == HeadsConfig.parse(b)  # "parallel:02" is "parallel:2"
    return a == b


def check_model_options(cfg: TrainConfig, saved: TrainConfig) -> None:
    """Raise a one-line `UserError` when `cfg` would reshape the model of the run `saved` came from."""
    bad = [f"{_option(k, getattr(cfg, k))} differs from the run's {getattr(saved, k)!r}" for k in MODEL_OPTIONS
           if not _same(k, getattr(cfg, k), getattr(saved, k))]
    if bad:
        raise UserError(f"{'; '.join(bad)}: a resumed run keeps its model; drop the option to continue the run, "
                        "or train a new one into another --out")


def resume_config(saved: dict[str, Any], given: dict[str, Any]) -> tuple[TrainConfig, list[str]]:
    """The config of a resumed run: the run's own `saved` TrainConfig, with the options `given`
    (command line and TOML) that apply on resume (`RESUME_OPTIONS`).

    Returns:
        (config, the given options that were ignored because they differ from the run's, as text).
    Raises:
        UserError: a model-shaping option (`MODEL_OPTIONS`) differs from the run's, or a key is unknown.
    """
    run_cfg = from_dict(TrainConfig, dict(saved))
    asked = from_dict(TrainConfig, {**saved, **given})  # rejects unknown keys, normalises types (betas)
    check_model_options(asked, run_cfg)
    applied = {k: getattr(asked, k) for k in given if k in RESUME_OPTIONS}
    ignored = [f"{_option(k, getattr(asked, k))} (run: {getattr(run_cfg, k)})" for k in given
               if k not in RESUME_OPTIONS and k not in MODEL_OPTIONS and getattr(asked, k) != getattr(run_cfg, k)]
    cfg = dataclasses.replace(run_cfg, **applied)
    cfg.validate()
    return cfg, ignored


def saved_run_config(run_dir: str | Path, warn: Any = None) -> dict[str, Any]:
    """A run's recorded config ({"model", "train", ...}): RUN_DIR/config.json, or when that is
    damaged, the copy in its newest checkpoint (`warn` is told, in one line)."""
    path = Path(run_dir) / ckpt.CONFIG_FILE
    try:
        data = ckpt.read_json(path)
        if not (isinstance(data, dict) and isinstance(data.get("model"), dict) and isinstance(data.get("train"), dict)):
            raise UserError(f"{path} has no 'model' and 'train' sections")
        return data
    except UserError as e:
        saved = ckpt.checkpoint_run_config(run_dir)
        if saved is None or not isinstance(saved.get("train"), dict):
            raise
        (warn or log.warning)(f"warning: {e}; using the copy in the latest checkpoint")
        return saved


def lr_schedule(step: int, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr at `steps`."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """`lr_schedule` with a TrainConfig's settings."""
    return lr_schedule(step, cfg.lr, cfg.min_lr, cfg.warmup, cfg.steps)


def param_groups(model: Transformer, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: matrices decayed; norms, biases, embeddings not."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.dim() < 2 or "embed_tokens" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model_config(cfg: TrainConfig, vocab_size: int, eos_id: int) -> ModelConfig:
    """The model config of a fresh run: the preset (or the --init run's config) with the data's
    vocabulary, the requested heads, and a context that fits seq_len."""
    heads = HeadsConfig.parse(cfg.heads)
    if cfg.init:
        base = ckpt.load_config(cfg.init)
        if vocab_size > base.vocab_size:
            raise UserError(f"the data's tokenizer has {vocab_size} ids but the --init model's vocabulary holds "
                            f"{base.vocab_size}: prepare the data with the model's tokenizer (--tokenizer {cfg.init})")
    else:
        base = ModelConfig.from_preset(cfg.preset, vocab_size=vocab_size)
    if cfg.max_seq_len and cfg.max_seq_len < cfg.seq_len:
        raise UserError(f"max_seq_len={cfg.max_seq_len} is shorter than seq_len={cfg.seq_len}: raise it or lower --seq-len")
    return base.with_heads(heads, eos_id=eos_id, max_seq_len=max(cfg.max_seq_len or base.max_seq_len, cfg.seq_len))


def load_backbone(model: Transformer, init_dir: str | Path, pass_through: bool = False) -> None:
    """Copy the backbone weights of run `init_dir` into `model`, then start the heads from them
    (`pass_through`: see `Transformer.init_heads_from_backbone`)."""
    path = Path(init_dir) / ckpt.WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"--init {init_dir}: {path.name} not found; point at a run directory made by train or convert")
    state = {k: v for k, v in ckpt.read_safetensors(path, "restore it or point --init at another run").items()
             if not k.startswith("mtp.")}
    result = model.load_state_dict(state, strict=False)
    missing = model.missing_weights(result.missing_keys, heads=False)
    if missing or result.unexpected_keys:
        raise UserError(f"--init {init_dir}: weights do not match its config.json (missing {missing[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]})")
    model.init_heads_from_backbone(pass_through)


def global_depth_weights(base: list[float], targets: list[Targets]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-micro-batch depth weights that make the summed, rank-averaged gradient equal the
    gradient of one global batch (see the module docstring). Stays on the targets' device: no
    host synchronisation per step.

    Args:
        base: the step's D+1 depth weights.
        targets: each micro-batch's `Targets` (built once; the loss reads them too).
    Returns:
        ((micro, D+1) float64 weights, (D+1,) global valid-target counts).
    """
    local = torch.stack([t.counts for t in targets]).double()  # (micro, D+1)
    total = parallel.all_reduce_sum(local.sum(0))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    base_t = torch.tensor(base, dtype=torch.float64, device=local.device)
    return base_t * world * local / total.clamp(min=1.0), total


def enable_ttt(model: Transformer) -> None:
    """Train (and evaluate) with the training-time test (`HeadFamily.ttt`)."""
    if model.mtp is None or not model.mtp.supports_ttt:
        raise UserError(f"--ttt needs heads that draft one depth after another (sequential:N); "
                        f"this model has {model.config.heads}: drop --ttt or use --heads sequential:N")
    model.mtp.ttt = True


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- metrics -------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl + TensorBoard + loss.png, on rank 0 only (other ranks get a no-op log)."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int) -> None:
        self.path, self.enabled, self.records = run_dir / METRICS_FILE, enabled, []
        self.run_dir, self.tb = run_dir, None
        if not enabled:
            return
        if self.path.is_file():
            # A resumed run drops what was logged after its checkpoint, so the curve has no duplicates.
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    r = json.loads(line)
                    if r.get("step", 0) <= resume_step:
                        self.records.append(r)
            outdir.atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in self.records)))
        from multitoken.viz import summary_writer

        # tensorboard is optional (the viz extra): JSONL and the plot carry the same numbers
        self.tb = summary_writer(str(run_dir / TB_DIR), purge_step=resume_step + 1 if resume_step else None)
        self.file = open(self.path, "a")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            split, step = record["split"], record["step"]
            for key in ("loss", "lr", "tokens_per_s", "expected_tau", "grad_norm"):
                if key in record:
                    self.tb.add_scalar(f"{split}/{key}", record[key], step)
            for name in ("loss", "accuracy"):
                for k, v in enumerate(record.get(f"{name}_per_depth", [])):
                    if v is not None:  # None: not computed (the main head's loss on a frozen backbone)
                        self.tb.add_scalar(f"{split}/{name}_depth{k}", v, step)

    def plot(self) -> None:
        """loss.png: one line per depth, train solid, validation dashed with markers."""
        if not self.enabled or not self.records:
            return
        from multitoken.viz import pyplot

        plt = pyplot("loss.png")
        if plt is None:
            return

        fig, ax = plt.subplots(figsize=(6, 4))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for split, style in (("train", "-"), ("val", "--o")):
            rows = [r for r in self.records if r["split"] == split]
            if not rows:
                continue
            for k in range(len(rows[-1]["loss_per_depth"])):
                kept = [r for r in rows if len(r["loss_per_depth"]) > k and r["loss_per_depth"][k] is not None]
                if not kept:
                    continue
                xs, ys = [r["step"] for r in kept], [r["loss_per_depth"][k] for r in kept]
                ax.plot(xs, ys, style, color=colors[k % len(colors)], markersize=3, linewidth=1.2,
                        label=f"{split} {'main' if k == 0 else '+' + str(k)}")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        outdir.atomic_write(self.run_dir / PLOT_FILE, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


# ---- the loop ------------------------------------------------------------------------------------


def train(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, max_minutes: float | None = None) -> dict[str, Any]:
    """Train a model on DATA_DIR into RUN_DIR (works alone and under torchrun).

    Args:
        cfg: the training configuration.
        data_dir: a DATA_DIR made by `multitoken prepare`.
        out_dir: the RUN_DIR to write.
        resume: continue from RUN_DIR's latest checkpoint (start fresh if it has none).
        progress: show a progress bar (rank 0).
        stop_after: stop (with a checkpoint) after this step, keeping the schedule of `cfg.steps`;
            for time-boxed jobs that `resume` later.
        max_minutes: stop (with a checkpoint) after the first step that ends past this much wall
            time from the start of training; ranks agree on the step. Resume continues exactly.
    Returns:
        Final metrics: step, train and validation loss per depth, validation accuracy per depth,
        expected_tau, tokens, seconds, tokens_per_s.
    """
    cfg.validate()
    started = torch.distributed.is_available() and torch.distributed.is_initialized()
    info = parallel.init_distributed(cfg.device)
    try:
        return _train(cfg, info, Path(data_dir), Path(out_dir), resume, progress, stop_after or cfg.steps, max_minutes)
    finally:
        if not started:
            parallel.cleanup()


def _train(cfg: TrainConfig, info: parallel.DistInfo, data_dir: Path, out_dir: Path, resume: bool, progress: bool,
           stop: int, max_minutes: float | None = None) -> dict[str, Any]:
    """The run, in its named parts: start (checks, where from), build, resume, then step, log,
    evaluate and save until `stop`."""
    say = log.info if info.is_main and progress else (lambda m: None)
    tokenizer, model_cfg, state = start(cfg, info, data_dir, out_dir, resume, say)
    t = Trainer.build(cfg, info, model_cfg, state, data_dir, out_dir)
    if state is not None:
        t.resume(state)
    t.write_run_dir(tokenizer, data_dir)
    t.log = MetricsLog(out_dir, info.is_main, t.step)
    say(t.describe())

    bar = None
    if info.is_main and progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=t.step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    t0, tokens_done, last_val, last_train = time.perf_counter(), 0, None, None
    window_t, window_tokens = time.perf_counter(), 0
    t.raw.train()
    try:
        stop = min(stop, cfg.steps)
        diverged = torch.full((), -1, dtype=torch.long, device=t.device)  # first step with a non-finite loss
        while t.step < stop:
            stats = t.train_step()
            diverged = first_nonfinite(diverged, stats, t.step)
            if t.step % cfg.log_every == 0 or t.step == stop or (cfg.eval_every and t.step % cfg.eval_every == 0) \
                    or (cfg.save_every and t.step % cfg.save_every == 0) or max_minutes is not None:
                check_finite(diverged, out_dir)  # before anything is logged or saved: NaN never reaches a file
            tokens_done += t.tokens_per_step
            window_tokens += t.tokens_per_step
            if max_minutes is not None and t.step < stop and out_of_time(t0, max_minutes, t.device, info.distributed):
                stop = t.step  # evaluate and save below, as at the last step
                say(f"time budget of {max_minutes:g} min spent: stopping at step {t.step} (continue with --resume)")
            if t.step % cfg.log_every == 0 or t.step == stop:
                now = time.perf_counter()
                last_train = t.log_train(stats, window_tokens / max(now - window_t, 1e-9), bar)
                window_t, window_tokens = now, 0
            if bar is not None:
                bar.update(1)
            if (cfg.eval_every and t.step % cfg.eval_every == 0) or t.step == stop:
                last_val = {"split": "val", "step": t.step, **t.evaluate(), "time": time.time()}
                t.log.log(last_val)
                if info.is_main:
                    t.log.plot()
            if (cfg.save_every and t.step % cfg.save_every == 0) or t.step == stop:
                t.save()
        if last_val is None:  # resumed at or past the last step: nothing trained, still report
            last_val = {"split": "val", "step": t.step, **t.evaluate()}
    finally:
        if bar is not None:
            bar.close()
        t.log.close()

    seconds = time.perf_counter() - t0
    if info.is_main:
        t.log.plot()
        plot_accuracy(last_val, out_dir / "accuracy_per_depth.png")
    return {
        "step": t.step,
        "train_loss": last_train["loss"] if last_train else None,
        "train_loss_per_depth": last_train["loss_per_depth"] if last_train else None,
        "val_loss_per_depth": last_val["loss_per_depth"],
        "val_accuracy_per_depth": last_val["accuracy_per_depth"],
        "expected_tau": last_val["expected_tau"],
        "tokens": tokens_done,
        "seconds": seconds,
        "tokens_per_s": tokens_done / max(seconds, 1e-9),
        **({"max_memory_gib": torch.cuda.max_memory_allocated(t.device) / 2**30} if t.device.type == "cuda" else {}),
    }


def start(cfg: TrainConfig, info: parallel.DistInfo, data_dir: Path, out_dir: Path, resume: bool,
          say: Callable[[str], None]) -> tuple[Any, ModelConfig, dict[str, Any] | None]:
    """Checks before any work, and where the run starts from.

    Returns:
        (the data's tokenizer, the model's config, the checkpoint to resume or None).
    """
    from multitoken.data.prepare import load_meta, load_tokenizer

    warn = log.warning if info.is_main else (lambda m: None)
    outdir.check(out_dir, "train")  # before anything reads or writes there: a folder of someone else's is refused
    load_meta(data_dir)  # a one-line error for a missing or incomplete DATA_DIR
    tokenizer = load_tokenizer(data_dir)
    has_checkpoint = (out_dir / ckpt.CHECKPOINTS_DIR / ckpt.LATEST_FILE).is_file()
    if cfg.freeze_backbone and HeadsConfig.parse(cfg.heads).kind == "none" and not (resume and has_checkpoint):
        raise UserError("--freeze-backbone leaves nothing to train: the model has no MTP heads (add --heads KIND:N)")
    per_rank, rem = divmod(cfg.batch_size, info.world_size * cfg.grad_accum)
    if rem or per_rank < 1:
        raise UserError(f"batch_size={cfg.batch_size} must be a multiple of world size x grad_accum = "
                        f"{info.world_size} x {cfg.grad_accum}")
    if not has_checkpoint and (out_dir / ckpt.WEIGHTS_FILE).is_file():  # trained, then checkpoints/ went
        raise UserError(f"{out_dir} holds trained weights but no checkpoints/ to continue from: train a new run "
                        f"from them with --init {out_dir} --out NEW_DIR")
    if has_checkpoint and not resume:
        raise UserError(f"{out_dir} already holds a run: pass --resume to continue it or choose another --out")
    state = ckpt.load_latest_checkpoint(out_dir, warn) if resume else None  # falls back past a damaged latest one
    if resume and state is None:
        say(f"note: {out_dir} has no checkpoint yet; starting from step 0")
    if state is not None:
        saved = state["state"].get("config") or saved_run_config(out_dir, warn)
        model_cfg = ckpt.complete_model_config(saved["model"], state["folder"] / ckpt.STATE_FILE)
        check_model_options(cfg, from_dict(TrainConfig, saved["train"]))
        check_resume_tokenizer(tokenizer, out_dir, data_dir, model_cfg)
    else:
        model_cfg = build_model_config(cfg, tokenizer.vocab_size, tokenizer.eos_id)
        if cfg.init:  # equal sizes are not enough: ids must mean the same text to the --init model
            check_same_tokenizer(cfg.init, data_dir, f"prepare the data with the --init model's tokenizer "
                                 f"(--tokenizer {Path(cfg.init) / 'tokenizer.json'})")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise UserError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}: lower --seq-len")
    return tokenizer, model_cfg, state


@dataclass
class StepStats:
    """What one optimizer step measured, summed over its micro-batches (this rank's share)."""

    ce_sum: torch.Tensor
    """(D+1,) cross-entropy summed over valid targets, per depth."""
    correct: torch.Tensor
    """(D+1,) correct top-1 predictions, per depth."""
    counts: torch.Tensor
    """(D+1,) valid targets of the global step, per depth."""
    grad_norm: torch.Tensor
    """Gradient norm before clipping."""


class Trainer:
    """One training run's model, optimizer, data and loss, and the parts of the loop that use them:
    `build`, `resume`, `train_step`, `evaluate`, `save`, `log_train`. `fit_heads` (retrofit.py)
    shares the schedule (`lr_schedule`) and the update (`optimizer_update`).
    """

    def __init__(self, cfg: TrainConfig, info: parallel.DistInfo, model_cfg: ModelConfig, raw: Transformer,
                 model: torch.nn.Module, optimizer: torch.optim.Optimizer, data_dir: Path, out_dir: Path) -> None:
        from multitoken.data.loader import TokenLoader

        self.cfg, self.info, self.model_cfg, self.raw, self.model, self.optimizer = cfg, info, model_cfg, raw, model, optimizer
        self.device, self.out_dir, self.step = info.device, out_dir, 0
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if uses_bf16(cfg, self.device) else contextlib.nullcontext
        self.trainable = [p for g in optimizer.param_groups for p in g["params"]]
        self.names = {id(p): n for n, p in raw.named_parameters()}
        per_rank = cfg.batch_size // (info.world_size * cfg.grad_accum)
        self.loader = TokenLoader(data_dir, "train", per_rank, cfg.seq_len, cfg.seed, info.rank, info.world_size)
        self.val_loader = TokenLoader(data_dir, "val", per_rank, cfg.seq_len, cfg.seed, info.rank, info.world_size)
        # A frozen backbone gives the main head's loss no gradient: training steps skip its LM-head
        # matmul and CE (evaluation still measures it).
        self.skip_main = cfg.freeze_backbone
        self.recompute_note = ""
        # One loss for the run, its kernel resolved here once; each micro-batch passes its targets and weights.
        self.loss = MTPLoss(raw.depth, resolve_weights(cfg.loss_weights, model_cfg.heads.kind, raw.depth),
                            cfg.mtp_lambda, model_cfg.eos_id, cfg.distill, cfg.loss_chunk_rows, cfg.loss_kernel,
                            self.skip_main, compile=cfg.compile)
        self.loss_kernel = self.loss.kernel_on(self.device)
        self.run_config = {"model": model_cfg.to_dict(), "train": cfg.to_dict()}
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        self.log: MetricsLog | None = None

    # ---- build and resume -------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: TrainConfig, info: parallel.DistInfo, model_cfg: ModelConfig, state: dict[str, Any] | None,
              data_dir: Path, out_dir: Path) -> "Trainer":
        """The model (from a checkpoint, `cfg.init` or random), wrapped for DDP/FSDP, and its optimizer."""
        device = info.device
        torch.manual_seed(cfg.seed)
        model = Transformer(model_cfg).to(device)
        if state is not None:
            try:
                result = model.load_state_dict({k: v.to(device) for k, v in state["weights"].items()}, strict=False)
            except RuntimeError as e:  # a shape mismatch
                raise UserError(f"{state['folder']}: weights do not match the run's config ({str(e).splitlines()[-1].strip()})") from None
            bad = model.missing_weights(result.missing_keys)
            if bad or result.unexpected_keys:
                raise UserError(f"{state['folder']}: weights do not match {out_dir / ckpt.CONFIG_FILE}; was it edited?")
        elif cfg.init:
            load_backbone(model, cfg.init, cfg.eh_pass_through)
            if cfg.init_heads:
                load_heads_into(model, cfg.init_heads)
        elif cfg.init_heads:
            raise UserError("--init-heads needs --init: the backbone the heads file was trained on")
        if cfg.ttt:
            enable_ttt(model)
        if cfg.freeze_backbone:
            model.freeze_backbone()  # frozen blocks record no autograd graph: none of their inputs needs a gradient
        raw = model
        per_rank = cfg.batch_size // (info.world_size * cfg.grad_accum)
        recompute_note = parallel.apply_recompute(raw, cfg.recompute, per_rank * cfg.seq_len, device, uses_bf16(cfg, device))
        if cfg.compile:
            parallel.apply_compile(raw)
        if info.distributed:
            model = parallel.apply_fsdp(raw, info) if cfg.fsdp else parallel.apply_ddp(raw, info)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # what float32 matmuls remain (outside autocast) use TF32
            torch.backends.cudnn.allow_tf32 = True
        optimizer = torch.optim.AdamW(param_groups(raw, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                      fused=device.type == "cuda" and not cfg.fsdp)
        trainer = cls(cfg, info, model_cfg, raw, model, optimizer, data_dir, out_dir)
        trainer.recompute_note = recompute_note
        return trainer

    def resume(self, state: dict[str, Any]) -> None:
        """Continue exactly where a checkpoint stopped: optimizer, data position, RNG and step."""
        if state["optimizer"] is not None:
            load_optimizer(self.model, self.optimizer, state["optimizer"], self.names, self.cfg.fsdp and self.info.distributed)
        self.loader.load_state_dict(state["state"]["loader"])
        set_rng_state(state["rng"], self.device)
        self.step = state["step"]

    def write_run_dir(self, tokenizer, data_dir: Path) -> None:
        """Claim RUN_DIR and write what `load_run` needs besides the weights (rank 0)."""
        if not self.info.is_main:
            return
        out_dir = self.out_dir
        outdir.claim(out_dir, "train")  # the ownership marker first, then our files
        ckpt.remove_stale_temporaries(out_dir, RUN_FILES)
        tokenizer.save(out_dir)
        outdir.write_json(out_dir / ckpt.CONFIG_FILE, {**self.run_config,
                                                     "data": {"dir": str(data_dir), "vocab_size": tokenizer.vocab_size,
                                                              "tokenizer_sha256": tokenizer.fingerprint()}})

    def describe(self) -> str:
        raw, info, cfg = self.raw, self.info, self.cfg
        return (f"model: {raw.num_parameters(heads=False) / 1e6:.2f}M backbone + "
                f"{(raw.num_parameters() - raw.num_parameters(heads=False)) / 1e6:.2f}M heads ({self.model_cfg.heads}), "
                f"{sum(p.numel() for p in self.trainable) / 1e6:.2f}M trainable; {info.world_size} process(es) on {self.device}"
                f"{', FSDP2' if cfg.fsdp and info.distributed else ', DDP' if info.distributed else ''}; "
                f"{self.tokens_per_step} tokens/step\n"
                f"loss: {self.loss_kernel}{'; depths >= 1 distilled (KL, the teacher once per batch)' if cfg.distill else ''}"
                f"{'; training-time test at depths >= 2' if cfg.ttt else ''}; "
                f"{self.recompute_note}"
                f"{'; main-head loss skipped in training steps (frozen backbone; measured at evaluation)' if self.skip_main else ''}")

    # ---- the loop's parts -------------------------------------------------------------------
    def train_step(self) -> StepStats:
        """One optimizer step over grad_accum micro-batches (exact averaging: module docstring)."""
        cfg, raw, D, eos_id = self.cfg, self.raw, self.raw.depth, self.model_cfg.eos_id
        lr = lr_at(self.step, cfg)
        batches = [self.next_batch() for _ in range(cfg.grad_accum)]  # [(window, loss mask or None)]
        targets = [Targets.build(w, D, eos_id, m) for w, m in batches]  # once per micro-batch, read twice
        weights, counts = global_depth_weights(self.loss.depth_weights(self.step), targets)
        ce_sum = torch.zeros(D + 1, dtype=torch.float64, device=self.device)
        correct = torch.zeros(D + 1, dtype=torch.float64, device=self.device)
        for j, ((window, _), target) in enumerate(zip(batches, targets)):
            with parallel.no_sync(self.model, j == len(batches) - 1):
                with self.autocast():
                    out = self.loss(raw, self.model(window[:, :-1]), window, self.step, targets=target, weights=weights[j])
                out.loss.backward()
            c = out.per_depth_count.double()
            ce_sum += out.per_depth_loss.double() * c
            correct += out.per_depth_acc.double() * c
        grad_norm = optimizer_update(self.optimizer, self.trainable, lr, cfg.grad_clip)
        self.step += 1
        return StepStats(ce_sum, correct, counts, grad_norm)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next training window (B, T+1) and its loss mask (or None), on the device: the loader
        yields a tensor, or a (tokens, mask) pair when the data carries a loss mask."""
        window, mask = split_batch(next(self.loader))
        return window.to(self.device, non_blocking=True), None if mask is None else mask.to(self.device, non_blocking=True)

    def log_train(self, stats: StepStats, tokens_per_s: float, bar=None) -> dict[str, Any]:
        """Reduce a step's statistics over ranks and log them (metrics.jsonl, TensorBoard, the bar)."""
        D, step = self.raw.depth, self.step
        sums = parallel.all_reduce_sum(torch.cat([stats.ce_sum, stats.correct])).cpu()
        c = stats.counts.cpu().clamp(min=1)
        per_depth = (sums[: D + 1] / c).tolist()
        accuracy = (sums[D + 1:] / c).tolist()
        if self.skip_main:  # not computed: None in the log, "-" on the bar, out of the total
            per_depth[0] = accuracy[0] = None
        base_w = self.loss.depth_weights(step - 1)
        gn = stats.grad_norm.full_tensor() if hasattr(stats.grad_norm, "full_tensor") else stats.grad_norm
        record = {"split": "train", "step": step, "loss": sum(w * l for w, l in zip(base_w, per_depth) if l is not None),
                  "loss_per_depth": per_depth, "accuracy_per_depth": accuracy,
                  **({"main_loss": "skipped (frozen backbone)"} if self.skip_main else {}),
                  "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": float(gn), "tokens_per_s": tokens_per_s,
                  "tokens": step * self.tokens_per_step, "time": time.time()}
        if self.device.type == "cuda":
            record["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log.log(record)
        if bar is not None:
            bar.set_postfix_str(" ".join(f"{'L' if k == 0 else '+' + str(k)} {'-' if v is None else f'{v:.3f}'}"
                                         for k, v in enumerate(per_depth))
                                + f" | {tokens_per_s / 1e3:.1f}k tok/s", refresh=False)
        return record

    def evaluate(self) -> dict[str, Any]:
        """Per-depth validation loss/accuracy and expected tau, summed over ranks."""
        # eval_batches x grad_accum micro-batches cover the same windows whatever the accumulation.
        batches = self.val_loader.eval_batches(self.cfg.eval_batches * self.cfg.grad_accum)
        stats = eval_stats(self.raw, batches, self.model_cfg.eos_id, self.device, self.autocast)
        flat = parallel.all_reduce_sum(stats.flat().to(self.device)).cpu()
        return summarize(EvalStats.zeros(self.raw.depth).load_flat_(flat))

    def save(self) -> None:
        """The latest weights and a checkpoint for exact resume (gathered to rank 0 under FSDP2)."""
        info, cfg, out_dir = self.info, self.cfg, self.out_dir
        weights = gather_weights(self.model, self.raw, info, cfg.fsdp)
        optim = gather_optimizer(self.model, self.optimizer, self.names, info, cfg.fsdp)
        loader_state = self.loader.state_dict()
        if info.is_main:  # the checkpoint first: run weights with no checkpoint mean a finished run lost its own
            ckpt.save_checkpoint(out_dir, self.step, weights, optim, rng_state(self.device),
                                 {"loader": loader_state, "world_size": info.world_size, "config": self.run_config},
                                 cfg.keep_checkpoints)
            ckpt.save_tensors(out_dir / ckpt.WEIGHTS_FILE, weights)  # what load_run reads: the latest weights
        parallel.barrier()


def first_nonfinite(first: torch.Tensor, stats: StepStats, step: int) -> torch.Tensor:
    """`first`, or `step` when it is still -1 and this step's gradient norm is not finite.

    Stays on the device (no sync per step). The gradient norm is non-finite whenever a rank's loss
    is, and the same on every rank, so all ranks stop at the same step (a per-depth loss is NaN
    by design where it is not computed: the main head's under a frozen backbone).
    """
    gn = stats.grad_norm.full_tensor() if hasattr(stats.grad_norm, "full_tensor") else stats.grad_norm
    bad = ~torch.isfinite(gn)
    return torch.where((first < 0) & bad, torch.full_like(first, step), first)


def check_finite(first: torch.Tensor, out_dir: Path) -> None:
    """Stop (one line) once a step's loss was not finite: RUN_DIR keeps its last good checkpoint."""
    step = int(first.item())
    if step >= 0:
        latest = ckpt.checkpoint_folders(out_dir)
        kept = f"{out_dir} keeps its checkpoint {latest[0].name}" if latest else "nothing was saved"
        raise UserError(f"the loss was not finite at step {step} (training diverged): {kept}; lower --lr (or raise "
                        f"--warmup, set --grad-clip) and train again")


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the run computes under bf16 autocast (`cfg.dtype`, 'auto' meaning on CUDA)."""
    return cfg.dtype in ("bfloat16", "bf16") or (cfg.dtype == "auto" and device.type == "cuda")


def optimizer_update(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], lr: float,
                     grad_clip: float) -> torch.Tensor:
    """Clip the gradients (0: no clipping), step at learning rate `lr`, clear the gradients.

    Returns:
        The gradient norm before clipping.
    """
    for g in optimizer.param_groups:
        g["lr"] = lr
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def out_of_time(t0: float, max_minutes: float, device: torch.device, distributed: bool) -> bool:
    """Whether the time budget is spent, as rank 0's clock says (every rank stops at the same step)."""
    over = time.perf_counter() - t0 > 60 * max_minutes
    if not distributed:
        return over
    flag = torch.tensor([float(over)], device=device)
    torch.distributed.broadcast(flag, 0)
    return bool(flag.item())


# ---- checkpoint plumbing: plain, DDP and FSDP2 ------------------------------------------------


def check_resume_tokenizer(tokenizer, run_dir: Path, data_dir: Path, model_cfg: ModelConfig) -> None:
    """Refuse to resume on data tokenized otherwise than the run (its tokenizer.json would be replaced)."""
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"DATA_DIR's tokenizer has {tokenizer.vocab_size} ids, more than the run's model ({model_cfg.vocab_size}): "
                        "resume on the data the run was trained on")
    check_same_tokenizer(run_dir, data_dir, "resume on the data the run was trained on")


def gather_weights(model, raw: Transformer, info: parallel.DistInfo, fsdp: bool) -> dict[str, torch.Tensor]:
    """Full CPU weights as `checkpoint.model_state` stores them (complete on rank 0 under FSDP2)."""
    if not (fsdp and info.distributed):
        return ckpt.model_state(raw)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.contiguous() for k, v in raw.weights_to_store(state).items()}


def gather_optimizer(model, optimizer: torch.optim.Optimizer, names: dict[int, str], info: parallel.DistInfo,
                     fsdp: bool) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, on CPU (complete on rank 0 under FSDP2)."""
    if fsdp and info.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sd = optimizer.state_dict()
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state = {order[i]: {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for i, s in sd["state"].items()}
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer(model, optimizer: torch.optim.Optimizer, saved: dict[str, Any], names: dict[int, str], fsdp: bool) -> None:
    """Restore a name-keyed optimizer state written by `gather_optimizer`."""
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if sorted(order) != sorted(saved["state"].keys() | {n for g in saved["param_groups"] for n in g["params"]}):
        raise UserError("the checkpoint's optimizer holds other parameters than this run trains "
                        "(was --freeze-backbone or --heads changed?): resume with the original settings")
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
        return
    index = {n: i for i, n in enumerate(order)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": {index[n]: s for n, s in saved["state"].items()}, "param_groups": groups})
