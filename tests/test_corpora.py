"""Corpora: every kind reads into documents with stable ids; the split depends on ids alone."""

from __future__ import annotations

import itertools
import json
import sysconfig
from pathlib import Path

import pytest

from multitoken.data.corpora import Corpus, Document, is_validation, iter_documents, split_documents, stdlib_files
from multitoken.errors import UserError


def make_corpora(root: Path) -> dict[str, Path]:
    """One small corpus of each on-disk kind; each holds the texts 'doc 0' .. 'doc 9'."""
    texts = [f"doc {i}\nline two of {i}" for i in range(10)]
    d = root / "dir"
    (d / "sub").mkdir(parents=True)
    for i, t in enumerate(texts):
        (d / ("sub" if i % 2 else "") / f"f{i}.txt").write_text(t)
    (d / "ignored.md").write_text("not matched by the default glob")
    txt = root / "book.txt"
    txt.write_text("\n\n".join(texts) + "\n\n  \n\n")
    jsonl = root / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t, "n": i}) for i, t in enumerate(texts)) + "\n\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": texts, "n": list(range(10))}), root / "rows.parquet")
    import datasets

    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(root / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts[:7]}),
                          "test": datasets.Dataset.from_dict({"body": texts[7:]})}).save_to_disk(str(root / "hfdict"))
    return {"dir": d, "txt": txt, "jsonl": jsonl, "parquet": root / "rows.parquet", "hf-dataset": root / "hf", "hfdict": root / "hfdict"}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_corpora(tmp_path_factory.mktemp("corpora"))


@pytest.mark.parametrize("kind", ["dir", "txt", "jsonl", "parquet", "hf-dataset", "hfdict"])
def test_every_kind_reads_the_same_texts(kind: str, corpora: dict[str, Path]) -> None:
    c = Corpus(str(corpora[kind]), field="body")
    assert c.kind == ("hf-dataset" if kind == "hfdict" else kind)
    docs = list(c)
    assert sorted(d.text for d in docs) == sorted(f"doc {i}\nline two of {i}" for i in range(10))
    assert len({d.source for d in docs}) == 10
    assert [d.source for d in Corpus(str(corpora[kind]), field="body")] == [d.source for d in docs]  # deterministic


def test_source_ids(corpora: dict[str, Path]) -> None:
    assert [d.source for d in Corpus(str(corpora["dir"]))][:3] == ["f0.txt", "f2.txt", "f4.txt"]
    assert [d.source for d in Corpus(str(corpora["jsonl"]), field="body")][:2] == ["rows.jsonl#0", "rows.jsonl#1"]
    assert [d.source for d in Corpus(str(corpora["txt"]))][-1] == "book.txt#9"
    assert [d.source for d in Corpus(str(corpora["hfdict"]), field="body")][0] == "hfdict/test#0"


def test_dir_glob_reads_rows_of_jsonl(corpora: dict[str, Path], tmp_path: Path) -> None:
    assert [d.text for d in Corpus(str(corpora["dir"]), glob="*.md")] == ["not matched by the default glob"]
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "z"}\n')
    assert [(d.source, d.text) for d in Corpus(str(tmp_path), glob="*.jsonl")] == [("a.jsonl#0", "x"), ("a.jsonl#1", "y"), ("b.jsonl#0", "z")]


def test_errors(corpora: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        Corpus(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no documents"):
        list(Corpus(str(tmp_path / "empty")))
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(UserError, match="has no documents"):
        list(iter_documents(str(tmp_path / "blank.txt")))
    (tmp_path / "blanks").mkdir()  # files and rows of whitespace alone are no documents
    (tmp_path / "blanks" / "a.txt").write_text(" \n\t\n")
    (tmp_path / "blanks" / "b.jsonl").write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(UserError, match="has no documents"):
        list(Corpus(str(tmp_path / "blanks"), glob="*"))
    (tmp_path / "blanks" / "c.txt").write_text("x = 1\n")
    assert [d.source for d in Corpus(str(tmp_path / "blanks"), glob="*")] == ["c.txt"]
    for kind in ("jsonl", "parquet", "hf-dataset"):
        with pytest.raises(UserError, match="pass --field"):
            list(Corpus(str(corpora[kind]), field="text"))
        with pytest.raises(UserError, match="pass --field"):
            list(Corpus(str(corpora[kind]), field="n"))  # a number, not text
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        list(Corpus(str(tmp_path / "bad.jsonl")))
    with pytest.raises(UserError, match="drop --glob"):
        Corpus(str(corpora["jsonl"]), glob="*.txt")


def test_undecodable_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe latin-1 \xe9")
    c = Corpus(str(tmp_path))
    assert [d.source for d in c] == ["a.txt"] and c.skipped == [("b.txt", "not UTF-8")]


def test_stdlib_corpus() -> None:
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 300 and rels == sorted(rels)
    names = {Path(r).name for r in rels}
    assert "os.py" in names and "topics.py" not in names
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(r.split("/")[:-1]) for r in rels)
    assert "pydoc_data/topics.py" not in rels and not any(r.startswith("_sysconfigdata") for r in rels)
    assert len(stdlib_files(include_tests=True)) > len(files)
    docs = list(itertools.islice(Corpus("python-stdlib"), 5))
    assert [d.source for d in docs] == rels[:5] and "__future__" in docs[0].text


def test_split_is_a_function_of_source_ids() -> None:
    docs = [Document(f"file{i}.py", "x") for i in range(2000)]
    train, val = split_documents(docs, 0.02)
    assert len(train) + len(val) == 2000 and 20 <= len(val) <= 60
    assert [d.source for d in val] == [d.source for d in docs if is_validation(d.source, 0.02)]
    # dropping other documents never moves one between splits
    sub_train, sub_val = split_documents(docs[::3], 0.02)
    assert {d.source for d in sub_val} == {d.source for d in val} & {d.source for d in docs[::3]}


def test_split_guarantees_one_of_each() -> None:
    two = [Document("a", "x"), Document("b", "y")]
    for frac in (1e-9, 0.999999):
        train, val = split_documents(two, frac)
        assert len(train) == 1 and len(val) == 1
    train, val = split_documents(two, 1e-9)
    train_r, val_r = split_documents(two[::-1], 1e-9)
    assert (train, val) == (train_r, val_r)  # the fallback picks by hash, not by position
    assert split_documents([Document("a", "x")], 0.02) == ([Document("a", "x")], [])
    assert split_documents(two, 0.0)[1] == []
    with pytest.raises(UserError):
        split_documents(two, 1.0)


def test_non_utf8_corpus_names_the_file_and_the_encoding(tmp_path: Path) -> None:
    latin1 = "café au lait\n\nsecond paragraph".encode("latin-1")  # 'é' is the single byte 0xe9 at offset 3
    assert latin1[3] == 0xE9
    (tmp_path / "book.txt").write_bytes(latin1)
    with pytest.raises(UserError, match=r"book\.txt is not UTF-8 \(invalid continuation byte 0xe9 at byte offset 3\): convert it to UTF-8") as e:
        list(Corpus(str(tmp_path / "book.txt")))
    assert "\n" not in str(e.value)
    rows = b'{"text": "fine"}\n{"text": "caf\xe9"}\n'  # line 2 starts at byte 17; its 0xe9 is at byte 17 + 13
    (tmp_path / "rows.jsonl").write_bytes(rows)
    assert rows.index(b"\xe9") == 30
    with pytest.raises(UserError, match=r"rows\.jsonl line 2 is not UTF-8 \(invalid continuation byte 0xe9 at byte offset 30\)"):
        list(Corpus(str(tmp_path / "rows.jsonl")))
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.txt").write_bytes(b"\xff\xfeh\x00i\x00")  # UTF-16 with its byte-order mark
    with pytest.raises(UserError, match=r"has no documents: 1 matching file\(s\) are not UTF-8, e\.g\. sub/a\.txt is not UTF-8 "
                                        r"\(invalid start byte 0xff at byte offset 0\): convert them to UTF-8"):
        list(Corpus(str(folder)))
    (folder / "b.txt").write_text("readable")
    assert [d.text for d in Corpus(str(folder))] == ["readable"]  # a folder skips the unreadable file when others remain
