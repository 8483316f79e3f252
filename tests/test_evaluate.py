"""Evaluation: the drafting simulation by hand, expected tau on stub models with known answers,
and the `multitoken eval` JSON."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from multitoken.cli import main
from multitoken.config import ModelConfig
from multitoken.io import checkpoint as ckpt
from multitoken.model import Transformer
from multitoken.training.evaluate import accepted_runs, eval_stats, evaluate, simulate_steps, summarize
from multitoken.training.trainer import train
from train_helpers import make_data, one_thread, tiny_train_config  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_accepted_runs_and_step_simulation_by_hand():
    m = torch.tensor([[10, 11, 12, 13, 14, 15]])  # main head: m[j] predicts token j+1
    d1 = torch.tensor([[11, 0, 13, 14, 0, 0]])  # accepted where d1[i] == m[i+1]: i = 0, 2, 3
    d2 = torch.tensor([[12, 0, 0, 0, 0, 0]])  # accepted where d2[i] == m[i+2]: i = 0
    run = accepted_runs(m, [d1, d2])
    assert run.tolist() == [[2, 0, 1, 1, 0, 0]]
    # Decoding visits i=0 (emits 1+2), then i=3 (emits 1+1), then i=5 has no room for 2 drafts: stop.
    tokens, steps, accepted = simulate_steps(run, depth=2)
    assert (tokens, steps, accepted) == (5, 2, [2, 1])  # tau = 2.5, not the all-position mean 2.0


class StubModel(nn.Module):
    """Hidden states are scaled one-hot rows and the unembedding is the identity, so each depth's
    argmax is exactly the token the stub chooses. The main head predicts (7*x + 3) mod V.

    mode "copy": depth k at position i outputs the main head's choice at i+k (a perfect drafter);
    mode "random": depth k outputs an independent random token (an useless drafter).
    """

    def __init__(self, vocab: int, depth: int, mode: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.eye(vocab))
        self.depth, self.mode, self.vocab = depth, mode, vocab
        self.config = SimpleNamespace(eos_id=0, vocab_size=vocab, max_seq_len=64)
        self.gen = torch.Generator().manual_seed(0)

    def unembed_weight(self, depth: int = 0) -> torch.Tensor:
        return self.w

    def forward(self, idx: torch.Tensor) -> list[torch.Tensor]:
        main = (7 * idx + 3) % self.vocab  # (B, T)
        out = [main]
        for k in range(1, self.depth + 1):
            if self.mode == "copy":
                out.append(torch.cat([main[:, k:], main[:, :k]], dim=1))  # the last k positions are never checked
            else:
                out.append(torch.randint(0, self.vocab, main.shape, generator=self.gen))
        return [10.0 * nn.functional.one_hot(t, self.vocab).float() for t in out]  # (B, T, V) each


def windows(n: int = 3, vocab: int = 50) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (4, 33), generator=g) for _ in range(n)]


@pytest.mark.parametrize("depth", [1, 3])
def test_perfect_drafter_gives_tau_depth_plus_one(depth):
    result = summarize(eval_stats(StubModel(50, depth, "copy"), windows(), eos_id=None))
    assert result["expected_tau"] == depth + 1
    assert result["acceptance_per_position"] == [1.0] * depth
    assert result["accuracy_per_depth"][0] < 0.2  # the stub ignores the data: tau is about agreement, not accuracy


def test_random_drafter_gives_tau_near_one():
    result = summarize(eval_stats(StubModel(50, 3, "random"), windows(6), eos_id=None))
    assert 1.0 <= result["expected_tau"] < 1.1
    assert result["acceptance_per_position"][0] < 0.1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = make_data(root)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    train(tiny_train_config(steps=12, lr=1e-2, heads="parallel:2"), data, root / "run", progress=False)
    torch.set_num_threads(n)
    return data, root / "run"


def test_eval_cli_json(trained, capsys):
    data, run = trained
    assert main(["eval", "--run", str(run), "--data", str(data), "--json", "--batches", "3", "--batch-size", "4",
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("loss_per_depth", "accuracy_per_depth", "expected_tau", "count_per_depth", "tokens", "tau_steps",
                "acceptance_per_position"):
        assert key in result, key
    assert len(result["loss_per_depth"]) == 3 and result["tokens"] == 3 * 4 * 32  # the run's seq_len is 32
    assert result["depth"] == 2 and len(result["acceptance_per_position"]) == 2  # parallel:2: two extra heads
    assert 1.0 <= result["expected_tau"] <= 3.0
    assert (run / "accuracy_per_depth.png").read_bytes()[:4] == b"\x89PNG"
    # The Python API on the same data gives the same numbers.
    model, _ = ckpt.load_run(run)
    api = evaluate(model, data, n_batches=3, batch_size=4, seq_len=32)
    assert api["loss_per_depth"] == pytest.approx(result["loss_per_depth"])
    assert api["expected_tau"] == pytest.approx(result["expected_tau"])


def test_eval_rejects_data_with_a_larger_vocabulary(trained, tmp_path, capsys):
    data, _ = trained
    small = tmp_path / "small"
    ckpt.save_run(small, Transformer(ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                                 intermediate_size=64)))
    assert main(["eval", "--run", str(small), "--data", str(data), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "100" in err


def plant_id_past_vocabulary(data, split: str, offset: int) -> int:
    """Overwrite one token of a DATA_DIR shard with an id past its vocabulary and recompute the shard's
    CRC-32 (zlib over the token bytes, as the format documents), so only the range check can see it."""
    import struct
    import zlib

    from multitoken.data.shards import HEADER_SIZE

    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    path = data / f"{split}.bin"
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 2 * offset : HEADER_SIZE + 2 * offset + 2] = struct.pack("<H", vocab + 5)
    raw[24:28] = struct.pack("<I", zlib.crc32(bytes(raw[HEADER_SIZE:])))
    path.write_bytes(bytes(raw))
    return vocab


def test_id_past_the_vocabulary_is_one_line_in_train_and_eval(trained, tmp_path, capsys):
    import shutil

    data, run = trained
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    vocab = plant_id_past_vocabulary(bad, "val", 37)
    assert main(["eval", "--run", str(run), "--data", str(bad), "--batches", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {bad / 'val.bin'} is damaged: token {vocab + 5} at token offset 37 is outside the vocabulary")
    assert "multitoken prepare" in err
    plant_id_past_vocabulary(bad, "train", 1234)
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
                 "--seq-len", "16", "--device", "cpu", "--dtype", "fp32", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad / 'train.bin'} is damaged: token {vocab + 5} at token offset 1234 is" in err


def same_size_other_tokenizer(run, folder):
    """The run's tokenizer with the ids of two ordinary tokens swapped: same size, same EOS, other ids for the same text."""
    from multitoken.data.tokenizer import Tokenizer

    folder.mkdir()
    tok = json.loads((run / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    i, j = Tokenizer.load(run).encode("four five")  # two tokens the corpus is made of
    a, b = [t for t, k in vocab.items() if k in (i, j)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text((run / "tokenizer_config.json").read_text())
    return folder


def test_eval_and_resume_refuse_data_of_another_tokenizer_of_the_same_size(trained, tmp_path, capsys):
    import shutil

    from multitoken.data.prepare import prepare
    from multitoken.data.tokenizer import Tokenizer

    data, run = trained
    other = same_size_other_tokenizer(run, tmp_path / "tok")
    assert Tokenizer.load(other).vocab_size == Tokenizer.load(run).vocab_size
    assert Tokenizer.load(other).encode("four five") != Tokenizer.load(run).encode("four five")
    bad = tmp_path / "data"
    prepare(str(data.parent / "corpus.txt"), str(other), bad, val_fraction=0.15, progress=False)
    argv = ["eval", "--run", str(run), "--data", str(bad), "--batches", "1", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {bad} was prepared with a different tokenizer from the run {run}")
    # Records made before the fingerprint existed: the tokenizer files themselves are compared.
    old_run, old_bad, old_data = tmp_path / "old_run", tmp_path / "old_bad", tmp_path / "old_data"
    for src, dst in ((run, old_run), (bad, old_bad), (data, old_data)):
        shutil.copytree(src, dst)
    for f, section in ((old_run / "config.json", "data"), (old_bad / "meta.json", None), (old_data / "meta.json", None)):
        d = json.loads(f.read_text())
        (d[section] if section else d).pop("tokenizer_sha256")
        f.write_text(json.dumps(d))
    assert main([*argv[:2], str(old_run), *argv[3:4], str(old_bad), *argv[5:]]) == 2
    assert "different tokenizer" in capsys.readouterr().err
    assert main([*argv[:2], str(old_run), *argv[3:4], str(old_data), *argv[5:]]) == 0  # the same tokenizer still passes
    capsys.readouterr()
    # train --resume on it is the same mistake
    assert main(["train", "--data", str(bad), "--out", str(old_run), "--resume", "--steps", "13", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different tokenizer" in err and "resume on the data the run was trained on" in err
