"""Shared fixtures: tiny seeded models of every head family."""

from __future__ import annotations

import pytest
import torch

from multitoken.config import HeadsConfig, ModelConfig
from multitoken.model import Transformer

FAMILIES = ["parallel", "sequential", "medusa"]
SHARED = "sequential:shared"
"""One sequential module run at every depth (HeadsConfig.shared), as a `kind` for the helpers below."""
FUSED = "sequential:shared:fused"
"""A shared module whose depth 1 reads fused low/mid/high backbone states (HeadsConfig.fused)."""


def tiny_config(kind: str = "none", depth: int = 0, **overrides) -> ModelConfig:
    """A ~50k-parameter model: fast enough for exhaustive CPU tests. `kind` is a family with its
    flags, e.g. ``sequential:shared:fused``."""
    family, *flags = kind.split(":")
    base = dict(vocab_size=61, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=64,
                max_seq_len=64, eos_id=1, heads=HeadsConfig(family, depth, shared="shared" in flags, fused="fused" in flags))
    return ModelConfig(**{**base, **overrides})


def tiny_model(kind: str = "none", depth: int = 0, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(kind, depth, **overrides))


def pytest_configure(config):
    """Before any fixture (module-scoped ones included, which run before function-scoped autouse
    fixtures): no clock-driven draft length anywhere in the suite."""
    from multitoken.decoding import runner

    runner.CPU_COSTS = False


@pytest.fixture(autouse=True)
def _fixed_draft_length(monkeypatch):
    """`generate(draft=None)` drafts with every head: on the CPU the length chosen from timed steps
    follows the clock, and tests count steps (tests/test_cpu_costs.py turns the choice back on)."""
    from multitoken.decoding import runner

    monkeypatch.setattr(runner, "CPU_COSTS", False)


@pytest.fixture(autouse=True)
def _deterministic_one_thread():
    """Seeded, and one intra-op thread: tiny matmuls and attention run many times slower with two
    OpenMP threads as soon as anything else runs on a 2-core machine."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Tests never reach the network: huggingface_hub reads only its cache (a Hub id that is not cached
# is the one-line error a user sees offline).
import os  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
