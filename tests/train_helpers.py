"""Helpers shared by the training, evaluation, checkpoint and parallel tests: a tiny prepared
corpus and a tiny seeded TrainConfig (imported by the test files; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from multitoken.config import TrainConfig

WORDS = "zero one two three four five six seven eight nine".split()


def write_corpus(path: Path, n_docs: int = 160, seed: int = 0) -> Path:
    """Documents counting in words from a random start (predictable several tokens ahead), one per paragraph."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        start, n = rng.randrange(10), rng.randrange(20, 60)
        docs.append(" ".join(WORDS[(start + i) % 10] for i in range(n)))
    path.write_text("\n\n".join(docs) + "\n")
    return path


def make_data(root: Path, tokenizer: str = "bpe:300") -> Path:
    """A DATA_DIR prepared with the data engineer's `prepare` from `write_corpus`."""
    from multitoken.data.prepare import prepare

    root.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(root / "corpus.txt")
    out = root / "data"
    prepare(str(corpus), tokenizer, out, val_fraction=0.15, progress=False)
    return out


def tiny_train_config(**overrides) -> TrainConfig:
    """A seconds-long CPU run of the tiny preset."""
    base = dict(preset="tiny", heads="parallel:2", steps=8, batch_size=4, seq_len=32, warmup=2, lr=3e-3, min_lr=3e-4,
                eval_every=0, eval_batches=2, save_every=0, log_every=1, seed=0, device="cpu", dtype="fp32")
    return TrainConfig(**{**base, **overrides})


@pytest.fixture
def one_thread():
    """Tiny models run faster on one intra-op thread, and far faster when other tests share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
