"""Distributed training and compilation, applied to the model from outside.

The model code (model/) is single-device and knows nothing of this file. Training
calls `init_distributed` once, then wraps the model with `apply_ddp` (replicate, all-reduce the
gradients) or `apply_fsdp` (FSDP2: shard parameters, gradients and optimizer state), and
optionally `apply_compile`. The same code runs as one plain process (``python -m multitoken
train``) and under ``torchrun``: without the torchrun environment variables `init_distributed`
returns a world of one and every collective helper here is a no-op.

Also applied from outside, for speed: `apply_recompute` (activation checkpointing of the MTP
heads' blocks, on only where memory needs it) and `attention_backend` (which SDPA kernel runs).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from multitoken.config import RECOMPUTE_MODES
from multitoken.errors import BadValue, UserError


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    """Global rank; rank 0 alone writes files and shows progress."""
    world_size: int = 1
    """Number of processes."""
    local_rank: int = 0
    """Rank on this host (picks the GPU)."""
    device: torch.device = torch.device("cpu")
    """This process's device."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> this process's GPU when CUDA is available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadValue("device", name, "CUDA is not available on this machine; use {setting} cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise BadValue("device", repr(name), "expected auto, cpu, cuda or cuda:N") from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one (NCCL on GPU, gloo on CPU).

    Args:
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'.
    Returns:
        This process's `DistInfo`; a world of one outside torchrun.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=resolve_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev)


def cleanup() -> None:
    """Leave the process group (safe to call when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def apply_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """Replicate `model` on every rank; gradients are averaged in backward.

    Returns:
        The DDP wrapper (call ``.module`` for the model); `model` itself when the world is one.
    """
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def apply_fsdp(model: nn.Module, info: DistInfo, mixed_bf16: bool = False) -> nn.Module:
    """Shard `model` with FSDP2: each transformer block (backbone and MTP heads) is one unit,
    then the root holds the embeddings, norms and LM heads.

    The root and the MTP units are not resharded after forward: the loss reads the unembedding
    matrices (``model.unembed_weight``) after the forward pass, and the sequential modules'
    final norms run outside their module's call, so those parameters must stay gathered until
    backward. A Medusa head's projection therefore lives in the root, its residual blocks in a unit.

    Args:
        model: the Transformer, already on its device.
        info: from `init_distributed`.
        mixed_bf16: compute in bf16 with fp32 gradient reduction (FSDP's own mixed precision).
    Returns:
        `model` itself (FSDP2 converts it in place).
    """
    if not info.distributed:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {}
    if mixed_bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, **kw)
    for unit in _mtp_units(model):
        fully_shard(unit, reshard_after_forward=False, **kw)
    fully_shard(model, reshard_after_forward=False, **kw)
    return model


COMPILE_MODES = ("blocks", "model")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
RECOMPUTE_BUDGET = 0.8
"""`apply_recompute` "auto" stores the heads' activations when the step's estimated memory
without recomputation stays under this share of the device's memory."""


def apply_compile(model: nn.Module, mode: str = "blocks") -> nn.Module:
    """torch.compile the model in place (parameter names do not change).

    Args:
        mode: "blocks" compiles every transformer block (and MTP unit) alone: the compile time of
            one block, and FSDP2 units and the loss (a custom autograd function) stay outside the
            compiled graphs; "model" compiles the whole forward pass (the norms, embedding and
            heads' glue fuse too; longer to compile).
    """
    if mode not in COMPILE_MODES:
        raise UserError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if mode == "model":
        model.compile()
        return model
    for block in [*model.layers, *_mtp_units(model)]:
        block.compile()
    return model


def block_activation_bytes(model: nn.Module, bf16: bool) -> int:
    """Bytes one transformer block of `model` keeps for backward, per token: about 28 d + 8 I
    under bf16 autocast (d the width, I the MLP's), twice that in float32. Calibrated on the base
    preset, 16 x 2048 tokens on an H200 (bench/results/train_base.json): 17.0 GiB measured for a
    plain step, 15.9 GiB estimated by `training_bytes` (a rough guide, not a bound)."""
    cfg = model.config
    return (30 * cfg.dim + 8 * cfg.intermediate_size) * (1 if bf16 else 2)


def training_bytes(model: nn.Module, tokens: int, bf16: bool, recompute: bool) -> int:
    """Estimated peak bytes of a training step over `tokens` tokens (per micro-batch and rank):
    weights (4 bytes each), gradients and AdamW's two moments (12 per trainable weight), and
    the stored activations of the blocks that build a graph (a frozen backbone's do not; with
    `recompute` only one head block's activations are alive at a time)."""
    params = {id(p): p for p in model.parameters()}.values()
    fixed = sum(4 * p.numel() + (12 * p.numel() if p.requires_grad else 0) for p in params)
    per_block = block_activation_bytes(model, bf16) * tokens
    backbone = len(model.layers) if any(p.requires_grad for p in model.layers.parameters()) else 0
    heads = getattr(model, "mtp", None)
    head_blocks = sum(1 for m in heads.modules() if hasattr(m, "self_attn")) if heads is not None else 0
    residual = sum(1 for m in heads.modules() if hasattr(m, "linear")) if heads is not None else 0
    stored_heads = min(head_blocks, 1) if recompute else head_blocks
    return fixed + per_block * (backbone + stored_heads) + residual * 8 * model.config.dim * tokens


def device_memory(device: torch.device) -> int:
    """Total memory of `device` in bytes (the GPU's, or the host's RAM)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def apply_recompute(model: nn.Module, mode: str, tokens: int, device: torch.device, bf16: bool) -> str:
    """Turn the MTP heads' activation checkpointing on or off (`HeadFamily.run`).

    Args:
        mode: "on", "off", or "auto": off when `training_bytes` without recomputation is within
            `RECOMPUTE_BUDGET` of the device's memory, on otherwise.
        tokens: tokens per micro-batch on this rank.
    Returns:
        One line for the log: the choice and, for auto, the estimate behind it.
    """
    if mode not in RECOMPUTE_MODES:
        raise UserError(f"--recompute {mode!r}: choose one of {', '.join(RECOMPUTE_MODES)}")
    heads = getattr(model, "mtp", None)
    if heads is None:
        return "recompute: no heads"
    why = ""
    if mode == "auto":
        need, have = training_bytes(model, tokens, bf16, recompute=False), device_memory(device)
        on = need > RECOMPUTE_BUDGET * have
        why = (f" (auto: ~{need / 2**30:.1f} GiB estimated without it, "
               f"{'over' if on else 'within'} {RECOMPUTE_BUDGET:.0%} of {have / 2**30:.0f} GiB)")
    else:
        on = mode == "on"
    heads.recompute = on
    return f"recompute of the heads' blocks: {'on' if on else 'off'}{why}"


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    """A context that makes `scaled_dot_product_attention` use one kernel ("auto": torch's choice).

    Under torch.compile the kernel is chosen when a graph is traced: enter the context before
    the first compiled call (and reset dynamo to compare backends in one process).
    """
    if name not in ATTENTION_BACKENDS:
        raise UserError(f"attention backend {name!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name])


def _mtp_units(model: nn.Module) -> Iterator[nn.Module]:
    """The MTP heads' modules that are called as a whole in forward (each family names its own)."""
    mtp = getattr(model, "mtp", None)
    if mtp is not None:
        yield from mtp.fsdp_units()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (FSDP2 and compile keep the module itself)."""
    return getattr(model, "module", model)


def no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce for a micro-batch that is not the last of its step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj):
    """List of `obj` from every rank (``[obj]`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
