"""Tokenizer: exact byte-level round trips, save/load of every kind, EOS ids, streaming decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multitoken.data.tokenizer import EOS_TOKEN, StreamDecoder, Tokenizer
from multitoken.errors import UserError
from multitoken.io.smollm2 import smollm2_gguf

SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "héllo wörld — 世界 🙂 \t tabs\r\nand CRLF",
    "literal <|endoftext|> inside a document",
    "",
    "   leading spaces and 1234567 digits",
]
CORPUS = ["def add(a, b):\n    return a + b\n" * 20, "class Foo:\n    pass\n" * 20, "héllo 世界 🙂 " * 10]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe(CORPUS, 320)


def test_bytes_ids_are_byte_values() -> None:
    tok = Tokenizer.bytes()
    assert tok.vocab_size == 257 and tok.eos_id == 256 and tok.kind == "bytes"
    s = "aé世🙂"
    assert tok.encode(s) == list(s.encode("utf-8"))


def test_bpe_eos_is_id_zero(bpe: Tokenizer) -> None:
    assert bpe.eos_id == 0 and bpe.id_to_token(0) == EOS_TOKEN
    assert 257 < bpe.vocab_size <= 320
    assert len(bpe.encode("def add(a, b):")) < len("def add(a, b):")  # merges were learned


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_round_trip_and_batch(kind: str, bpe: Tokenizer) -> None:
    tok = Tokenizer.bytes() if kind == "bytes" else bpe
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_special_tokens_are_text_unless_asked(kind: str, bpe: Tokenizer) -> None:
    tok = Tokenizer.bytes() if kind == "bytes" else bpe
    assert tok.eos_id not in tok.encode("a <|endoftext|> b")  # a document cannot forge a boundary
    assert tok.encode(EOS_TOKEN, special=True) == [tok.eos_id]
    assert tok.decode([tok.eos_id]) == EOS_TOKEN


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_save_load(kind: str, bpe: Tokenizer, tmp_path: Path) -> None:
    tok = Tokenizer.bytes() if kind == "bytes" else bpe
    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    for where in (tmp_path, path):
        back = Tokenizer.load(where)
        assert (back.kind, back.vocab_size, back.eos_id) == (tok.kind, tok.vocab_size, tok.eos_id)
        assert all(back.encode(s) == tok.encode(s) for s in SAMPLES)


def test_load_bare_tokenizer_json_guesses_eos(bpe: Tokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.eos_id == 0 and tok.kind == "pretrained"
    assert Tokenizer.load(tmp_path, eos_token="<|endoftext|>").eos_id == 0


def test_hf_style_folder_eos_from_config(bpe: Tokenizer, tmp_path: Path) -> None:
    """A model folder whose tokenizer_config.json names EOS as an AddedToken dict, as older transformers wrote."""
    bpe.save(tmp_path)
    token_b = bpe.id_to_token(5)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": token_b}}))
    assert Tokenizer.load(tmp_path).eos_id == 5


def test_hf_folder_without_tokenizer_json(bpe: Tokenizer, tmp_path: Path) -> None:
    """vocab.json + merges.txt (GPT-2 layout): transformers builds the fast tokenizer, we keep its Rust core."""
    bpe._tok.model.save(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": EOS_TOKEN}))
    tok = Tokenizer.load(tmp_path)
    assert tok.kind == "pretrained" and tok.eos_id == 0 and tok.vocab_size == bpe.vocab_size
    assert all(tok.decode(tok.encode(s)) == s for s in SAMPLES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        Tokenizer.load(tmp_path / "empty")


def test_spec_and_errors(tmp_path: Path) -> None:
    assert Tokenizer.from_spec("bytes").vocab_size == 257
    assert Tokenizer.from_spec("bpe:300", train_texts=CORPUS).eos_id == 0
    for bad in ("bpe:x", "bpe:100", str(tmp_path / "missing.json")):
        with pytest.raises(UserError):
            Tokenizer.from_spec(bad, train_texts=CORPUS)
    with pytest.raises(UserError, match="must be trained"):
        Tokenizer.from_spec("bpe:300")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable tokenizer.json"):
        Tokenizer.load(tmp_path / "junk.json")


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_stream_decoder_holds_split_characters(kind: str, bpe: Tokenizer) -> None:
    tok = Tokenizer.bytes() if kind == "bytes" else bpe
    text = "a 世界🙂 é, done"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_bytes_exact_points() -> None:
    tok = Tokenizer.bytes()
    dec = tok.stream_decoder()
    ids = list("x🙂".encode("utf-8"))  # 1 + 4 bytes
    assert [dec.push(i) for i in ids] == ["x", "", "", "", "🙂"]
    assert dec.push([0xE4, 0xB8]) == ""  # half of 世 ...
    assert dec.flush() == "\ufffd"  # ... given up at the end, not lost silently
    assert dec.push(list("ok".encode())) == "ok"


def test_stream_decoder_gives_up_on_invalid_bytes() -> None:
    dec = StreamDecoder(Tokenizer.bytes(), max_hold=3)
    out = "".join(dec.push(0xFF) for _ in range(3))
    assert out.startswith("\ufffd")


@pytest.mark.slow
def test_gguf_tokenizer(tmp_path: Path) -> None:
    gguf = smollm2_gguf()  # CI installs it; a missing package fails with the install command
    tok = Tokenizer.load(gguf)
    assert tok.vocab_size == 49152 and tok.eos_token == "<|im_end|>" and tok.eos_id == 2
    code = "def f(x):\n    return x  # 世界\n"
    ids = tok.encode(code)
    assert ids[:3] == [1604, 275, 24] and tok.decode(ids) == code
    assert tok.encode("<|im_start|>user", special=True)[0] == 1
    tok.save(tmp_path)  # a DATA_DIR keeps the converted tokenizer.json: no GGUF needed later
    back = Tokenizer.load(tmp_path)
    assert back.encode(code) == ids and back.eos_id == 2


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_chat_template_survives_save_and_renders_as_transformers_does(tmp_path: Path) -> None:
    """A template kept in tokenizer_config.json renders to the ids transformers' apply_chat_template
    gives for the same files (special tokens parsed as tokens, not text); no template: one line."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.bytes()
    tok._tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok = Tokenizer(tok._tok, "<|im_end|>", "pretrained", chat_template=CHATML)
    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓"}]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), chat_template=CHATML)
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert back.chat(messages) == list(want)
    assert back.chat(messages).count(back._tok.token_to_id("<|im_start|>")) == 3
    with pytest.raises(UserError, match="no chat template"):
        Tokenizer.bytes().chat(messages)


def test_the_fingerprint_follows_which_id_each_token_has():
    """Two word-level tables with the same tokens under other ids (a model would read other text
    for the same ids) get different fingerprints; the same table built twice gets the same one,
    and hashing it by hand in id order gives it."""
    import hashlib
    import json as _json

    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import WordLevel

    from multitoken.data.tokenizer import Tokenizer

    def make(words):
        return Tokenizer(RustTokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")), "<eos>", "bpe")

    a = ["<eos>", "<unk>", "zeta", "alpha", "mid"]
    b = ["<eos>", "<unk>", "alpha", "mid", "zeta"]  # the same tokens, sorted: other ids
    assert make(a).fingerprint() == make(list(a)).fingerprint()
    assert make(a).fingerprint() != make(b).fingerprint()
    by_hand = hashlib.sha256(_json.dumps({"vocab": a, "eos": "<eos>"}, ensure_ascii=False).encode("utf-8")).hexdigest()
    assert make(a).fingerprint() == by_hand
