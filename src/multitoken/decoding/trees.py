"""Draft trees for self-speculative decoding: static (Medusa) and dynamic (EAGLE-2 style).

A tree has N nodes; node 0 is the root (the pending token), every other node is a candidate
token at depth d (1..k), drafted by head d. Nodes are stored parents-first, so one pass of
``ancestors`` after `depth` hops resolves every path. Children of one node always carry distinct
tokens (distinct top-k ranks, or distinct draws), which tree sampling relies on (decoding/verify.py).

When sampling losslessly the tree keeps its shape but its candidates are drawn from the draft
distributions without replacement (`sample_candidates`, `build_sampled_nodes`), and verification
is recursive rejection sampling over each node's children (`verify.verify_tree_sampling`).

- `StaticTree`: a fixed set of rank paths ``(r_1, ..., r_d)``: node token = rank r_d of head d.
  `build_static` chooses the paths greedily, Medusa style: given measured per-depth top-r
  accuracies a[d][r], a node's acceptance probability is prod a[i][r_i] along its path, the
  expected accepted length is their sum, and the next node added is always the candidate child
  with the highest probability, until the node budget is spent.
- `DynamicTree`: rebuilt every step from the draft confidence (EAGLE-2): beam-expand the top-W
  tokens of each head, score a path by the sum of log-probabilities along it, keep the N-1 best
  nodes overall (a child scores below its parent, so the kept set is always a tree).

``multitoken tree --run RUN_DIR --data DATA_DIR [--nodes N]`` measures a[d][r] on validation
windows (training/evaluate.py's `measure_topk_accuracy`) and writes RUN_DIR/tree.json, which ``multitoken generate --mode tree`` uses by default.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from multitoken.decoding.sampling import draw
from multitoken.errors import UserError

TREE_FILE = "tree.json"
DEFAULT_NODES = 16
MAX_TREE_NODES = 1024
"""Largest tree, root included (Medusa's trees have 64 nodes, EAGLE-2's 60); attention masks grow as N^2."""
MAX_TREE_RANKS = 256
"""Most candidates per depth a tree may use (Medusa measures the top 10)."""


@dataclass
class StaticTree:
    """A fixed tree: every non-root node as its path of ranks per depth, parents before children."""

    paths: list[tuple[int, ...]]
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.paths = sorted({tuple(int(r) for r in p) for p in self.paths}, key=lambda p: (len(p), p))
        known = set(self.paths) | {()}
        for p in self.paths:
            if not p or p[:-1] not in known or min(p) < 0:
                raise UserError(f"tree path {list(p)} has no parent in the tree (or a negative rank): every prefix of a path must be a path")

    @property
    def nodes(self) -> int:
        return 1 + len(self.paths)

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    def truncate(self, depth: int) -> "StaticTree":
        return StaticTree([p for p in self.paths if len(p) <= depth])

    @property
    def ranks(self) -> int:
        """Candidates needed per depth (the largest rank + 1)."""
        return 1 + max((p[-1] for p in self.paths), default=0)

    def tensors(self, device) -> tuple[Tensor, Tensor, Tensor]:
        """(parent, depth, rank) per node (N,), on `device` (built once per device: no per-step copies)."""
        key = str(device)
        if key not in self._cache:
            index = {(): 0} | {p: i + 1 for i, p in enumerate(self.paths)}
            parent = [0] + [index[p[:-1]] for p in self.paths]
            depth = [0] + [len(p) for p in self.paths]
            rank = [0] + [p[-1] for p in self.paths]
            self._cache[key] = tuple(torch.tensor(v, dtype=torch.long, device=device) for v in (parent, depth, rank))
        return self._cache[key]


@dataclass
class DynamicTree:
    """A tree of `nodes` nodes and at most `depth` levels, rebuilt each step from draft confidence."""

    nodes: int = DEFAULT_NODES
    depth: int = 1
    width: int = 0
    """Top tokens per head and beam width per level (0: chosen from nodes and depth)."""

    def __post_init__(self) -> None:
        if self.nodes < 2:
            raise UserError(f"a tree of {self.nodes} node(s) drafts nothing: use at least 2 nodes")
        if self.width == 0:
            self.width = max(math.ceil((self.nodes - 1) / self.depth), min(self.nodes - 1, 8))


def build_nodes(tree: StaticTree | DynamicTree, x: Tensor, lq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """This step's nodes from the pending token x (B,) and the heads' draft logits lq (B, k, V).

    Returns:
        (tokens, parent, depth), each (B, N), parents before children, node 0 the root.
    """
    return _nodes(tree, x, lq, None)[:3]


def candidate_ranks(tree: StaticTree | DynamicTree) -> int:
    """Candidates per depth a tree draws on (R): its largest rank + 1, or a dynamic tree's width."""
    return tree.ranks if isinstance(tree, StaticTree) else tree.width


def build_sampled_nodes(tree: StaticTree | DynamicTree, x: Tensor, lq: Tensor, cand: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Nodes for lossless tree sampling: the tree's shape as `build_nodes` makes it from lq (a
    function of the draft distributions only), but the candidate of rank r at depth d is cand[:, d-1, r],
    the r-th token drawn from q_d without replacement (`sample_candidates`).

    Returns:
        (tokens, parent, depth, rank), each (B, N); rank is each node's index into cand.
    """
    return _nodes(tree, x, lq, cand)


def sample_candidates(q: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """R tokens per depth drawn from q without replacement, in draw order.

    Args:
        q: (B, k, V) draft distributions; u: (B, k, R) uniforms.
    Returns:
        (cand (B, k, R), valid (B, k, R)): valid is False for a draw made after q's support ran out
        (such a candidate must never be accepted).
    """
    left = q.float().clone()
    cand, valid = [], []
    for j in range(u.shape[-1]):
        valid.append(left.sum(-1) > 0)
        c = draw(left, u[..., j])  # (B, k); draw normalises, so `left` needs no renormalising
        left.scatter_(-1, c[..., None], 0.0)
        cand.append(c)
    return torch.stack(cand, -1), torch.stack(valid, -1)


def _nodes(tree: StaticTree | DynamicTree, x: Tensor, lq: Tensor, cand: Tensor | None
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B = x.shape[0]
    if isinstance(tree, DynamicTree):
        return dynamic_nodes(x, lq, tree.nodes, tree.width, cand, ranks=True)
    parent, depth, rank = tree.tensors(x.device)
    R = tree.ranks
    top = (lq.topk(R, dim=-1).indices if cand is None else cand[..., :R]).flatten(1)  # (B, k*R)
    tokens = top[:, ((depth - 1).clamp(min=0) * R + rank)]  # (B, N)
    tokens[:, 0] = x
    return tokens, parent.expand(B, -1), depth.expand(B, -1), rank.expand(B, -1)


def dynamic_nodes(x: Tensor, lq: Tensor, nodes: int, width: int, cand: Tensor | None = None, ranks: bool = False):
    """EAGLE-2-style tree: beam-expand top-`width` tokens per head, keep the nodes-1 most probable.

    With `cand` (B, k, width), the shape is chosen from lq's top-`width` probabilities as always,
    but the rank-r token of depth d is cand[:, d-1, r] instead of lq's rank-r token (sampled trees).
    Returns (tokens, parent, depth), each (B, N), and with ranks=True each node's rank too.
    """
    B, k, V = lq.shape
    W = min(width, V)
    if k * W < nodes - 1:
        raise UserError(f"a dynamic tree of {nodes} nodes needs more candidates than {k} head(s) x {W} tokens: use fewer nodes")
    dev = x.device
    topv, topi = lq.float().log_softmax(-1).topk(W, dim=-1)  # (B, k, W)
    if cand is not None:
        topi = cand[..., :W]
    ar = torch.arange(W, device=dev)
    scores, toks, parents = [topv[:, 0]], [topi[:, 0]], [torch.zeros(B, W, dtype=torch.long, device=dev)]
    rks = [ar.expand(B, W)]
    beam_s, beam_id = topv[:, 0], (1 + ar).expand(B, W)
    for d in range(1, k):
        cand_s = (beam_s[:, :, None] + topv[:, d][:, None, :]).flatten(1)  # (B, W*W)
        s, j = cand_s.topk(W, dim=-1)
        parents.append(beam_id.gather(1, j // W))
        toks.append(topi[:, d].gather(1, j % W))
        rks.append(j % W)
        scores.append(s)
        beam_s, beam_id = s, (1 + d * W + ar).expand(B, W)
    level = torch.arange(k, device=dev).repeat_interleave(W)  # depth-1 of candidate ids 1..kW
    # A tiny per-level penalty makes a child rank strictly below its parent even when p = 1.
    score = torch.cat(scores, 1) - 1e-4 * level
    sel = score.topk(nodes - 1, dim=-1).indices.sort(dim=-1).values  # (B, N-1): ids are level-major
    new_id = torch.zeros(B, 1 + k * W, dtype=torch.long, device=dev)
    new_id.scatter_(1, sel + 1, torch.arange(1, nodes, device=dev).expand(B, -1))
    parent = new_id.gather(1, torch.cat(parents, 1).gather(1, sel))
    zero = torch.zeros(B, 1, dtype=torch.long, device=dev)
    tokens = torch.cat([x[:, None], torch.cat(toks, 1).gather(1, sel)], 1)
    depth = torch.cat([zero, (level + 1).expand(B, -1).gather(1, sel)], 1)
    out = (tokens, torch.cat([zero, parent], 1), depth)
    return out + (torch.cat([zero, torch.cat(rks, 1).gather(1, sel)], 1),) if ranks else out


def ancestors(parent: Tensor, depth: int) -> Tensor:
    """(B, N, N) bool: [b, i, j] is True when node j is node i or one of its ancestors."""
    B, N = parent.shape
    eye = torch.eye(N, dtype=torch.bool, device=parent.device).expand(B, N, N)
    anc = eye
    for _ in range(depth):
        anc = eye | anc.gather(1, parent[:, :, None].expand(B, N, N))
    return anc


# ---- choosing trees --------------------------------------------------------------------------------
def build_static(accuracy: list[list[float]], nodes: int) -> StaticTree:
    """The static tree of `nodes` nodes that greedily maximises the expected accepted length.

    Args:
        accuracy: accuracy[d][r] = how often head d+1's rank-r candidate is the right token.
        nodes: node budget, root included.
    """
    if nodes < 2:
        raise UserError(f"a tree of {nodes} node(s) drafts nothing: use --nodes 2 or more")
    D = len(accuracy)
    heap: list[tuple[float, tuple[int, ...]]] = []

    def push_children(path: tuple[int, ...], prob: float) -> None:
        if len(path) < D:
            for r, a in enumerate(accuracy[len(path)]):
                heapq.heappush(heap, (-prob * a, path + (r,)))

    push_children((), 1.0)
    paths: list[tuple[int, ...]] = []
    while heap and len(paths) < nodes - 1:
        neg, path = heapq.heappop(heap)
        paths.append(path)
        push_children(path, -neg)
    return StaticTree(paths)


def expected_accept_length(tree: StaticTree, accuracy: list[list[float]]) -> float:
    """Expected tokens per step under independent per-depth accuracies: 1 (bonus) + sum of path probabilities."""
    return 1.0 + sum(math.prod(accuracy[i][r] for i, r in enumerate(p)) for p in tree.paths)


def as_tree(tree, draft: int | None, max_depth: int) -> StaticTree | DynamicTree:
    """Resolve generate's `tree` argument: a tree, an int (dynamic tree nodes) or None (dynamic, 16 nodes)."""
    depth = draft or max_depth
    if tree is None or isinstance(tree, int):
        return DynamicTree(DEFAULT_NODES if tree is None else tree, depth)
    if isinstance(tree, DynamicTree):
        d = min(tree.depth, depth)
        t = DynamicTree(tree.nodes, d, tree.width if tree.width * d >= tree.nodes - 1 else 0)
    elif isinstance(tree, StaticTree):
        t = tree.truncate(draft) if draft else tree
    else:
        raise UserError(f"tree {tree!r}: give a StaticTree, a DynamicTree or a node count")
    if t.depth > max_depth or t.depth < 1:
        raise UserError(f"the tree has depth {t.depth} but the model has {max_depth} MTP head(s): re-measure it with `multitoken tree` or pass --draft")
    return t


def load_tree(path: str | Path) -> StaticTree:
    """A static tree from a tree.json written by `multitoken tree`; a one-line `UserError` when the
    file is missing, unreadable or malformed."""
    import json

    from multitoken.config import MAX_HEAD_DEPTH

    path = Path(path)
    remedy = "write one with `multitoken tree --run RUN_DIR --data DATA_DIR`, or use --tree dynamic:N"
    if not path.is_file():
        raise UserError(f"tree file {path} not found: {remedy}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"tree file {path} is not valid JSON ({e}): {remedy}") from None
    paths = data.get("paths") if isinstance(data, dict) else None
    ok = isinstance(paths, list) and 0 < len(paths) < MAX_TREE_NODES and all(
        isinstance(p, list) and 0 < len(p) <= MAX_HEAD_DEPTH
        and all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < MAX_TREE_RANKS for r in p) for p in paths)
    if not ok:
        raise UserError(f"tree file {path} is malformed: expected {{\"paths\": [[rank, ...], ...]}} with 1 to "
                        f"{MAX_TREE_NODES - 1} paths of 1 to {MAX_HEAD_DEPTH} ranks from 0 to {MAX_TREE_RANKS - 1}; {remedy}")
    try:
        return StaticTree([tuple(p) for p in paths])
    except UserError as e:
        raise UserError(f"tree file {path}: {e}") from None


def resolve_tree(spec: str | None, run_dir: str | Path) -> StaticTree | DynamicTree | None:
    """CLI --tree: None -> RUN_DIR/tree.json when present (else None: dynamic), 'dynamic:N', or a path."""
    if spec is None:
        path = Path(run_dir) / TREE_FILE
        return load_tree(path) if path.is_file() else None
    if spec.startswith("dynamic"):
        from multitoken.checks import parse_int

        _, _, n = spec.partition(":")
        nodes = parse_int(n, 2, MAX_TREE_NODES, what=f"--tree {spec!r}: expected dynamic:N, N nodes") if n else DEFAULT_NODES
        return DynamicTree(nodes, 1 << 30)  # depth capped by the model in as_tree
    return load_tree(spec)
