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

from multitoken.checks import DTYPE_ALIASES, INT63, Floats, Ints, Range, dtype_name
from multitoken.errors import BadValue, UserError

MAX_HEAD_DEPTH = 16
"""Most extra heads a model may have: Medusa ships 5, Gloeckle et al. train up to n=8 (depth 7),
DeepSeek-V3 one; far beyond that a typo (``medusa:1000000``) would only run out of memory."""
MAX_SEQ_LEN = 1 << 21
"""Longest context we build a static KV cache for (2M positions)."""
ROPE_KINDS = ("default", "linear", "llama3")
"""`RopeScaling.kind` values (model/layers.py's `rope_tables` computes them as transformers does)."""
ACTIVATIONS = ("silu", "gelu_tanh")
"""`ModelConfig.hidden_act` values: SwiGLU (Llama family) or GeGLU with tanh-approximated GELU (Gemma)."""
MAX_EOS_IDS = 8
"""Most end-of-sequence ids a model may stop on (Llama-3.x has 3, Gemma-3 2)."""
LOSS_KERNELS = ("auto", "chunked", "naive", "liger")
"""`TrainConfig.loss_kernel` values (training/loss.py runs them)."""
RECOMPUTE_MODES = ("auto", "on", "off")
"""`TrainConfig.recompute` values (training/parallel.py's `apply_recompute`)."""


@dataclass
class HeadsConfig:
    """Which multi-token-prediction heads sit on top of the backbone."""

    kind: str = "none"
    """'none' or a head family's kind (model/heads/registry.py): 'parallel' (Gloeckle et al.),
    'sequential' (DeepSeek-V3 MTP modules) or 'medusa'."""
    depth: int = 0
    """Extra future tokens predicted per position, beyond the next one. `parallel` with depth 3 is
    the paper's n=4 (main head + 3); `sequential` with depth 1 is DeepSeek-V3's D=1."""
    medusa_layers: int = 1
    """Residual SiLU blocks per Medusa head."""
    shared: bool = False
    """Sequential only: one MTP module serves every depth (EAGLE's single draft layer, run D times),
    instead of DeepSeek-V3's one module per depth. Each depth keeps its own KV-cache layer."""
    fused: bool = False
    """Sequential only: depth 1's hidden input is ``fc(cat[h_a, h_b, ...])``, states of a low, a middle
    and a high layer of the backbone (EAGLE-3's fused features, `fused_layers`), instead of h^0 alone."""
    fused_layers: list[int] = field(default_factory=list)
    """With `fused`: the backbone states fused, each named by how many blocks ran before it (0: the
    embeddings, n_layers: h^0), increasing and ending with n_layers. Empty: `default_fused_layers`,
    filled in when the model config is built, so a stored config names its layers exactly."""

    @classmethod
    def parse(cls, spec: str) -> "HeadsConfig":
        """Parse the CLI form ``KIND:DEPTH`` (e.g. ``parallel:3``), ``KIND:DEPTH:FLAG[:FLAG]`` for a
        family's flags (``sequential:2:shared``, ``sequential:4:shared:fused``) or ``none``."""
        from multitoken.model.heads.registry import family, kinds

        kind, _, rest = str(spec).partition(":")
        n, *flags = rest.split(":")
        if kind == "none" and not rest:
            return cls()
        try:
            if kind not in kinds() or any(f not in family(kind).flags for f in flags) or len(set(flags)) < len(flags):
                raise ValueError(kind)
            depth = int(HEADS_RANGES["depth"].parse(n))
            if depth < 1:
                raise ValueError(n)
        except ValueError:
            forms = [f"{k}:N" + "".join(f"[:{x}]" for x in family(k).flags) for k in kinds()]
            raise BadValue("heads", repr(spec), f"expected {', '.join(forms)} or none, N from 1 to {MAX_HEAD_DEPTH}") from None
        return cls(kind=kind, depth=depth, shared="shared" in flags, fused="fused" in flags)

    def __str__(self) -> str:
        """The CLI form; flags in one order (``sequential:4:shared:fused``). `fused_layers` is not
        part of it: configs and heads files store the layers beside it."""
        if self.kind == "none":
            return "none"
        flags = "".join(f":{name}" for name, on in (("shared", self.shared), ("fused", self.fused)) if on)
        return f"{self.kind}:{self.depth}{flags}"


def default_fused_layers(n_layers: int) -> list[int]:
    """The states fused by default for a backbone of `n_layers` blocks: after 2 blocks, after half
    of them, and h^0 (after all). EAGLE-3 takes layers 2, L/2 and L-3; the high one here is h^0
    itself, so fused heads contain the ordinary input and start as ordinary heads (``fc`` = [0 | 0 |
    I]). Small models take what exists (L=3: the embeddings, block 1, h^0). For SmolLM2's 30
    blocks: 2, 15, 30."""
    return sorted({min(2, n_layers // 4), n_layers // 2, n_layers})


@dataclass
class RopeScaling:
    """How RoPE frequencies are stretched for long contexts (transformers' ``rope_parameters``)."""

    kind: str = "default"
    """'default' (plain RoPE), 'linear' (every frequency divided by `factor`; Gemma-3's global
    layers from 4B up) or 'llama3' (Llama-3.1's band-wise rescaling)."""
    factor: float = 1.0
    """Stretch factor (8 for Llama-3.1 and Gemma-3-4B's global layers)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_seq_len / low_freq_factor are divided by `factor`."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_seq_len / high_freq_factor are kept; in between they blend."""
    original_max_seq_len: int = 8192
    """llama3: the context the model was pretrained with before scaling."""


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
    """RoPE base frequency (of the global layers, when some layers are local)."""
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    """Frequency scaling of the global layers' RoPE (local layers always use plain RoPE)."""
    local_layers: list[int] = field(default_factory=list)
    """Indices of sliding-window ("local") layers, whose RoPE base is `rope_local_theta` (Gemma-3:
    five local layers to one global). Their window is `sliding_window`, and max_seq_len never
    exceeds it, so that within the context a window equals full causal attention."""
    rope_local_theta: float = 10000.0
    """RoPE base of the local layers (Gemma-3: 10000 while the global layers use 1e6)."""
    sliding_window: int = 0
    """Window of the local layers in tokens; 0 without local layers."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    norm_plus_one: bool = False
    """RMSNorms scale by (1 + weight), in float32 (Gemma): the stored weight starts at 0."""
    qk_norm: bool = False
    """An RMSNorm over each head's queries and keys before RoPE (Qwen3, Gemma-3)."""
    sandwich_norms: bool = False
    """Gemma-3's four norms per block: the attention and MLP outputs are normalised too
    (post_attention_layernorm, post_feedforward_layernorm) and the MLP input has its own
    pre_feedforward_layernorm; without it, post_attention_layernorm is the MLP's input norm (Llama)."""
    hidden_act: str = "silu"
    """The gated MLP's activation: 'silu' (SwiGLU) or 'gelu_tanh' (Gemma's GeGLU)."""
    scale_embeddings: bool = False
    """Multiply token embeddings by sqrt(dim) (Gemma); a tied LM head uses the unscaled matrix."""
    attn_scale: float = 0.0
    """Softmax scale of attention; 0 means 1/sqrt(head_dim) (Gemma-3: query_pre_attn_scalar**-0.5)."""
    final_logit_softcap: float = 0.0
    """Logits become cap * tanh(logits / cap) when > 0 (Gemma-2's final soft-capping); 0: off."""
    tie_embeddings: bool = True
    """Share the embedding matrix with the LM head."""
    attention_bias: bool = False
    """Bias on the q/k/v projections (Qwen2 has it)."""
    eos_id: int = 0
    """End-of-sequence token: separates packed documents and stops generation."""
    eos_ids: list[int] = field(default_factory=list)
    """Every id that ends generation (Llama-3.x's ``<|eot_id|>`` beside ``<|end_of_text|>``); empty
    means `eos_id` alone. `stop_ids` is the list to use."""
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    """Multi-token-prediction heads."""

    def __post_init__(self) -> None:
        if isinstance(self.heads, dict):
            self.heads = from_dict(HeadsConfig, self.heads)
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = from_dict(RopeScaling, self.rope_scaling)
        check_fields(self, MODEL_RANGES)  # types and ranges first: the divisions below need them
        if not isinstance(self.heads, HeadsConfig):
            raise UserError(f"heads={self.heads!r}: give a HeadsConfig or a dict with kind and depth")
        check_fields(self.heads, HEADS_RANGES)
        if self.heads.fused and not self.heads.fused_layers:  # a new object: a caller's HeadsConfig is not changed
            self.heads = dataclasses.replace(self.heads, fused_layers=default_fused_layers(self.n_layers))
        if isinstance(self.rope_scaling, RopeScaling):
            check_fields(self.rope_scaling, ROPE_RANGES)
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise UserError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}: set head_dim or change one of them")
            self.head_dim = self.dim // self.n_heads
        self.validate()

    def validate(self) -> None:
        """Raise a one-line `UserError` for a configuration that cannot be built."""
        from multitoken.model.heads.registry import family, kinds

        check_fields(self, MODEL_RANGES)
        h = self.heads
        check_fields(h, HEADS_RANGES)
        checks = [
            (self.n_heads > 0 and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
             f"n_heads={self.n_heads} must be a positive multiple of n_kv_heads={self.n_kv_heads}"),
            (self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE"),
            (h.kind in ("none", *kinds()), f"heads.kind={h.kind!r}: choose one of {', '.join(('none', *kinds()))}"),
            (h.kind == "none" or h.depth >= 1, f"heads {h.kind} with depth {h.depth}: give at least one extra head (e.g. {h.kind}:2) or use 'none'"),
            (h.kind != "none" or h.depth == 0, f"heads kind 'none' with depth {h.depth}: name a head family ({_or(kinds())})"),
            (h.medusa_layers >= 1, "heads.medusa_layers must be at least 1"),
            (not h.shared or (h.kind != "none" and "shared" in family(h.kind).flags),
             f"heads.shared is for sequential modules, not {h.kind}: drop it"),
            (not h.fused or (h.kind != "none" and "fused" in family(h.kind).flags),
             f"heads.fused is for sequential modules, not {h.kind}: drop it"),
            (h.fused or not h.fused_layers, f"heads.fused_layers={h.fused_layers!r} without heads.fused: set fused or drop the layers"),
            (not h.fused or (_int_list(h.fused_layers, 0, self.n_layers + 1) and len(h.fused_layers) >= 2
                             and h.fused_layers == sorted(h.fused_layers) and h.fused_layers[-1] == self.n_layers),
             f"heads.fused_layers={h.fused_layers!r}: give 2 or more increasing block counts from 0 (the embeddings) up to "
             f"n_layers={self.n_layers} (h^0), e.g. {default_fused_layers(self.n_layers)}"),
            (0 <= self.eos_id < self.vocab_size, f"eos_id={self.eos_id} is outside the vocabulary (size {self.vocab_size})"),
            (isinstance(self.rope_scaling, RopeScaling) and self.rope_scaling.kind in ROPE_KINDS,
             f"rope_scaling.kind={getattr(self.rope_scaling, 'kind', self.rope_scaling)!r}: choose one of {', '.join(ROPE_KINDS)}"),
            (self.hidden_act in ACTIVATIONS, f"hidden_act={self.hidden_act!r}: choose one of {', '.join(ACTIVATIONS)}"),
            (_int_list(self.eos_ids, 0, self.vocab_size) and len(self.eos_ids) <= MAX_EOS_IDS,
             f"eos_ids={self.eos_ids!r}: give at most {MAX_EOS_IDS} token ids inside the vocabulary (size {self.vocab_size})"),
            (_int_list(self.local_layers, 0, self.n_layers),
             f"local_layers={self.local_layers!r}: give layer indices from 0 to {self.n_layers - 1}"),
            (not self.local_layers or 1 <= self.max_seq_len <= self.sliding_window,
             f"max_seq_len={self.max_seq_len} exceeds sliding_window={self.sliding_window}: windowed attention is not implemented, "
             f"so the context must fit the window (set max_seq_len <= {self.sliding_window})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        problem = family(h.kind).check_config(self) if h.kind != "none" else None
        if problem:
            raise UserError(problem)

    def with_heads(self, heads: HeadsConfig, **overrides: Any) -> "ModelConfig":
        """The same model with other MTP heads (and `overrides` of other fields), checked: the one
        place "same model, new heads" is written (retrofit, --init, heads files)."""
        return dataclasses.replace(self, heads=heads, **overrides)

    @property
    def stop_ids(self) -> list[int]:
        """The ids generation stops on: `eos_ids`, else `eos_id` alone."""
        return list(self.eos_ids) or [self.eos_id]

    @property
    def n_cache_layers(self) -> int:
        """KV-cache slots: one per block, the MTP heads' own blocks included."""
        from multitoken.model.heads.registry import family

        return self.n_layers + (family(self.heads.kind).cache_layers(self) if self.heads.kind != "none" else 0)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset (see `PRESETS`) with fields overridden."""
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return from_dict(cls, {**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for flag, keys in (("shared", ("shared",)), ("fused", ("fused", "fused_layers"))):
            if not getattr(self.heads, flag):  # config.json keeps its keys for every run without the flag
                for key in keys:
                    del d["heads"][key]
        # Fields of newer model families are written only when set, so that a Llama-family run's
        # config.json reads as before (and older releases can still read it).
        for name, default in _FAMILY_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d


_FAMILY_DEFAULTS: dict[str, Any] = {
    "rope_scaling": dataclasses.asdict(RopeScaling()), "local_layers": [], "rope_local_theta": 10000.0, "sliding_window": 0,
    "norm_plus_one": False, "qk_norm": False, "sandwich_norms": False, "hidden_act": "silu", "scale_embeddings": False,
    "attn_scale": 0.0, "final_logit_softcap": 0.0, "eos_ids": [],
}


def _int_list(values: Any, lo: int, hi: int) -> bool:
    """`values` is a list of distinct ints in [lo, hi)."""
    return (isinstance(values, list) and all(type(v) is int and lo <= v < hi for v in values)
            and len(set(values)) == len(values))


def _or(names: list[str]) -> str:
    """'a, b or c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# Bounds of every number of the configs below. Generous on purpose (Llama-3.1-405B's 126 layers,
# d=16384 and 128k context fit), they stop values that are typos (NaN, a negative size, a size
# that would allocate terabytes) with a one-line error naming the field.
HEADS_RANGES: dict[str, Range] = {
    "depth": Ints(0, MAX_HEAD_DEPTH),
    "medusa_layers": Ints(1, 16),
}
ROPE_RANGES: dict[str, Range] = {
    "factor": Floats(1),
    "low_freq_factor": Floats(0, lo_open=True),
    "high_freq_factor": Floats(0, lo_open=True),
    "original_max_seq_len": Ints(1, MAX_SEQ_LEN),
}
MODEL_RANGES: dict[str, Range] = {
    "vocab_size": Ints(1, 1 << 24),
    "dim": Ints(1, 1 << 16),
    "n_layers": Ints(1, 1024),
    "n_heads": Ints(1, 1024),
    "n_kv_heads": Ints(1, 1024),
    "head_dim": Ints(0, 1 << 16),
    "intermediate_size": Ints(1, 1 << 20),
    "max_seq_len": Ints(1, MAX_SEQ_LEN),
    "rope_theta": Floats(0, lo_open=True),
    "rope_local_theta": Floats(0, lo_open=True),
    "sliding_window": Ints(0, MAX_SEQ_LEN),
    "attn_scale": Floats(0),
    "final_logit_softcap": Floats(0),
    "norm_eps": Floats(0, 1, lo_open=True, hi_open=True),
    "eos_id": Ints(0, 1 << 24),
}


# ---- schedules (mtp_lambda) ---------------------------------------------------------------------


SCHEDULE_VALUE = Floats(0)
SCHEDULE_STEP = Ints(0)


def parse_schedule(spec: str | float | list) -> list[tuple[int, float]]:
    """Parse a piecewise-constant schedule: ``"0.3"`` or ``"0.3,0.1@10000"`` (0.1 from step 10000 on).

    Values must be finite and >= 0, steps integers >= 0 (ASCII digits).

    Returns:
        [(first_step, value), ...] sorted by step, starting at step 0.
    Raises:
        UserError: a malformed spec, a NaN/inf/negative value or a bad step, in one line.
    """
    usage = "expected VALUE or VALUE,VALUE@STEP,... with values >= 0 (e.g. 0.3,0.1@10000)"
    if isinstance(spec, bool):
        raise UserError(f"schedule {spec!r}: {usage}")
    if isinstance(spec, (int, float)):
        return [(0, SCHEDULE_VALUE.check("schedule value", spec))]
    out = []
    try:
        if isinstance(spec, list):
            pairs = [(s, v) for s, v in spec]
            out = [(int(SCHEDULE_STEP.check("schedule step", s)), float(SCHEDULE_VALUE.check("schedule value", v)))
                   for s, v in pairs]
        else:
            for i, part in enumerate(str(spec).split(",")):
                value, at, step = part.strip().partition("@")
                if (at or i) and not step:  # "0.1@" or a later value without its step
                    raise ValueError(f"{part.strip()!r} names no step")
                out.append((int(SCHEDULE_STEP.parse(step)) if step else 0, float(SCHEDULE_VALUE.parse(value))))
    except (ValueError, TypeError) as e:
        raise UserError(f"schedule {spec!r}: {usage} ({e})") from None
    if not out:
        raise UserError(f"schedule {spec!r}: {usage}")
    steps = [s for s, _ in out]
    if any(b <= a for a, b in zip(steps, steps[1:])) or (len(out) > 1 and steps[1] == 0):
        raise UserError(f"schedule {spec!r}: steps must increase, each named once (the first value holds from step 0), "
                        f"e.g. 0.3,0.1@5,0.05@30")
    if out[0][0] != 0:
        out.insert(0, (0, out[0][1]))
    return out


WEIGHT_SCHEDULES = "default, equal, geometric:R (R in (0, 1]), decay:G (G > 0) or lambda"
GEOMETRIC_RATIO = Floats(0, 1, lo_open=True)
DECAY_GAMMA = Floats(0, 1e6, lo_open=True)


def parse_weights(spec: str | list | None) -> list[float] | str | None:
    """Check a ``--loss-weights`` value: explicit numbers, or a named schedule resolved once the
    depth is known (`resolve_weights`).

    Named schedules: ``default`` (the head family's, `HeadFamily.default_loss_weights`), ``equal`` (1 per depth),
    ``geometric:R`` (R^k at depth k: 1, R, R^2, ...; the main head largest), ``decay:G``
    (DFlash's exp(-(k-1)/G) at extra depth k >= 1, the main head 1) and ``lambda``
    (DeepSeek's 1, lambda/D, ..., lambda/D, lambda taken from ``--mtp-lambda``, schedules
    included: one place for its value).

    Returns:
        None for ``default``, the normalised name (``"geometric:0.5"``) or the list of floats.
    Raises:
        UserError: an unknown name or a ratio outside (0, 1], in one line.
    """
    if spec is None or isinstance(spec, list):
        return spec
    text = str(spec).strip().lower()
    if text in ("", "none", "default"):
        return None
    if text in ("equal", "lambda"):
        return text
    name, sep, arg = text.partition(":")
    if name == "geometric" and sep:
        try:
            return f"geometric:{float(GEOMETRIC_RATIO.parse(arg))!r}"
        except ValueError as e:
            raise UserError(f"loss weights {spec!r}: geometric:R needs a ratio R {GEOMETRIC_RATIO.describe()} ({e})") from None
    if name == "decay" and sep:
        try:
            return f"decay:{float(DECAY_GAMMA.parse(arg))!r}"
        except ValueError as e:
            raise UserError(f"loss weights {spec!r}: decay:G needs a scale G {DECAY_GAMMA.describe()} ({e})") from None
    if name == "lambda":
        raise UserError(f"loss weights {spec!r}: write lambda alone; its value comes from --mtp-lambda "
                        "(e.g. --loss-weights lambda --mtp-lambda 0.3,0.1@800)")
    raise UserError(f"loss weights {spec!r}: expected numbers (1,0.5,0.25) or one of {WEIGHT_SCHEDULES}")


def check_fields(obj: Any, ranges: dict[str, Range]) -> None:
    """Check every field of dataclass `obj` against its type hint, and numbers against `ranges`
    (a float field given as an int is stored as a float). One-line `UserError` on the first bad one.

    A config read from TOML or a damaged config.json can hold any JSON value: a string where a
    number belongs would otherwise fail later with a TypeError deep inside the model.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        name, hint, value = f.name, hints[f.name], getattr(obj, f.name)
        if name in ranges:
            checked = ranges[name].check(name, value)
            if type(checked) is not type(value):  # an int given for a float field
                object.__setattr__(obj, name, checked)
        elif hint in (int, float):
            raise AssertionError(f"{type(obj).__name__}.{name} has no range in its RANGES table")  # a developer's slip
        elif hint is str and not isinstance(value, str):
            raise UserError(f"{name}={value!r}: must be a string")
        elif hint is bool and not isinstance(value, bool):
            raise UserError(f"{name}={value!r}: must be true or false")


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
    if not isinstance(data, dict):
        raise UserError(f"a {cls.__name__} must be a table of keys and values, not {type(data).__name__} {str(data)[:40]!r}")
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


@dataclass
class TrainConfig:
    """Everything `multitoken train` needs besides the data and the output directory.

    The CLI options are derived from these fields (``--batch-size`` for `batch_size`), a TOML file
    given with ``--config`` may set any of them, and the resolved values are written to
    RUN_DIR/config.json under "train". Precedence: command line, then TOML, then these defaults.
    """

    preset: str = "tiny"
    """Model shape from `PRESETS` (ignored with `init` or when resuming: the run's own config wins)."""
    heads: str = "parallel:2"
    """MTP heads: parallel:N, sequential:N[:shared][:fused], medusa:N or none."""
    steps: int = 1000
    """Optimizer steps in total (a resumed run continues up to this number)."""
    batch_size: int = 16
    """Global batch in windows per optimizer step, summed over processes and accumulation steps."""
    seq_len: int = 128
    """Tokens per training window (the model reads seq_len tokens and predicts the ones after)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; batch_size must divide by grad_accum * world size."""
    lr: float = 3e-3
    """Peak learning rate, reached after `warmup` steps."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup: int = 50
    """Steps of linear warmup from lr/warmup to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices; norms, biases and embeddings get none."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    loss_weights: list[float] | str | None = None
    """Per-depth loss weights, main head first, or a named schedule: equal, geometric:R (R^k at
    depth k), decay:G (1 for the main head, exp(-(k-1)/G) at extra depth k, as DFlash) or lambda (1 then lambda/D per extra depth, lambda from mtp_lambda); None uses the
    head family's default (equal for parallel, 0.8^k for medusa, 1 and lambda/D for sequential)."""
    mtp_lambda: str = "0.3"
    """DeepSeek lambda schedule used when the weights are lambda/D: "0.3" or "0.3,0.1@10000"."""
    distill: bool = False
    """Train the extra heads against the model's own main-head distribution (self-distillation)
    instead of the data tokens; natural with a frozen backbone."""
    freeze_backbone: bool = False
    """Train the MTP heads only (Medusa-1 style); the backbone's weights stay bit-identical."""
    ttt: bool = False
    """Sequential heads only: depths >= 2 are trained on their own earlier argmax drafts (tokens),
    exactly as drafting feeds them (docs/training.md), also in evaluation. Plain teacher forcing
    already feeds each module its own previous depth's features (EAGLE-3's training-time test);
    measured at CPU scale, this option lowers acceptance at depths >= 2."""
    eh_pass_through: bool = False
    """Heads started from a backbone (`init`): each sequential module's eh_proj starts as the
    identity on the hidden-state half and zero on the embedding half, so it first passes hnorm(h) on."""
    loss_chunk_rows: int = 0
    """Rows (tokens) per chunk of the chunked loss and distillation kernels; 0 picks ~64 MB of
    float32 logits on a CPU and ~1 GB on a GPU."""
    init: str = ""
    """A RUN_DIR whose backbone weights the run starts from; its model config wins over `preset`,
    heads are added per `heads` and initialised from the backbone."""
    init_heads: str = ""
    """A heads file (`save_heads`) the heads start from instead of the backbone: a warm start that
    continues an earlier retrofit; needs `init` (the backbone the file was trained on) and the same `heads`."""
    max_seq_len: int = 0
    """Model context length; 0 keeps the preset's (raised to seq_len when shorter)."""
    eval_every: int = 100
    """Evaluate on the validation split every this many steps (0: only at the end)."""
    eval_batches: int = 10
    """Validation batches per evaluation."""
    save_every: int = 200
    """Write a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in RUN_DIR/checkpoints (older ones are deleted after a newer one is complete)."""
    log_every: int = 10
    """Write training metrics every this many steps."""
    seed: int = 1337
    """Seed for the model init and the data order."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: str = "auto"
    """Autocast dtype: 'auto' (bfloat16 on CUDA, float32 on CPU), 'bfloat16' or 'float32' (bf16, fp32 are
    aliases). Weights stay float32."""
    compile: bool = False
    """torch.compile each block (parallel.apply_compile), and the distillation kernel's per-chunk math."""
    fsdp: bool = False
    """Under torchrun, shard with FSDP2 instead of replicating with DDP."""
    loss_kernel: str = "auto"
    """Linear + cross-entropy kernel: 'auto' (liger on CUDA when liger-kernel is installed, else
    chunked), 'chunked', 'naive' (full logits) or 'liger' (CUDA; pip install liger-kernel)."""
    recompute: str = "auto"
    """Recompute the MTP heads' blocks in backward instead of storing their activations: 'on',
    'off', or 'auto' (off when the step's estimated memory stays within 80% of the device's)."""

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if isinstance(self.mtp_lambda, (int, float)) and not isinstance(self.mtp_lambda, bool):
            self.mtp_lambda = str(self.mtp_lambda)  # TOML `mtp_lambda = 0.3`
        if isinstance(self.dtype, str) and self.dtype.strip().lower() in ("auto", "bfloat16", "float32", *DTYPE_ALIASES):
            self.dtype = dtype_name(self.dtype)  # one spelling from here on (older runs say bf16 / fp32)

    def validate(self) -> None:
        """Raise a one-line `UserError` for values that cannot work (types, ranges, NaN and inf included)."""
        check_fields(self, TRAIN_RANGES)
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2):
            raise UserError(f"betas={self.betas!r}: give two values, e.g. 0.9,0.95")
        self.betas = tuple(BETA_RANGE.check("betas", b) for b in self.betas)  # type: ignore[assignment]
        if isinstance(self.loss_weights, str):
            self.loss_weights = parse_weights(self.loss_weights)
        if self.loss_weights is not None and not isinstance(self.loss_weights, str):
            if not isinstance(self.loss_weights, (list, tuple)) or not self.loss_weights:
                raise UserError(f"loss_weights={self.loss_weights!r}: give one weight per depth, main head first, e.g. 1,0.5")
            self.loss_weights = [LOSS_WEIGHT_RANGE.check("loss_weights", w) for w in self.loss_weights]
            if not sum(self.loss_weights) > 0:
                raise UserError(f"loss_weights={self.loss_weights}: at least one weight must be positive")
        HeadsConfig.parse(self.heads)
        parse_schedule(self.mtp_lambda)
        checks = [
            (self.seq_len >= 2, f"seq_len={self.seq_len}: use at least 2 tokens per window"),
            (self.min_lr <= self.lr, f"min_lr={self.min_lr} is above lr={self.lr}: the decay goes down to min_lr"),
            (self.dtype in ("auto", "bfloat16", "float32"), f"dtype={self.dtype!r}: choose auto, bfloat16 or float32 (training autocasts to bf16 or not at all)"),
            (self.loss_kernel in LOSS_KERNELS, f"loss_kernel={self.loss_kernel!r}: choose {', '.join(LOSS_KERNELS)}"),
            (self.recompute in RECOMPUTE_MODES, f"recompute={self.recompute!r}: choose {', '.join(RECOMPUTE_MODES)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Bounds of TrainConfig's numbers: the CLI options parse with them, validate() checks with them.
TRAIN_RANGES: dict[str, Range] = {
    "steps": Ints(1),
    "batch_size": Ints(1, 1 << 20),
    "seq_len": Ints(2, MAX_SEQ_LEN),
    "grad_accum": Ints(1, 1 << 20),
    "lr": Floats(0, lo_open=True),
    "min_lr": Floats(0),
    "warmup": Ints(0),
    "weight_decay": Floats(0),
    "grad_clip": Floats(0),
    "max_seq_len": Ints(0, MAX_SEQ_LEN),
    "eval_every": Ints(0),
    "eval_batches": Ints(1, 1 << 20),
    "save_every": Ints(0),
    "keep_checkpoints": Ints(1, 1 << 20),
    "log_every": Ints(1),
    "seed": Ints(0, INT63),
    "loss_chunk_rows": Ints(0, 1 << 24),
}
BETA_RANGE = Floats(0, 1, hi_open=True)
"""Each AdamW beta: a decay rate in [0, 1)."""
LOSS_WEIGHT_RANGE = Floats(0)
"""Each per-depth loss weight."""
