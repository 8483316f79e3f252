"""Tokenizers: train a byte-level BPE, use raw bytes, or load a pretrained model's tokenizer.

Every kind is one `tokenizers.Tokenizer` (the Rust library) behind a small class, so encoding is
parallel over all cores and a saved tokenizer is always a plain ``tokenizer.json`` that other
tools read too. The class adds what the rest of multitoken needs: which id ends a document
(`eos_id`, appended after every document when data is prepared and the stop token when
generating), one constructor per kind, and `StreamDecoder` for printing generated text as it
comes without breaking multi-byte characters.

Choices:
- ``bpe:N`` is byte-level BPE (GPT-2's byte alphabet, so any text round-trips exactly) with a
  GPT-4-style split pattern (digits in groups of up to three, newlines and indentation kept
  apart from words), which compresses Python source ~1% better than GPT-2's pattern.
  ``<|endoftext|>`` is id 0.
- ``bytes`` has 257 ids: ids 0..255 *are* the byte values (a shard can be read as raw bytes
  and a model's byte predictions need no lookup table) and ``<|endoftext|>`` is id 256. It is
  stored as a BPE with no merges, so it saves and loads like any other ``tokenizer.json``.
- Text is encoded with special tokens treated as plain text: a document that happens to contain
  the string ``<|endoftext|>`` cannot forge a document boundary. Pass ``special=True`` to
  `Tokenizer.encode` to parse them (e.g. a chat template's ``<|im_start|>``).
- Next to ``tokenizer.json``, `Tokenizer.save` writes a ``tokenizer_config.json`` naming the
  EOS token (the Hugging Face convention), so `Tokenizer.load` and transformers both read it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _RustTokenizer

from multitoken.errors import UserError

EOS_TOKEN = "<|endoftext|>"

# GPT-4 (cl100k) split pattern: words with their leading space, numbers in 1-3 digit groups,
# punctuation runs, newline runs, and whitespace that precedes the next word kept separate.
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Tried in order when a tokenizer.json comes without a config naming its EOS token.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>", "</s>", "<eos>", "<|end|>")

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (what ByteLevel BPE vocabularies hold)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """Text <-> token ids, with a known end-of-document id. Build with a constructor, not ``__init__``."""

    def __init__(self, tok: _RustTokenizer, eos_token: str, kind: str, bos_token: str | None = None,
                 chat_template: str | None = None) -> None:
        """Wrap a Rust tokenizer.

        Args:
            tok: the `tokenizers.Tokenizer`.
            eos_token: text of the token that ends a document; must be in the vocabulary.
            kind: 'bpe', 'bytes' or 'pretrained' (informational; recorded in meta.json).
            bos_token: text of the beginning-of-sequence token, if the model uses one.
            chat_template: the model's Jinja chat template (Hugging Face's ``chat_template``), if any.
        """
        self.chat_template = chat_template if isinstance(chat_template, str) and chat_template else None
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            raise UserError(f"EOS token {eos_token!r} is not in the tokenizer's vocabulary: pass the right eos_token")
        self._tok = tok
        self._tok.encode_special_tokens = True  # see the module docstring: literal special tokens stay text
        self.kind = kind
        self.eos_token = eos_token
        self.eos_id: int = eos_id
        self.bos_token = bos_token
        self.bos_id: int | None = tok.token_to_id(bos_token) if bos_token else None
        self._is_bytes = _is_byte_vocab(tok)

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, length: int | None = None) -> "Tokenizer":
        """Train a byte-level BPE whose id 0 is ``<|endoftext|>``.

        Args:
            texts: training documents (an iterator is fine; it is read once).
            vocab_size: target size including the 256 byte tokens and EOS; at least 257.
            length: number of texts, if known (only for the trainer's bookkeeping).
        Returns:
            The trained tokenizer; its `vocab_size` may be below the target on a tiny corpus.
        """
        if vocab_size < 257:
            raise UserError(f"bpe:{vocab_size} is too small: byte-level BPE needs at least 257 ids (256 bytes + EOS); use bytes or a larger N")
        tok = _RustTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],  # first, so it gets id 0
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer, length=length)
        return cls(tok, EOS_TOKEN, "bpe")

    @classmethod
    def bytes(cls) -> "Tokenizer":
        """The 257-id byte tokenizer: id b is byte b, ``<|endoftext|>`` is 256."""
        alphabet = _byte_alphabet()
        tok = _RustTokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([EOS_TOKEN])
        return cls(tok, EOS_TOKEN, "bytes")

    @classmethod
    def load(cls, path: str | Path, eos_token: str | None = None) -> "Tokenizer":
        """Load a tokenizer.json, a Hugging Face model folder, or a GGUF file.

        Args:
            path: a ``tokenizer.json`` file, a folder holding one (or a single ``.gguf``, or files
                transformers can turn into a fast tokenizer), or a ``.gguf`` file.
            eos_token: override the EOS token; by default it is read from ``tokenizer_config.json``
                (``eos_token``), then ``config.json``/``generation_config.json`` (``eos_token_id``),
                then the first of `EOS_CANDIDATES` in the vocabulary.
        Returns:
            The tokenizer.
        """
        p = Path(path)
        if not p.exists():
            raise UserError(f"tokenizer {path} does not exist: give bpe:N, bytes, a tokenizer.json, a model folder or a .gguf file")
        if p.is_file() and p.suffix == ".gguf":
            return cls._from_transformers(p.parent, eos_token, gguf_file=p.name)
        if p.is_dir():
            if (p / TOKENIZER_FILE).is_file():
                p = p / TOKENIZER_FILE
            else:
                ggufs = sorted(p.glob("*.gguf"))
                if len(ggufs) == 1:
                    return cls._from_transformers(p, eos_token, gguf_file=ggufs[0].name)
                return cls._from_transformers(p, eos_token)
        try:
            tok = _RustTokenizer.from_file(str(p))
        except Exception as e:  # the Rust parser's message says what is wrong in the file
            raise UserError(f"{p} is not a readable tokenizer.json ({e}): point --tokenizer at a tokenizer.json, model folder or .gguf") from None
        cfg = _read_hf_config(p.parent)
        eos = eos_token or _hf_token(cfg.get("eos_token"), p.parent) or _eos_from_ids(tok, p.parent) \
            or _first_in_vocab(tok, EOS_CANDIDATES)
        if eos is None:
            raise UserError(f"cannot tell which token of {p} ends a document: add a tokenizer_config.json with eos_token, or pass eos_token")
        kind = cfg.get("multitoken_kind") if cfg.get("multitoken_kind") in ("bpe", "bytes") else "pretrained"
        chat = cfg.get("chat_template")
        return cls(tok, eos, kind, bos_token=_hf_token(cfg.get("bos_token"), p.parent),
                   chat_template=chat if isinstance(chat, str) else None)

    @classmethod
    def _from_transformers(cls, folder: Path, eos_token: str | None, gguf_file: str | None = None) -> "Tokenizer":
        """Let transformers build a fast tokenizer (GGUF, sentencepiece-only folders), then keep its Rust core."""
        try:
            from transformers import AutoTokenizer  # heavy import, only for these formats
        except ImportError:
            raise UserError("loading this tokenizer needs transformers (and gguf for .gguf files): pip install 'multitoken[hf]'") from None
        where = f"{folder}/{gguf_file}" if gguf_file else str(folder)
        try:
            hf = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file) if gguf_file else AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:  # transformers raises many types for "this is not a tokenizer"
            raise UserError(f"cannot load a tokenizer from {where} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): give a tokenizer.json, model folder or .gguf") from None
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise UserError(f"{where} gives only a slow (Python) tokenizer: convert it to a tokenizer.json first")
        eos = eos_token or hf.eos_token or _first_in_vocab(backend, EOS_CANDIDATES)
        if eos is None:
            raise UserError(f"{where} names no EOS token: pass eos_token")
        return cls(backend, str(eos), "pretrained", bos_token=str(hf.bos_token) if hf.bos_token else None,
                   chat_template=getattr(hf, "chat_template", None))

    @classmethod
    def from_spec(cls, spec: str, train_texts: Iterable[str] | None = None, length: int | None = None) -> "Tokenizer":
        """Build from the CLI form: ``bpe:N`` (trained on `train_texts`), ``bytes``, or a path for `load`.

        Args:
            spec: the ``--tokenizer`` value.
            train_texts: documents to train ``bpe:N`` on; unused otherwise.
            length: number of `train_texts`, if known.
        Returns:
            The tokenizer.
        """
        if spec == "bytes":
            return cls.bytes()
        if spec.startswith("bpe:"):
            from multitoken.checks import parse_int

            n = parse_int(spec[4:], 1, 1 << 24, what=f"--tokenizer {spec!r}: expected bpe:N with N a vocabulary size, e.g. bpe:8192; N")
            if train_texts is None:
                raise UserError(f"--tokenizer {spec} must be trained: run `multitoken prepare` with it, or pass train_texts")
            return cls.train_bpe(train_texts, n, length=length)
        return cls.load(spec)

    # ---- use ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's vocabulary must be at least this)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added.

        Args:
            text: the text.
            special: parse special-token strings such as ``<|im_start|>`` as their ids.
        """
        if self._is_bytes and not special:
            return list(text.encode("utf-8"))  # same ids as the Rust path, without its overhead
        if not special:
            return self._tok.encode(text, add_special_tokens=False).ids
        self._tok.encode_special_tokens = False
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = True

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (the Rust tokenizer uses every core); special tokens stay text."""
        if self._is_bytes:
            return [list(t.encode("utf-8")) for t in texts]
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # _fast (no offsets) since tokenizers 0.21
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (an incomplete UTF-8 sequence at the end decodes to U+FFFD)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays and tensors too
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary string of id `i` (byte-level tokens show GPT-2's byte characters)."""
        return self._tok.id_to_token(i)

    def token_byte_lengths(self) -> list[int]:
        """How many bytes of UTF-8 text each id stands for; 0 for special tokens (EOS, BOS, added ones).

        Byte-level vocabularies (our ``bpe:N`` and ``bytes``, GPT-2-style ones) map each character
        of a token through GPT-2's byte alphabet, so a token that holds part of a multi-byte
        character counts its own bytes and the lengths of a document's tokens add up to the UTF-8
        length of its text. Other vocabularies fall back to the UTF-8 length of each token decoded
        alone (exact for whole-character tokens). Used for bits per byte (experiments/quality.py).
        """
        inverse = {c: b for b, c in _byte_alphabet().items()}
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        special |= {i for i in (self.eos_id, self.bos_id) if i is not None}
        out = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if i in special or piece is None:
                out.append(0)
            elif all(c in inverse for c in piece):
                out.append(len(piece))  # one alphabet character per byte
            else:
                out.append(len(self._tok.decode([i]).encode("utf-8")))
        return out

    def fingerprint(self) -> str:
        """The tokenizer's identity: sha256 of its id-ordered vocabulary (added tokens included) and its EOS token.

        Two tokenizers of the same size but different tables (which would feed a model ids that mean
        other text) differ here. It is computed from the table, not from the bytes of tokenizer.json, so
        the same tokenizer saved by another version of the `tokenizers` library (which adds fields and
        has changed how merges are written) keeps its fingerprint. BPE merges are left out: a BPE
        trainer numbers tokens in merge order, so the table already pins them, and parsing them costs
        ~10x the rest (0.35 s for SmolLM2's 49k merges); the table takes ~75 ms at 49k ids.
        """
        vocab = self._tok.get_vocab(with_added_tokens=True)
        table = {"vocab": sorted(vocab, key=vocab.__getitem__), "eos": self.eos_token}
        return hashlib.sha256(json.dumps(table, ensure_ascii=False).encode("utf-8")).hexdigest()

    def stream_decoder(self) -> "StreamDecoder":
        """A fresh `StreamDecoder` over this tokenizer."""
        return StreamDecoder(self)

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Ids of `messages` ([{"role": "user", "content": ...}, ...]) rendered through the model's
        chat template, ending with the prompt for the assistant's turn (as Hugging Face renders it:
        a sandboxed Jinja environment, blocks trimmed)."""
        return self.encode(self.render_chat(messages), special=True)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The text of `messages` through the chat template (`chat` encodes it); without the
        assistant's prompt when add_generation_prompt is False."""
        if not self.chat_template:
            raise UserError("this tokenizer has no chat template: convert the model from a GGUF or a folder that has one")
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise UserError("chat templates need jinja2: pip install jinja2") from None

        def raise_exception(message: str):
            raise UserError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                          bos_token=self.bos_token or "", eos_token=self.eos_token)

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into `directory` (atomically each).

        Returns:
            The path of ``tokenizer.json``; `Tokenizer.load` on it or on `directory` reads it back.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "clean_up_tokenization_spaces": False,
            "multitoken_kind": self.kind,
        }
        if self.bos_token:
            config["bos_token"] = self.bos_token
        if self.chat_template:
            config["chat_template"] = self.chat_template
        _atomic_write(d / TOKENIZER_FILE, self._tok.to_str())
        _atomic_write(d / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return d / TOKENIZER_FILE

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id})"


class StreamDecoder:
    """Incremental decoding for streaming generation: push ids, get back only the new text.

    Text whose last character is incomplete (a multi-byte UTF-8 character split across tokens,
    which decodes to U+FFFD) is held back until the next ids complete it. Each decode covers
    the previous chunk as well as the new ids, because some decoders (SentencePiece's) render a
    token differently at the start of a string than after other text.
    """

    def __init__(self, tokenizer: Tokenizer, max_hold: int = 8) -> None:
        """Args:
            tokenizer: the tokenizer that produced the ids.
            max_hold: after this many held-back ids, emit anyway (the bytes are really invalid).
        """
        self.tokenizer = tokenizer
        self.max_hold = max_hold
        self._ids: list[int] = []  # the previous chunk (already emitted), then pending ids
        self._read = 0  # _ids[:_read] is the previous chunk

    def push(self, ids: int | Iterable[int]) -> str:
        """Add generated ids; return the text they complete (possibly empty)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # numpy arrays/scalars and tensors
        self._ids.extend([ids] if isinstance(ids, int) else ids)
        return self._emit(force=False)

    def flush(self) -> str:
        """Return whatever is held back (incomplete bytes as U+FFFD) and reset."""
        text = self._emit(force=True)
        self._ids, self._read = [], 0
        return text

    def _emit(self, force: bool) -> str:
        pending = len(self._ids) - self._read
        if pending == 0:
            return ""
        full = self.tokenizer.decode(self._ids)
        if full.endswith("\ufffd") and pending < self.max_hold and not force:
            return ""
        prefix = self.tokenizer.decode(self._ids[: self._read]) if self._read else ""
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return full[len(prefix) :]


# ---- helpers ----------------------------------------------------------------------------------


def _is_byte_vocab(tok: _RustTokenizer) -> bool:
    """True for the `Tokenizer.bytes` layout (ids 0..255 = bytes, no merges), which has a fast path."""
    if tok.get_vocab_size(with_added_tokens=False) != 256 or tok.normalizer is not None:
        return False
    if type(tok.pre_tokenizer).__name__ != "ByteLevel" or type(tok.model).__name__ != "BPE":
        return False
    alphabet = _byte_alphabet()
    vocab = tok.get_vocab(with_added_tokens=False)
    return all(vocab.get(alphabet[b]) == b for b in range(256))


def _read_hf_config(folder: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` with eos/bos tokens flattened to strings ({} when absent or unreadable)."""
    f = folder / CONFIG_FILE
    if not f.is_file():
        return {}
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict):
        raise UserError(f"{f} holds {type(cfg).__name__}, not an object of settings: fix or remove it")
    for key in ("eos_token", "bos_token"):
        v = cfg.get(key)
        cfg[key] = v.get("content") if isinstance(v, dict) else v  # older configs store AddedToken dicts
    return cfg


def _eos_from_ids(tok: _RustTokenizer, folder: Path) -> str | None:
    """The EOS token named by id in a model's ``config.json`` or ``generation_config.json``."""
    for name in ("generation_config.json", "config.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            i = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):  # unreadable, or not an object
            continue
        if isinstance(i, list) and i:
            i = i[0]
        if isinstance(i, int) and tok.id_to_token(i) is not None:
            return tok.id_to_token(i)
    return None


def _hf_token(value: Any, folder: Path) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object
    ``{"content": ...}``; anything else (``"eos_token": 5``) is a one-line error naming the file."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise UserError(f"{folder / 'tokenizer_config.json'}: a special token is {value!r}, not the token's text "
                    f'(write "eos_token": "<|endoftext|>"): fix the file')


def _first_in_vocab(tok: _RustTokenizer, candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if tok.token_to_id(c) is not None), None)


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a killed process never leaves half a file."""
    from multitoken.io.outdir import write_text  # the one implementation of atomic writes

    write_text(path, text)
