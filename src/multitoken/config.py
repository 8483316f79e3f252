"""Typed configuration: the model (with its MTP heads) and named presets.

Configs are dataclasses with a docstring per field. They serialise to JSON (the resolved
config is written next to every run's outputs) and are read back with unknown keys rejected,
so a typo in a config file is an error and never silently ignored.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from multitoken.errors import UserError

HEAD_KINDS = ("none", "parallel", "sequential", "medusa")


@dataclass
class HeadsConfig:
    """Which multi-token-prediction heads sit on top of the backbone."""

    kind: str = "none"
    """'none', 'parallel' (Gloeckle et al.), 'sequential' (DeepSeek-V3 MTP modules) or 'medusa'."""
    depth: int = 0
    """Extra future tokens predicted per position, beyond the next one. `parallel` with depth 3 is
    the paper's n=4 (main head + 3); `sequential` with depth 1 is DeepSeek-V3's D=1."""
    medusa_layers: int = 1
    """Residual SiLU blocks per Medusa head."""

    @classmethod
    def parse(cls, spec: str) -> "HeadsConfig":
        """Parse the CLI form ``KIND:DEPTH`` (e.g. ``parallel:3``) or ``none``."""
        kind, _, n = spec.partition(":")
        if kind == "none" and not n:
            return cls()
        if kind not in HEAD_KINDS[1:] or not n.isdigit():
            raise UserError(f"--heads {spec!r}: expected parallel:N, sequential:N, medusa:N or none (N >= 1)")
        return cls(kind=kind, depth=int(n))

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.depth}"


@dataclass
class ModelConfig:
    """A Llama-family decoder (Llama, Qwen2, Mistral, SmolLM2 map onto it one to one) plus MTP heads."""

    vocab_size: int = 256
    """Rows of the embedding and the LM head; must be at least the tokenizer's vocabulary."""
    dim: int = 64
    """Hidden size d."""
    n_layers: int = 4
    """Transformer blocks of the main model (for parallel heads the trunk is the first n_layers-1)."""
    n_heads: int = 4
    """Query heads."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide n_heads."""
    head_dim: int = 0
    """Per-head size; 0 means dim // n_heads."""
    intermediate_size: int = 176
    """SwiGLU hidden size."""
    max_seq_len: int = 256
    """Longest sequence (prompt + generation); sizes the RoPE table and the KV cache."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the embedding matrix with the LM head."""
    attention_bias: bool = False
    """Bias on the q/k/v projections (Qwen2 has it)."""
    eos_id: int = 0
    """End-of-sequence token: separates packed documents and stops generation."""
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    """Multi-token-prediction heads."""

    def __post_init__(self) -> None:
        if isinstance(self.heads, dict):
            self.heads = from_dict(HeadsConfig, self.heads)
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise UserError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}: set head_dim or change one of them")
            self.head_dim = self.dim // self.n_heads
        self.validate()

    def validate(self) -> None:
        """Raise a one-line `UserError` for a configuration that cannot be built."""
        h = self.heads
        checks = [
            (self.vocab_size > 0 and self.dim > 0 and self.n_layers > 0, "vocab_size, dim and n_layers must be positive"),
            (self.n_heads > 0 and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
             f"n_heads={self.n_heads} must be a positive multiple of n_kv_heads={self.n_kv_heads}"),
            (self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE"),
            (h.kind in HEAD_KINDS, f"heads.kind={h.kind!r}: choose one of {', '.join(HEAD_KINDS)}"),
            (h.kind == "none" or h.depth >= 1, f"heads {h.kind} with depth {h.depth}: give at least one extra head (e.g. {h.kind}:2) or use 'none'"),
            (h.kind != "none" or h.depth == 0, f"heads kind 'none' with depth {h.depth}: name a head family (parallel, sequential or medusa)"),
            (h.kind != "parallel" or self.n_layers >= 2,
             f"parallel heads need a trunk: n_layers={self.n_layers} must be at least 2"),
            (h.kind != "parallel" or h.depth < self.n_layers,
             f"parallel:{h.depth} asks for more heads than the model has layers ({self.n_layers}): use at most parallel:{self.n_layers - 1} or a deeper preset"),
            (h.medusa_layers >= 1, "heads.medusa_layers must be at least 1"),
            (0 <= self.eos_id < self.vocab_size, f"eos_id={self.eos_id} is outside the vocabulary (size {self.vocab_size})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    @property
    def n_cache_layers(self) -> int:
        """KV-cache slots: one per block, the MTP heads' own blocks included."""
        return self.n_layers + (self.heads.depth if self.heads.kind in ("parallel", "sequential") else 0)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset (see `PRESETS`) with fields overridden."""
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return from_dict(cls, {**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Shapes; vocab_size is usually replaced by the tokenizer's. Parameter counts at a 32k vocabulary.
PRESETS: dict[str, dict[str, Any]] = {
    # ~0.8M parameters at a 4k vocabulary (~1M with heads): trains in seconds on a CPU, for tests and smoke runs.
    "tiny": dict(dim=96, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=256, max_seq_len=256, vocab_size=4096),
    # ~5M non-embedding: the CPU demo trains it for a few minutes.
    "small": dict(dim=192, n_layers=6, n_heads=6, n_kv_heads=2, intermediate_size=512, max_seq_len=512, vocab_size=8192),
    # ~30M: a laptop-GPU or a long CPU run.
    "medium": dict(dim=384, n_layers=12, n_heads=6, n_kv_heads=2, intermediate_size=1024, max_seq_len=1024, vocab_size=32768),
    # GPT-2-small-sized Llama, ~125M.
    "base": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, intermediate_size=2048, max_seq_len=2048, vocab_size=32768),
    # SmolLM2-135M's shape (convert a real checkpoint for its weights).
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536, max_seq_len=2048,
                         vocab_size=49152, rope_theta=100000.0),
    # ~350M.
    "large": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, intermediate_size=2816, max_seq_len=2048, vocab_size=32768),
}


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys with a message that lists the known ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"unknown {cls.__name__} key(s) {', '.join(unknown)}: known keys are {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            v = from_dict(hints[k], v)
        kwargs[k] = v
    return cls(**kwargs)
