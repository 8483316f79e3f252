"""The interface every multi-token-prediction head family implements.

A family is one ``nn.Module`` (stored as ``Transformer.mtp``, so its parameters are named
``mtp.*``) that owns everything about itself: how many backbone blocks run before it branches
off, its training forward, how it drafts when decoding, its KV-cache layers, its export names,
its FSDP units, its default loss weights (retrofitting stores the state after its `trunk_layers`).
It receives only the main model's shared modules (`SharedModules`), never the model, so its
parameters are all its own and FSDP can shard it unit by unit.

Drafting goes through `draft_logits`, over the whole vocabulary or, once `set_draft_vocab` has
been given a frequency-ranked subset V' (EAGLE-3's and vLLM speculators' ``d2t`` map), over V'
alone: only |V'| rows of the unembedding are multiplied (FR-Spec). Verification always uses the
full vocabulary, so the output stays exact (docs/decoding.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from multitoken.config import HeadsConfig, ModelConfig
from multitoken.model.layers import dense

Rope = tuple[Tensor, ...]
"""(cos, sin), or (cos, sin, local_cos, local_sin) for a model with local layers (`Transformer.rope`)."""


@dataclass(frozen=True)
class SharedModules:
    """The main model's modules a head family may use; the family neither owns nor registers them."""

    embed_tokens: nn.Embedding
    """Token embedding (sequential modules embed the tokens ahead)."""
    norm: nn.Module
    """The final norm before the LM head."""
    lm_head: nn.Linear
    """The unembedding (tied to the embedding or not)."""


@dataclass
class BackboneStates:
    """What the main model computed for tokens idx (B, T); each state is (B, T, C)."""

    idx: Tensor
    """(B, T) token ids."""
    trunk: Tensor
    """After the family's `trunk_layers` blocks."""
    last: Tensor
    """After every block, before the final norm (h^0 of the sequential modules)."""
    main: Tensor
    """``norm(last)``: the main head's state."""
    taps: dict[int, Tensor] = field(default_factory=dict)
    """The states after the blocks the heads read (`HeadFamily.tapped_layers`), by how many blocks
    ran before them (0: the embeddings; n_layers: `last`), kept while the blocks run: no second pass."""


class HeadFamily(nn.Module):
    """Base class of the head families; the defaults suit families that unembed with the LM head."""

    kind: ClassVar[str]
    """The kind string configs store (``HeadsConfig.kind``)."""
    recompute: bool = True
    """Training: recompute each head's block in backward instead of storing its activations (`run`)."""
    drafts_from_verify: ClassVar[bool] = True
    """Decoding: the verification pass itself yields the next drafts (`decode_states`); False for
    families that draft with their own passes over committed tokens (`step`)."""
    flags: ClassVar[tuple[str, ...]] = ()
    """Options written after the depth in a heads spec (``sequential:2:shared``)."""
    supports_ttt: ClassVar[bool] = False
    """Whether the family can train with the training-time test (`ttt`)."""
    ttt: bool = False
    """The training forward feeds depths >= 2 their own earlier drafts (tokens), exactly as drafting
    does (families with `supports_ttt`; docs/training.md); set by the trainer, not stored."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # The draft vocabulary: sorted target ids (V',), or None for the full vocabulary. Not a
        # weight (absent from state_dict, so checkpoints and exports are unchanged): heads files
        # store it as d2t/t2d (io/heads_file.py).
        self.register_buffer("draft_ids", None, persistent=False)
        self._sliced: dict[int | str, tuple[tuple, Tensor]] = {}

    # ---- configuration ----------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: ModelConfig) -> str | None:
        """What makes `cfg` impossible for this family (one line naming the fix), or None."""
        return None

    @classmethod
    def trunk_layers(cls, cfg: ModelConfig) -> int:
        """How many backbone blocks run before the heads branch off."""
        return cfg.n_layers

    @classmethod
    def tapped_layers(cls, cfg: ModelConfig) -> tuple[int, ...]:
        """Backbone states the heads read besides the trunk and h^0, by blocks run (`BackboneStates.taps`)."""
        return ()

    @classmethod
    def cache_layers(cls, cfg: ModelConfig) -> int:
        """KV-cache layers the heads' own blocks need, after the backbone's (indices L, L+1, ...)."""
        return 0

    @classmethod
    def default_loss_weights(cls, depth: int) -> list[float] | None:
        """Per-depth loss weights, main first; None for DeepSeek's ``1, lambda/D, ...`` form."""
        return [1.0] * (depth + 1)

    # ---- training and evaluation ------------------------------------------------------------
    def forward(self, shared: SharedModules, states: BackboneStates, rope: Rope, cache=None, slots=None,
                mask=None) -> list[Tensor]:
        """Hidden states (B, T, C) of depths 1..D, final norms applied (depth k predicts the token k+1 ahead)."""
        raise NotImplementedError

    def unembed_weight(self, shared: SharedModules, k: int) -> Tensor:
        """The (V, C) matrix that turns depth k's state into logits."""
        return shared.lm_head.weight

    def run(self, module: nn.Module, *args: Any) -> Tensor:
        """Call one head's module; in training with `recompute` its activations are recomputed in
        backward instead of stored, so only one head's activations are alive at a time (the role of
        Gloeckle et al.'s head-by-head backward, in a single backward pass that DDP/FSDP accept)."""
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    # ---- decoding ---------------------------------------------------------------------------
    def set_draft_vocab(self, ids: Tensor | None) -> None:
        """Draft over the tokens `ids` only (any order, no repeats), or the full vocabulary (None)."""
        self._sliced.clear()
        if ids is None:
            self.draft_ids = None
            return
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().sort().values
        device = self.draft_ids.device if self.draft_ids is not None else next(self.parameters(), ids).device
        self.draft_ids = ids.to(device)

    def draft_logits(self, shared: SharedModules, k: int, h: Tensor, pos: Tensor | None = None) -> Tensor:
        """Logits with which depth k drafts from its state h (B, C): over V' when a draft
        vocabulary is set, (B, |V'|) in `draft_ids` order, else (B, V).

        Args:
            pos: (B,) positions of the drafted tokens; the heads ignore them (test stubs that know
                the right tokens read them).
        """
        w = self.unembed_weight(shared, k)
        return dense(h, w if self.draft_ids is None else self._draft_weight(k, w))

    def draft_logits_all(self, shared: SharedModules, h: Tensor, pos: Tensor | None = None) -> Tensor:
        """Logits of depths 1..n at once from their states h (B, n, C): (B, n, |V'|) or (B, n, V).

        One matmul for every depth: over the one unembedding they share, or a batched one over
        their own (Medusa's), stacked once. A family (or a test stub) that defines its own
        `draft_logits` has it called depth by depth instead.

        Args:
            pos: (B,) positions of depth 1's drafted tokens (depth j's are pos + j - 1).
        """
        n = h.shape[1]
        if type(self).draft_logits is not HeadFamily.draft_logits:
            return torch.stack([self.draft_logits(shared, j, h[:, j - 1], None if pos is None else pos + j - 1)
                                for j in range(1, n + 1)], 1)
        ws = self.unembed_weights(shared, n)
        if all(w is ws[0] for w in ws):  # one shared unembedding
            return dense(h, ws[0] if self.draft_ids is None else self._draft_weight(1, ws[0]))
        w = self._stacked_draft_weight(ws)  # (n, V', C)
        return torch.bmm(h.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)  # (B, n, V')

    def unembed_weights(self, shared: SharedModules, n: int) -> list[Tensor]:
        """`unembed_weight` of depths 1..n (a family may keep them: Medusa's are looked up once)."""
        return [self.unembed_weight(shared, j) for j in range(1, n + 1)]

    def _stacked_draft_weight(self, ws: list[Tensor]) -> Tensor:
        """The depths' own unembeddings (their |V'| rows) stacked (n, V', C), built once and rebuilt
        when one of them moves or is written, or the draft vocabulary changes."""
        ids = self.draft_ids
        key = tuple((w.data_ptr(), w.device, w.dtype, w._version) for w in ws) + (
            None if ids is None else (ids.data_ptr(), ids._version),)
        hit = self._sliced.get("stack")
        if hit is None or hit[0] != key:
            rows = [w.detach() if ids is None else w.detach().index_select(0, ids) for w in ws]
            hit = self._sliced["stack"] = (key, torch.stack(rows))
        return hit[1]

    def _draft_weight(self, k: int, w: Tensor) -> Tensor:
        """The |V'| rows of unembedding w, indexed once and cached until w moves or is written
        (a new address, device, dtype or version) or the draft vocabulary changes."""
        ids = self.draft_ids
        key = (w.data_ptr(), w.device, w.dtype, w._version, ids.data_ptr(), ids._version)
        hit = self._sliced.get(k)
        if hit is None or hit[0] != key:
            hit = self._sliced[k] = (key, w.detach().index_select(0, ids).contiguous())  # (V', C)
        return hit[1]

    def step(self, shared: SharedModules, k: int, h_prev: Tensor, tokens: Tensor, rope: Rope, cache=None, slots=None,
             mask=None) -> Tensor:
        """Families without `drafts_from_verify`: depth k's state h^k (B, q, C) at q positions,
        from h^{k-1} there and the tokens t_{i+k} (B, q) (decoding/drafting.py's `ModuleDrafter`)."""
        raise NotImplementedError(f"{type(self).__name__} drafts from the verification pass, not step by step")

    def hidden_input(self, states: BackboneStates) -> Tensor:
        """Families without `drafts_from_verify`: the hidden input (B, T, C) of depth 1 at every
        position, which `ModuleDrafter` records per position while decoding: h^0 (`states.last`)
        unless the family makes its own."""
        return states.last

    def draft_state(self, k: int, h: Tensor) -> Tensor:
        """The state depth k's draft logits come from, given `step`'s output h (B, C)."""
        return h

    def decode_states(self, shared: SharedModules, n: int, states: BackboneStates, rope: Rope, cache, slots,
                      mask) -> list[Tensor] | Tensor:
        """States (B, q, C) of the first n heads in a cached decoding pass, or one (B, q, n, C)
        tensor of them: they draft the next step (only for families with `drafts_from_verify`)."""
        return []

    # ---- initialisation ---------------------------------------------------------------------
    def reset_parameters(self, shared: SharedModules) -> None:
        """After the model's random init: the family's own init, if any."""

    def init_from_backbone(self, shared: SharedModules, last_block: nn.Module) -> None:
        """Start the heads from a pretrained backbone (its last block and shared modules)."""

    def warm_start_from(self, heads: HeadsConfig) -> tuple[set[str], str] | None:
        """Take the weights of heads saved as `heads`, another spec of this family (a heads file for
        `train --init-heads`): if they lack some of these heads' parameters and match all others,
        start the lacking ones (now) and return (their names, one line for the log); else None."""
        return None

    def pass_hidden_through(self) -> None:
        """Start the heads' input projections so that they pass the hidden state on unchanged
        (families without such a projection have nothing to do)."""

    # ---- parallelism ------------------------------------------------------------------------
    def fsdp_units(self) -> Iterator[nn.Module]:
        """The modules called as a whole in forward, each sharded (and compiled) as one unit."""
        return iter(())

    # ---- Hugging Face / DeepSeek layout -----------------------------------------------------
    @classmethod
    def export_name(cls, name: str, cfg: ModelConfig) -> str:
        """The export name of head parameter `name` (without the ``mtp.`` prefix)."""
        raise AssertionError(f"no export name for head parameter mtp.{name}")

    @classmethod
    def hf_config(cls, cfg: ModelConfig, hf: dict[str, Any]) -> dict[str, Any]:
        """Keys this family adds to an exported config.json (`hf` is the rest of it)."""
        return {}

    @classmethod
    def hf_export_problem(cls, cfg: ModelConfig) -> str | None:
        """Why these heads have no place in the Hugging Face / DeepSeek layout (one line naming the
        alternative), or None when they export."""
        return None

    @classmethod
    def heads_from_hf(cls, hf: dict[str, Any]) -> HeadsConfig | None:
        """The heads a foreign config.json declares in this family's own keys, or None."""
        return None

    @classmethod
    def export_copies(cls, state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
        """Tensors the export layout repeats, by export name (`state` holds the exported ones)."""
        return {}

    @classmethod
    def shared_copy(cls, hf_name: str, cfg: ModelConfig) -> tuple[str, str] | None:
        """For a checkpoint tensor that repeats another one (a shared tensor stored per head), the
        name of the tensor it must equal and the fix to name when it differs; None otherwise."""
        return None

    # ---- vLLM's speculators format (io/speculators.py) --------------------------------------
    @classmethod
    def speculators_layout(cls, cfg: ModelConfig) -> tuple[str, dict[str, str]] | str:
        """Where this family's weights go in a speculators checkpoint, if they map there exactly:
        (speculators model type, {head parameter name without ``mtp.`` -> speculators name}) for the
        parameters to export; otherwise a one-line reason that names the alternative.

        speculators 0.9.0 defines eagle3, mtp, dflash, dflash2, dspark, peagle and xpress drafters:
        each reads the next token's embedding beside the verifier's hidden state."""
        return (f"{cls.kind} heads map onto no speculators model type (each of them reads the next token's "
                "embedding beside the hidden state): serve them with `multitoken serve`, or export the "
                "Hugging Face layout with `multitoken export` (no --format)")
