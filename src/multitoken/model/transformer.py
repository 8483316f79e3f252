"""The native decoder: a Llama-family transformer with optional multi-token-prediction heads.

Parameter names follow Hugging Face's Llama layout one to one (``embed_tokens``, ``layers.{i}.
self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``, ``norm``, ``lm_head``), minus the
``model.`` prefix, so Llama / Qwen2 / Mistral / SmolLM2 checkpoints map onto it by renaming
alone. MTP heads live under ``mtp.``: one head family (model/heads/) that receives only the
shared modules it needs (`SharedModules`), never this model.

`forward` returns one hidden state per depth, ``[main, d1, ..., dD]``, each already passed
through its final norm; `unembed_weight(depth)` gives the matrix that turns it into logits. The
loss never needs the logits of all depths at once. The code is single-device and knows nothing
of DDP, FSDP or torch.compile; training/parallel.py wraps it from outside.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from multitoken.config import ModelConfig
from multitoken.errors import UserError
from multitoken.model.heads import BackboneStates, HeadFamily, SharedModules, build_heads, default_loss_weights
from multitoken.model.kv_cache import KVCache
from multitoken.model.layers import Block, Linear, RMSNorm, ScaledEmbedding, dense, rope_tables


class Transformer(nn.Module):
    """Llama-family decoder plus the MTP heads named by ``config.heads``.

    Args:
        config: the model's shape and heads.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise UserError(f"Transformer needs a ModelConfig (e.g. ModelConfig.from_preset('tiny')), not {type(config).__name__}")
        self.config = config
        self.embed_tokens = ScaledEmbedding(config.vocab_size, config.dim, config.dim ** 0.5 if config.scale_embeddings else 1.0)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, config.norm_plus_one)
        self.lm_head = Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp: HeadFamily | None = build_heads(config)
        for name, table in zip(self._rope_names(), self._rope_tables()):
            self.register_buffer(name, table, persistent=False)
        self.init_weights()

    @classmethod
    def empty(cls, config: ModelConfig, device: torch.device | str = "cpu") -> "Transformer":
        """A model with uninitialised weights on `device` (built on the meta device: no init cost),
        for weights that are about to be loaded; the LM head is tied again when the config ties it."""
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device)
        if config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model

    @property
    def shared(self) -> SharedModules:
        """The modules the heads share with the main model (built on each call: never stale)."""
        return SharedModules(self.embed_tokens, self.norm, self.lm_head)

    # ---- construction -------------------------------------------------------------------
    def _rope_names(self) -> list[str]:
        """The RoPE buffers: the global layers' pair, and the local layers' pair when there are local layers."""
        return ["rope_cos", "rope_sin"] + (["rope_local_cos", "rope_local_sin"] if self.config.local_layers else [])

    def _rope_tables(self) -> list[Tensor]:
        c = self.config
        tables = list(rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, c.rope_scaling))
        if c.local_layers:
            tables += rope_tables(c.head_dim, c.max_seq_len, c.rope_local_theta)
        return tables

    def init_weights(self) -> None:
        """Llama-style init: N(0, 0.02), output projections scaled by 1/sqrt(2L), norms at 1."""
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.reset_parameters()  # Gemma's (1 + w) norms start at 0, not 1
        if self.mtp is not None:
            self.mtp.reset_parameters(self.shared)
        self.init_buffers()

    def init_buffers(self) -> None:
        """Recompute the RoPE tables (after ``to_empty`` from the meta device, say)."""
        for name, table in zip(self._rope_names(), self._rope_tables()):
            getattr(self, name).copy_(table)

    def init_heads_from_backbone(self, pass_through: bool = False) -> None:
        """Start the heads from the backbone's weights (heads added to a pretrained model); with
        `pass_through`, their input projections start by passing the hidden state on
        (`HeadFamily.pass_hidden_through`)."""
        if self.mtp is not None:
            self.mtp.init_from_backbone(self.shared, self.layers[-1])
            if pass_through:
                self.mtp.pass_hidden_through()

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the main model (everything but the MTP heads)."""
        return [p for n, p in self.named_parameters() if not n.startswith("mtp.")]

    def freeze_backbone(self) -> None:
        """Train the MTP heads only (Medusa-1 style); shared norm and LM head stay frozen too."""
        if self.mtp is None:
            raise UserError("freezing the backbone leaves nothing to train: the model has no MTP heads (add some, e.g. medusa:3)")
        for p in self.backbone_parameters():
            p.requires_grad_(False)

    def missing_weights(self, missing_keys: list[str], heads: bool = True) -> list[str]:
        """The keys of a non-strict ``load_state_dict`` that are really missing: a tied LM head is the
        embedding, not a weight of its own; with heads=False the MTP heads may be absent too."""
        return [k for k in missing_keys if not (self.config.tie_embeddings and k == "lm_head.weight")
                and (heads or not k.startswith("mtp."))]

    def weights_to_store(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """`state` without the entries that are not weights of their own (a tied LM head is the
        embedding): what files hold, and all that `missing_weights` expects back."""
        own = set(self.missing_weights(list(state)))
        return {k: v for k, v in state.items() if k in own}

    def num_parameters(self, heads: bool = True) -> int:
        params = {id(p): p for n, p in self.named_parameters() if heads or not n.startswith("mtp.")}
        return sum(p.numel() for p in params.values())

    @property
    def depth(self) -> int:
        """Extra future tokens the heads predict (0 without heads)."""
        return self.config.heads.depth if self.mtp is not None else 0

    def default_loss_weights(self) -> list[float] | None:
        """Per-depth loss weights of the head family's paper (None: DeepSeek's lambda / D form)."""
        return default_loss_weights(self.config.heads.kind, self.depth)

    # ---- pieces that decoding and retrofitting reuse ----------------------------------------
    def rope(self, input_pos: Tensor) -> tuple[Tensor, ...]:
        """Angles for positions (B, T) or (T,), shaped to broadcast over heads: (B|1, 1, T, Dh).

        Returns (cos, sin), or (cos, sin, local_cos, local_sin) for a model with local layers
        (each block picks its pair)."""
        if input_pos.dim() == 1:
            input_pos = input_pos[None]
        return tuple(getattr(self, name)[input_pos][:, None] for name in self._rope_names())

    def run_layers(self, x: Tensor, start: int, end: int, rope: tuple[Tensor, Tensor], cache: KVCache | None = None,
                   slots: Tensor | None = None, mask: Tensor | None = None, taps: tuple[int, ...] = (),
                   kept: dict[int, Tensor] | None = None) -> Tensor:
        """Apply backbone blocks start..end-1 to hidden states x (B, T, C); the state after i blocks,
        for each i of `taps` in start..end-1, is stored in `kept[i]` on the way."""
        for i in range(start, end):
            if i in taps:
                kept[i] = x
            x = self.layers[i](x, rope, cache, slots, mask)
        return x

    def trunk_layers(self, heads: bool = True) -> int:
        """Blocks that run before the heads branch off (all of them without heads)."""
        return self.mtp.trunk_layers(self.config) if heads and self.mtp is not None else self.config.n_layers

    def tapped_layers(self, heads: bool = True) -> tuple[int, ...]:
        """The backbone states the heads read besides the trunk and h^0 (`HeadFamily.tapped_layers`)."""
        return self.mtp.tapped_layers(self.config) if heads and self.mtp is not None else ()

    def backbone(self, idx: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None = None, slots: Tensor | None = None,
                 mask: Tensor | None = None, heads: bool = True) -> BackboneStates:
        """The main model over tokens idx (B, T): the states the heads read, and the main one.

        The one place the backbone is wired: `forward`, the decoding pass and retrofitting's
        features all come from here, so they run the same blocks in the same order.
        """
        cut, taps = self.trunk_layers(heads), self.tapped_layers(heads)
        kept: dict[int, Tensor] = {}
        trunk = self.run_layers(self.embed_tokens(idx), 0, cut, rope, cache, slots, mask, taps, kept)  # (B, T, C)
        return self.states_from(idx, trunk, cut, rope, cache, slots, mask, taps, kept)

    def states_from(self, idx: Tensor, trunk: Tensor, cut: int, rope: tuple[Tensor, Tensor], cache: KVCache | None = None,
                    slots: Tensor | None = None, mask: Tensor | None = None, taps: tuple[int, ...] = (),
                    kept: dict[int, Tensor] | None = None) -> BackboneStates:
        """`backbone`'s states from the state after the first `cut` blocks (retrofitting stores that one).

        Args:
            taps: the states to keep (`tapped_layers`), those after `cut` blocks or more found here.
            kept: the ones before the cut, found on the way to it.
        """
        kept = {} if kept is None else kept
        last = self.run_layers(trunk, cut, self.config.n_layers, rope, cache, slots, mask, taps, kept)
        if self.config.n_layers in taps:
            kept[self.config.n_layers] = last
        return BackboneStates(idx=idx, trunk=trunk, last=last, main=self.norm(last), taps=kept)

    def unembed_weight(self, depth: int = 0) -> Tensor:
        """(V, C) matrix turning depth `depth`'s hidden state into logits."""
        if depth == 0 or self.mtp is None:
            return self.lm_head.weight
        return self.mtp.unembed_weight(self.shared, depth)

    def logits(self, h: Tensor, depth: int = 0) -> Tensor:
        """Logits (..., V) for hidden states of depth `depth` as `forward` returns them."""
        logits = dense(h, self.unembed_weight(depth))
        cap = self.config.final_logit_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap

    # ---- forward --------------------------------------------------------------------------
    def forward(self, idx: Tensor, *, cache: KVCache | None = None, input_pos: Tensor | None = None,
                slots: Tensor | None = None, mask: Tensor | None = None, heads: bool = True) -> list[Tensor]:
        """Hidden states per depth, final norms applied.

        Args:
            idx: (B, T) token ids.
            cache: a KVCache for incremental decoding; None for a full causal pass (training).
            input_pos: (B, T) RoPE positions; default: the cache's next positions, or 0..T-1.
            slots: (B, T) cache slots to write; default ``input_pos`` (trees pass scratch slots).
            mask: (B, T, S) which cache slots each token attends; default causal over slots.
            heads: also run the MTP heads. With a cache, families that draft step by step
                (sequential modules) are not run here: speculative decoding drives them.
        Returns:
            ``[main, d1, ..., dD]``, each (B, T, C); only ``[main]`` when heads are off or absent.
        """
        B, T = idx.shape
        if cache is None:
            if T > self.config.max_seq_len:
                raise UserError(f"sequence of {T} tokens exceeds max_seq_len={self.config.max_seq_len}: shorten it or raise max_seq_len")
            pos = input_pos if input_pos is not None else torch.arange(T, device=idx.device)
        else:
            pos = input_pos if input_pos is not None else cache.positions(T)
            slots = pos if slots is None else slots
            mask = cache.causal_mask(slots) if mask is None else mask
        rope = self.rope(pos)
        run_heads = heads and self.mtp is not None
        states = self.backbone(idx, rope, cache, slots, mask, heads=run_heads)
        out = [states.main]
        if run_heads:
            out += self.mtp(self.shared, states, rope, cache=cache, slots=slots, mask=mask)
        return out
