"""The Python front door: ``multitoken.load(name).generate("text")``, as transformers' pipelines
and vLLM's ``LLM`` are used.

`load` takes what ``--run`` takes (a run directory, a Hugging Face folder, a Hub id; io/models.py)
and optionally heads: a heads file (`save_heads`, trained on that backbone) or a spec such as
``"medusa:3"`` for fresh heads. `Pipeline.generate` takes a string, a list of strings, chat
messages (``[{"role": "user", "content": ...}]``) or a list of conversations; it tokenizes with the
model's tokenizer or a Hugging Face one, stops at every EOS id of the config, and returns the text
with the decoding statistics. Decoding itself is ``multitoken.decoding.generate``.

The default mode is the CLI's: self-speculative (``spec``) when the model has heads, else plain.
Its output equals plain greedy decoding (or plain sampling's distribution) either way.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multitoken.errors import UserError

MODES = ("ntp", "spec", "tree")


@dataclass
class Completion:
    """One prompt's continuation."""

    text: str
    """The generated text (EOS and stop strings removed; special tokens skipped)."""
    token_ids: list[int]
    """The generated ids, EOS included when decoding stopped on one."""
    stats: Any
    """The call's `GenerationStats` (shared by every prompt of a batch): tau, acceptance, speed."""


class Pipeline:
    """A model with its tokenizer, ready to generate text.

    Args:
        model: a `multitoken.model.Transformer` in eval mode.
        tokenizer: our `Tokenizer` or a Hugging Face tokenizer (``PreTrainedTokenizerBase``).
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        from multitoken.model import Transformer

        if not isinstance(model, Transformer):
            raise UserError(f"Pipeline needs a multitoken Transformer, not {_kind(model)}: multitoken.load(...) "
                            "or from_transformers(...) make one with its tokenizer")
        if not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "decode"):
            raise UserError(f"tokenizer {type(tokenizer).__name__} has no encode/decode: give a multitoken or Hugging Face tokenizer")
        self.model, self.tokenizer = model, tokenizer
        self.hf_tokenizer = not hasattr(tokenizer, "stream_decoder")  # ours has one, transformers' have not

    @property
    def default_mode(self) -> str:
        """'spec' when the model has heads, else 'ntp' (as `multitoken generate`)."""
        return "spec" if self.model.depth else "ntp"

    # ---- prompts -------------------------------------------------------------------------
    def encode(self, prompt: Any) -> list[int]:
        """Token ids of one prompt: a string, or chat messages rendered through the chat template."""
        if isinstance(prompt, str):
            if not prompt:
                raise UserError("empty prompt: give at least one character of prompt text")
            ids = list(self.tokenizer.encode(prompt))
        elif _is_messages(prompt):
            ids = self._chat_ids(list(prompt))
        else:
            raise UserError(f"a prompt is a string or chat messages ([{{'role': 'user', 'content': '...'}}]), not {_kind(prompt)}")
        if not ids:
            raise UserError("the prompt encodes to no tokens: give some prompt text")
        return ids

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.hf_tokenizer:
            return self.tokenizer.chat(messages)
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError("this tokenizer has no chat template: give plain text, or a tokenizer with a chat_template")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out  # transformers 5 returns a BatchEncoding
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, without the EOS ids and special tokens."""
        stop = set(self.model.config.stop_ids)
        kept = [t for t in ids if t not in stop]
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    # ---- generation ----------------------------------------------------------------------
    def stream(self, prompt: Any, stop: Sequence[str] = (), **kwargs: Any) -> Any:
        """A `TextStream` over one prompt (a string or chat messages): iterate it for text pieces,
        then read ``.text`` and ``.stats``. Stops on every EOS id of the config by default.

        Args:
            prompt: a string or chat messages.
            stop: strings that end the text.
            kwargs: as for `generate` (mode, max_new_tokens, temperature, ...).
        """
        from multitoken.decoding import TextStream

        ids = self.encode(prompt)
        kwargs.setdefault("mode", self.default_mode)
        kwargs.setdefault("eos_id", self.model.config.stop_ids)
        return TextStream(self.model, _Encoded(self, ids), "<prompt>", stop=list(stop), **kwargs)

    def generate(self, prompts: Any, max_new_tokens: int = 128, mode: str | None = None, draft: int | None = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] = (), eos_ids: Sequence[int] | None = None, **kwargs: Any) -> Completion | list[Completion]:
        """Continue one prompt or a batch of prompts.

        Args:
            prompts: a string, chat messages, or a list of either (decoded as one batch).
            max_new_tokens: most new tokens per prompt.
            mode: 'ntp', 'spec' or 'tree' (default: `default_mode`).
            draft, temperature, top_k, top_p, seed: as for `multitoken.decoding.generate`.
            stop: strings that end a completion (the text is cut before them).
            eos_ids: ids that end a completion (default: every EOS id of the model's config).
            kwargs: passed on to `multitoken.decoding.generate` (tree, compile, graphs, ...).
        Returns:
            A `Completion` for a single prompt, a list of them for a list.
        """
        from multitoken.decoding import generate

        single = isinstance(prompts, str) or _is_messages(prompts)
        if not single and not (isinstance(prompts, (list, tuple)) and prompts):
            raise UserError(f"prompts must be a string, chat messages or a non-empty list of them, not {_kind(prompts)}")
        batch = [prompts] if single else list(prompts)
        ids = [self.encode(p) for p in batch]
        mode = self.default_mode if mode is None else mode
        if mode not in MODES:
            raise UserError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise UserError(f"stop={stop!r}: give a list of non-empty strings")
        eos = list(self.model.config.stop_ids if eos_ids is None else eos_ids)
        if not all(isinstance(i, int) and 0 <= i < self.model.config.vocab_size for i in eos):
            raise UserError(f"eos_ids={eos_ids!r}: give token ids inside the vocabulary (size {self.model.config.vocab_size})")
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{name}={value!r}: must be a number")
        for name, value in (("max_new_tokens", max_new_tokens), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{name}={value!r}: must be an integer")
        out, stats = generate(self.model, ids, max_new_tokens, mode=mode, draft=draft, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, eos_id=eos or None, **kwargs)
        done = [Completion(_cut(self.decode(row), stop), row, stats) for row in out]
        return done[0] if single else done


def load(name: str | Path, heads: str | Path | None = None, device: str = "cpu", dtype: Any = None,
         tokenizer: Any = None, max_seq_len: int | None = None) -> Pipeline:
    """A `Pipeline` for a run directory, a Hugging Face folder or a Hub id.

    Args:
        name: see io/models.py (a Hub id is read from huggingface_hub's cache, downloaded once online).
        heads: a heads file written by `save_heads` (refused unless trained on this backbone), or a
            spec such as ``"medusa:3"`` for fresh heads initialised from the backbone.
        device: 'cpu', 'cuda', 'cuda:N' or 'auto'.
        dtype: a torch dtype or its name ('auto', 'bfloat16', 'float16', 'float32'); default as stored.
        tokenizer: a Hugging Face tokenizer to use instead of the model's own.
        max_seq_len: a shorter context (sizes the KV cache).
    Returns:
        The pipeline.
    """
    import torch

    from multitoken.io.models import load_model

    if not isinstance(name, (str, Path)) or not str(name).strip():
        raise UserError(f"load() takes a run directory, a Hugging Face folder or a Hub id, not {_kind(name)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = _dtype(dtype)
    spec, heads_file = _heads(heads)
    model, tok, _ = load_model(name, device=device, dtype=dt, heads=spec, max_seq_len=max_seq_len)
    return Pipeline(_attach(model, heads_file, str(name), dt), tokenizer if tokenizer is not None else tok)


def from_transformers(hf_model: Any, tokenizer: Any = None, heads: str | Path | None = None) -> Pipeline:
    """A `Pipeline` over a transformers model already in memory, without converting it to a folder.

    Args:
        hf_model: a transformers ``*ForCausalLM`` of a supported family (Llama, Qwen2/3, Mistral, Gemma-3).
        tokenizer: its Hugging Face tokenizer (needed for text prompts).
        heads: a heads file trained on this backbone, or a spec for fresh heads (as `load`).
    """
    from multitoken.io.hf import from_transformers as convert

    spec, heads_file = _heads(heads)
    model = convert(hf_model, spec)
    return Pipeline(_attach(model, heads_file, type(hf_model).__name__, None), tokenizer if tokenizer is not None else _NoTokenizer())


def hf_generate(model: Any, input_ids: Any = None, heads: str | Path | None = None, max_new_tokens: int = 20,
                mode: str | None = None, eos_token_id: int | list[int] | None = None, **kwargs: Any) -> Any:
    """``model.generate(input_ids, ...)`` for a transformers model, decoded by our engine with our heads.

    Returns what transformers' ``generate`` returns by default: a (B, T + new) LongTensor of the
    prompt followed by the new tokens (rows that stop early are padded with the first EOS id).
    Usable as ``hf_generate(model, ids, heads="heads.safetensors")`` or as transformers' own
    custom_generate entry (``model.generate(ids, custom_generate=CUSTOM_GENERATE_DIR,
    trust_remote_code=True, heads=...)``), which calls it with the same arguments.

    Args:
        model: the transformers model.
        input_ids: (B, T) prompt ids (every row full length, as transformers takes them).
        heads, mode: as for `Pipeline.generate` (default mode: spec with heads).
        max_new_tokens: most new tokens per row.
        eos_token_id: ids that stop a row (default: the model config's).
        kwargs: temperature, top_k, top_p, seed, draft; transformers' own generate arguments are ignored.
    """
    import torch

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise UserError(f"hf_generate needs a transformers model (a *ForCausalLM), not {_kind(model)}")
    per_model = _ADAPTED.setdefault(model, {})
    pipe = per_model.get(str(heads))
    if pipe is None:
        pipe = per_model[str(heads)] = from_transformers(model, heads=heads)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise UserError(f"input_ids must be a (batch, length) LongTensor, not {_kind(input_ids)}")
    ours = {k: kwargs[k] for k in ("temperature", "top_k", "top_p", "seed", "draft") if kwargs.get(k) is not None}
    eos = pipe.model.config.stop_ids if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    from multitoken.decoding import generate

    out, _ = generate(pipe.model, input_ids.tolist(), max_new_tokens, mode=mode or pipe.default_mode, eos_id=eos or None, **ours)
    width, fill = max(len(r) for r in out), (eos[0] if eos else 0)
    pad = [r + [fill] * (width - len(r)) for r in out]
    return torch.cat([input_ids, torch.tensor(pad, dtype=torch.long, device=input_ids.device)], dim=1)


_ADAPTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Converted transformers models, then by heads: a second call reuses the first conversion (and the
entry goes with the transformers model)."""
CUSTOM_GENERATE_DIR = str(Path(__file__).parent / "hf_custom")
"""The folder to pass as transformers' ``custom_generate`` (it holds custom_generate/generate.py)."""


class _Encoded:
    """The pipeline's tokenizer as `TextStream` needs it: the prompt already encoded (a chat
    template's ids), decoding without EOS ids and special tokens."""

    def __init__(self, pipe: Pipeline, ids: list[int]) -> None:
        self.pipe, self.ids = pipe, ids
        self.eos_id = pipe.model.config.eos_id

    def encode(self, text: str, special: bool = False) -> list[int]:
        return self.ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.pipe.decode(list(ids))


class _NoTokenizer:
    """Stands in when `from_transformers` gets no tokenizer: token-id use only."""

    def encode(self, text: str) -> list[int]:
        raise UserError("this pipeline has no tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...) to from_transformers")

    decode = encode


def _dtype(dtype: Any) -> Any:
    from multitoken.checks import parse_dtype

    if dtype is None:
        return None
    if isinstance(dtype, str):
        dt = parse_dtype(dtype)
        return None if dt == "auto" else dt
    import torch

    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UserError(f"dtype={dtype!r}: give auto, bfloat16, float16 or float32")
    return dtype


def _heads(heads: Any) -> tuple[Any, Path | None]:
    """(fresh heads spec, heads file) from `heads`: a file that exists, else a spec such as medusa:3."""
    from multitoken.config import HeadsConfig

    if heads is None:
        return None, None
    if not isinstance(heads, (str, Path)) or not str(heads):
        raise UserError(f"heads={heads!r}: give a heads file or a spec such as medusa:3")
    if Path(heads).is_file():
        return None, Path(heads)
    if str(heads).endswith(".safetensors"):
        raise UserError(f"heads file {heads} does not exist: give the path of a file written by save_heads")
    return HeadsConfig.parse(str(heads)), None


def _attach(model: Any, heads_file: Path | None, where: str, dtype: Any) -> Any:
    if heads_file is None:
        return model
    from multitoken.io.heads_file import attach_heads_to

    model = attach_heads_to(model, heads_file, where).eval()
    return model.to(dtype) if dtype is not None else model


def _is_messages(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _kind(x: Any) -> str:
    return f"{type(x).__name__} {str(x)[:40]!r}"


def _cut(text: str, stop: Sequence[str]) -> str:
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text
