"""Static KV cache: preallocated buffers and a position per batch row.

Every block of the model (the MTP heads' own blocks included) owns one layer of the buffers.
Shapes never change after allocation, which is what CUDA graphs need. Each row keeps its own
position, so rows of a batch can advance by different amounts; rejecting drafted tokens only
moves a row's position back: entries past it are masked out and overwritten by the next write.
Blocks write their new keys and values themselves (`model.Block.cached`), which keeps the
write inside a compiled block. Tree verification writes candidates to scratch slots past the
committed prefix and `compact` moves the accepted path's entries into place.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values for `n_layers` blocks, `batch_size` rows and up to `max_seq_len` positions.

    Args:
        n_layers: blocks with a cache (``ModelConfig.n_cache_layers``).
        batch_size: rows.
        n_kv_heads: key/value heads per block.
        max_seq_len: slots per row.
        head_dim: size of one head.
        dtype, device: of the buffers.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # committed tokens per row
        self._rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1), for per-row scatter
        self._slots = torch.arange(max_seq_len, device=device)
        # Slots attention looks at: a step only attends to slots < live (the runner sets it from a
        # bound on the rows' positions, in buckets), so its cost grows with the tokens in the cache,
        # not with max_seq_len. A Python int: a compiled step specialises on it, one graph per bucket.
        self.live = max_seq_len
        self.block_fn = None  # a compiled `Block.cached`, set by the decoding runner (None: eager)
        self._bias: tuple | None = None  # (mask, rep, dtype, bias) of the last `attention_bias`

    @classmethod
    def for_model(cls, config, batch_size: int, max_seq_len: int | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "KVCache":
        """A cache sized for a `ModelConfig` (all blocks, MTP blocks included)."""
        return cls(config.n_cache_layers, batch_size, config.n_kv_heads, max_seq_len or config.max_seq_len,
                   config.head_dim, dtype, device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    def causal_mask(self, slots: Tensor) -> Tensor:
        """(B, q, live) boolean mask: a token at slot s sees slots 0..s of its own row."""
        return self._slots[None, None, : self.live] <= slots[:, :, None]

    def attention_bias(self, mask: Tensor, rep: int, dtype: torch.dtype) -> Tensor:
        """The additive form of a (B, q, live) boolean mask, query heads folded: (B, 1, rep*q, live).

        Every block of one pass gets the same mask object, so the conversion runs once per pass,
        not once per block (in a captured step: once per replay).
        """
        if self._bias is not None and self._bias[0] is mask and self._bias[1:3] == (rep, dtype):
            return self._bias[3]
        B, q, live = mask.shape
        folded = mask[:, None, None].expand(B, 1, rep, q, live).reshape(B, 1, rep * q, live)
        bias = torch.zeros(folded.shape, dtype=dtype, device=mask.device).masked_fill_(~folded, float("-inf"))
        self._bias = (mask, rep, dtype, bias)
        return bias

    def prefix_mask(self, base: Tensor, q: int) -> Tensor:
        """(B, q, live) boolean mask: every one of q tokens sees the slots before its row's `base` (B,)."""
        return (self._slots[None, None, : self.live] < base[:, None, None]).expand(-1, q, -1)

    def positions(self, q: int) -> Tensor:
        """(B, q) positions of the next q tokens of every row."""
        return self.pos[:, None] + torch.arange(q, device=self.pos.device)

    def advance(self, n: Tensor | int) -> None:
        """Commit n more tokens per row (an int, or a (B,) tensor for per-row counts)."""
        self.pos += n

    def rewind(self, pos: Tensor | int) -> None:
        """Set every row's committed length; entries past it are dead and get overwritten."""
        if isinstance(pos, int):
            self.pos.fill_(pos)
        else:
            self.pos.copy_(pos)

    def compact(self, src: Tensor, dst: Tensor, layers: slice | None = None) -> None:
        """Move entries of each row from slots `src` to slots `dst` (both (B, n)), for all layers.

        Used after tree verification: the accepted path's nodes sit at scattered scratch slots
        and move to the contiguous positions after the committed prefix. Reads happen before
        writes, so overlapping source and destination are safe.
        """
        sel = slice(None) if layers is None else layers
        for buf in (self.k, self.v):
            b = buf[sel]  # (L, B, H, S, D)
            moved = b[:, self._rows, :, src]  # (B, n, L, H, D): separated advanced indices go first
            b[:, self._rows, :, dst] = moved
