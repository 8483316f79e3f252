"""prepare: every corpus kind into a DATA_DIR, EOS-separated documents, reuse, atomicity, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_corpora import make_corpora

from multitoken.cli import main
from multitoken.data.corpora import Corpus, split_documents
from multitoken.data.prepare import load_meta, load_tokenizer, prepare
import multitoken.data.prepare as prep
from multitoken.data.shards import read_shard
from multitoken.data.tokenizer import Tokenizer
from multitoken.errors import UserError
from multitoken.io.smollm2 import smollm2_gguf


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_corpora(tmp_path_factory.mktemp("corpora"))


def documents_in(data_dir: Path, split: str) -> list[str]:
    """The texts of a split, recovered by cutting the shard at EOS."""
    tok = load_tokenizer(data_dir)
    ids = np.asarray(read_shard(data_dir / f"{split}.bin"))
    assert len(ids) == 0 or ids[-1] == tok.eos_id  # every document, the last included, ends with EOS
    cuts = np.flatnonzero(ids == tok.eos_id)
    return [tok.decode(ids[a + 1 if i else 0 : b]) for i, (a, b) in enumerate(zip(np.r_[-1, cuts[:-1]], cuts))]


@pytest.mark.parametrize("kind", ["dir", "txt", "jsonl", "parquet", "hf-dataset", "hfdict"])
def test_every_corpus_kind(kind: str, corpora: dict[str, Path], tmp_path: Path) -> None:
    meta = prepare(str(corpora[kind]), "bytes", tmp_path, field="body", progress=False)
    assert meta["reused"] is False and meta["vocab_size"] == 257 and meta["eos_id"] == 256 and meta["dtype"] == "uint16"
    train, val = split_documents(list(Corpus(str(corpora[kind]), field="body")), prep.DEFAULT_VAL_FRACTION)
    assert documents_in(tmp_path, "train") == [d.text for d in train]
    assert documents_in(tmp_path, "val") == [d.text for d in val] and len(val) >= 1
    s = meta["splits"]
    assert (s["train"]["docs"], s["val"]["docs"]) == (len(train), len(val))
    assert s["train"]["tokens"] == sum(len(d.text.encode()) + 1 for d in train)
    assert meta["sources"]["val"] == [d.source for d in val]
    assert load_meta(tmp_path) == {k: v for k, v in meta.items() if k != "reused"}


@pytest.fixture
def bpe_trainings(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The texts of every `Tokenizer.train_bpe` call, in order (the real training still runs)."""
    calls: list[list[str]] = []
    real = Tokenizer.train_bpe.__func__

    def spy(cls, texts, vocab_size, length=None):  # type: ignore[no-untyped-def]
        texts = list(texts)
        calls.append(texts)
        return real(cls, texts, vocab_size, length)

    monkeypatch.setattr(Tokenizer, "train_bpe", classmethod(spy))
    return calls


def test_stdlib_bpe_trains_on_train_split_only(tmp_path: Path, bpe_trainings: list[list[str]]) -> None:
    meta = prepare("python-stdlib", "bpe:400", tmp_path, max_docs=12, val_fraction=0.2, progress=False)
    seen = [t for texts in bpe_trainings for t in texts]
    assert meta["corpus"] == "python-stdlib" and meta["tokenizer_kind"] == "bpe" and meta["eos_id"] == 0
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 12
    train_texts = documents_in(tmp_path, "train")
    assert seen == train_texts and not set(documents_in(tmp_path, "val")) & set(seen)
    assert meta["vocab_size"] == load_tokenizer(tmp_path).vocab_size <= 400


def test_pretrained_tokenizer_path(corpora: dict[str, Path], tmp_path: Path) -> None:
    tok = Tokenizer.train_bpe(["some training text for a tokenizer " * 50], 300)
    tok.save(tmp_path / "tok")
    meta = prepare(str(corpora["jsonl"]), str(tmp_path / "tok" / "tokenizer.json"), tmp_path / "data", field="body", progress=False)
    assert meta["vocab_size"] == tok.vocab_size and meta["tokenizer_kind"] == "bpe"
    assert documents_in(tmp_path / "data", "train")[0] == "doc 0\nline two of 0"


def test_reuse_and_force(corpora: dict[str, Path], tmp_path: Path) -> None:
    args = dict(corpus=str(corpora["dir"]), tokenizer="bytes", out=tmp_path, progress=False)
    first = prepare(**args)
    stamp = (tmp_path / "train.bin").stat().st_mtime_ns
    again = prepare(**args)
    assert again["reused"] is True and (tmp_path / "train.bin").stat().st_mtime_ns == stamp
    assert prepare(**args, force=True)["reused"] is False
    changed = prepare(**{**args, "tokenizer": "bpe:300"})
    assert changed["reused"] is False and changed["vocab_size"] != first["vocab_size"]
    assert prepare(**{**args, "tokenizer": "bpe:300"}, max_docs=5)["splits"]["train"]["docs"] < 5
    # a damaged shard is not reused
    data = (tmp_path / "val.bin").read_bytes()
    (tmp_path / "val.bin").write_bytes(data[:-1])
    assert prepare(**{**args, "tokenizer": "bpe:300"}, max_docs=5)["reused"] is False


def test_killed_prepare_is_not_complete(corpora: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepare(str(corpora["dir"]), "bytes", tmp_path, progress=False)

    def killed(*a, **k):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_write_split", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(corpora["txt"]), "bytes", tmp_path, progress=False)
    with pytest.raises(UserError, match="no complete prepare.*multitoken prepare"):
        load_meta(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        prepare(str(tmp_path / "missing"), "bytes", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no documents"):
        prepare(str(tmp_path / "empty"), "bytes", tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="DATA_DIR .* does not exist: run `multitoken prepare"):
        load_meta(tmp_path / "nothing")
    with pytest.raises(UserError, match="multitoken prepare"):
        load_tokenizer(tmp_path / "empty")


def test_cli(corpora: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    argv = ["prepare", "--corpus", str(corpora["jsonl"]), "--field", "body", "--tokenizer", "bytes", "--out", str(data), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"prepared {data}") and "train" in out and "val" in out
    assert main(argv) == 0 and capsys.readouterr().out.startswith(f"reused {data}")
    assert json.loads((data / "meta.json").read_text())["corpus_kind"] == "jsonl"
    assert main(["prepare", "--corpus", str(tmp_path / "nope"), "--tokenizer", "bytes", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: corpus") and err.count("\n") == 1


@pytest.mark.slow
def test_gguf_tokenizer_data_dir(tmp_path: Path) -> None:
    gguf = smollm2_gguf()  # CI installs it; a missing package fails with the install command
    meta = prepare("python-stdlib", str(gguf), tmp_path, max_docs=6, progress=False)
    assert (meta["vocab_size"], meta["eos_id"], meta["dtype"], meta["tokenizer_kind"]) == (49152, 2, "uint16", "pretrained")
    assert documents_in(tmp_path, "train")[0].startswith('"""Record of phased-in incompatible language changes.')
    assert prepare("python-stdlib", str(gguf), tmp_path, max_docs=6, progress=False)["reused"] is True


# ---- splits that training could not use are refused by prepare, not at train time ---------------


def one_document_corpus(root: Path, goes_to_validation: bool) -> Path:
    """A .txt corpus of one paragraph, named so that the split's rule (sha1 of the source id '<name>#0' as a
    fraction of 2**64, below --val-fraction 0.5 means validation) puts it where asked; sha1 computed here."""
    import hashlib

    for i in range(100):
        name = f"one{i}.txt"
        h = int.from_bytes(hashlib.sha1(f"{name}#0".encode()).digest()[:8], "big") / 2.0**64
        if (h < 0.5) == goes_to_validation:
            (root / name).write_text("a single paragraph of text\nwith two lines\n")
            return root / name
    raise AssertionError("no name found")


def test_empty_validation_split_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = one_document_corpus(tmp_path, goes_to_validation=False)
    for frac in ("0.02", "0.5"):
        assert main(["prepare", "--corpus", str(corpus), "--tokenizer", "bytes", "--out", str(tmp_path / "d"), "--val-fraction", frac, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: prepare would leave the validation split")
        assert "--val-fraction" in err and "bigger corpus" in err
    assert not (tmp_path / "d" / "meta.json").exists()
    with pytest.raises(UserError, match=r"validation split .* empty .*: give --val-fraction above 0"):
        prepare(str(make_many_documents(tmp_path)), "bytes", tmp_path / "d", val_fraction=0.0, progress=False)


def make_many_documents(root: Path) -> Path:
    path = root / "many.txt"
    path.write_text("\n\n".join(f"paragraph {i}" for i in range(20)))
    return path


def test_bpe_never_trains_on_an_empty_train_split(tmp_path: Path, bpe_trainings: list[list[str]]) -> None:
    corpus = one_document_corpus(tmp_path, goes_to_validation=True)
    with pytest.raises(UserError, match=r"train split .* empty \(0 train, 1 validation documents at --val-fraction 0\.5\): .*bigger corpus"):
        prepare(str(corpus), "bpe:400", tmp_path / "d", val_fraction=0.5, progress=False)
    assert bpe_trainings == []


def test_split_shorter_than_one_window_is_refused(tmp_path: Path) -> None:
    from tokenizers import Regex, normalizers

    tok = Tokenizer.bytes()
    tok._tok.normalizer = normalizers.Replace(Regex(r"[\s\S]"), "")  # every document encodes to no tokens: EOS alone
    tok.save(tmp_path / "tok")
    assert Tokenizer.load(tmp_path / "tok").encode_batch(["some text"]) == [[]]
    with pytest.raises(UserError, match=r"split of .* holds 1 token\(s\), fewer than the 2 of one training window"):
        prepare(str(make_many_documents(tmp_path)), str(tmp_path / "tok"), tmp_path / "d", val_fraction=0.02, progress=False)
    assert not (tmp_path / "d" / "meta.json").exists()


def test_summary_notes_a_split_shorter_than_the_default_window(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from multitoken.config import TrainConfig

    (tmp_path / "c.txt").write_text("x" * 40 + "\n\n" + "y" * 300)  # with bytes: documents of 41 and 301 tokens
    assert main(["prepare", "--corpus", str(tmp_path / "c.txt"), "--tokenizer", "bytes", "--out", str(tmp_path / "d"), "--quiet"]) == 0
    out = capsys.readouterr().out
    meta = load_meta(tmp_path / "d")
    short = [s for s in ("train", "val") if meta["splits"][s]["tokens"] == 41]
    assert len(short) == 1 and TrainConfig().seq_len == 128
    assert f"note: {short[0]} holds 41 tokens, fewer than one window of train's default --seq-len 128: train with --seq-len 40 or less" in out
    assert out.count("note:") == 1


def test_meta_records_the_tokenizer_identity_and_load_tokenizer_checks_it(corpora: dict[str, Path], tmp_path: Path) -> None:
    import hashlib

    meta = prepare(str(corpora["dir"]), "bytes", tmp_path / "d", progress=False)
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}  # GPT-2's byte alphabet: these bytes stand for themselves
    extra = iter(range(256, 512))
    table = [chr(b) if b in printable else chr(next(extra)) for b in range(256)] + ["<|endoftext|>"]  # ids 0..256 in order
    naive = hashlib.sha256(json.dumps({"vocab": table, "eos": "<|endoftext|>"}, ensure_ascii=False).encode()).hexdigest()
    assert meta["tokenizer_sha256"] == naive == prep.tokenizer_sha256(tmp_path / "d")
    # another tokenizer of the same size written over the DATA_DIR's own is refused
    tok = json.loads((tmp_path / "d" / "tokenizer.json").read_text())
    v = tok["model"]["vocab"]
    v["a"], v["b"] = v["b"], v["a"]
    (tmp_path / "d" / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match=r"tokenizer\.json is not the tokenizer the shards were made with"):
        load_tokenizer(tmp_path / "d")


def test_data_fingerprint_is_sha256_of_tokenizer_and_shards_and_tells_two_prepares_apart(corpora: dict[str, Path],
                                                                                          tmp_path: Path) -> None:
    """meta.json's data_sha256 against hashlib over the files; a second prepare of the same corpus gives the
    same one, a corpus with one file changed another (the study refuses results measured on other data)."""
    import hashlib
    import shutil

    meta = prepare(str(corpora["dir"]), "bytes", tmp_path / "a", progress=False)
    d = tmp_path / "a"
    naive = hashlib.sha256(meta["tokenizer_sha256"].encode() + (d / "train.bin").read_bytes() + (d / "val.bin").read_bytes())
    assert meta["data_sha256"] == naive.hexdigest() == prep.data_sha256(d)
    assert prepare(str(corpora["dir"]), "bytes", tmp_path / "b", progress=False)["data_sha256"] == meta["data_sha256"]
    corpus = tmp_path / "corpus"
    shutil.copytree(corpora["dir"], corpus)
    first = sorted(p for p in corpus.rglob("*") if p.is_file())[0]
    first.write_text(first.read_text() + "\nx = 1\n")
    other = prepare(str(corpus), "bytes", tmp_path / "c", progress=False)
    assert other["data_sha256"] != meta["data_sha256"]
    # a DATA_DIR from before the record: computed from the files, the same value
    m = json.loads((d / "meta.json").read_text())
    del m["data_sha256"]
    (d / "meta.json").write_text(json.dumps(m))
    assert prep.data_sha256(d) == naive.hexdigest()
