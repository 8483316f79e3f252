"""`distill-data`: Magpie conversations and code continuations written by the model, with a loss mask.

A scripted `generate` stands in for the model (what it writes is known), so the tests check what
the job does with it against hand-worked expectations: the pre-query template, the documents and
masks written, the filters, the split, the loader's (tokens, mask) pairs and the masked targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken

from multitoken.data.loader import TokenLoader
from multitoken.data.shards import read_shard
from multitoken.data.tokenizer import Tokenizer
from multitoken.errors import UserError
from multitoken.training.loss import IGNORE_INDEX, MTPLoss, shift_targets
from multitoken.training.selfgen import SelfGenConfig, distill_data, distinct_n, user_turn_prefix

CHATML = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe kind.<|im_end|>\\n' }}{% endif %}"
          "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chat_tokenizer() -> Tokenizer:
    tok = Tokenizer.bytes()
    tok._tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    return Tokenizer(tok._tok, "<|im_end|>", "pretrained", chat_template=CHATML)


class FakeModel:
    class config:
        max_seq_len = 4096


class ShortModel:
    class config:
        max_seq_len = 64


class Script:
    """A `generate` that writes known text: user messages from `users` in turn (after a user-turn
    prefix), "Answer to <message>" after an assistant prompt, and "pass" after a code prefix."""

    def __init__(self, tok: Tokenizer, users: list[str]) -> None:
        self.tok, self.users, self.calls = tok, list(users), []
        self.user_prefix = tok.encode("<|im_start|>user\n", special=True)
        self.assistant = tok.encode("<|im_start|>assistant\n", special=True)

    def __call__(self, model, prompts, max_new, **kw):
        self.calls.append((len(prompts), max_new, kw["temperature"]))
        out = []
        for p in prompts:
            if p[-len(self.user_prefix):] == self.user_prefix:
                text = self.users.pop(0) if self.users else "x"
                out.append(self.tok.encode(text) + [self.tok.eos_id])
            elif p[-len(self.assistant):] == self.assistant:
                said = self.tok.decode(p).split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
                out.append(self.tok.encode(f"Answer to {said}") + [self.tok.eos_id])
            else:
                out.append(self.tok.encode(" pass")[:max_new])
        return out, None


def test_user_turn_prefix_is_the_template_up_to_the_user_message() -> None:
    tok = chat_tokenizer()
    assert tok.decode(user_turn_prefix(tok)) == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n"
    hist = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.decode(user_turn_prefix(tok, hist)).endswith("<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\n")


def test_distill_data_writes_conversations_with_a_mask_on_what_the_model_did_not_write(tmp_path: Path) -> None:
    tok = chat_tokenizer()
    users = ["How do tides work?", "How do tides work?",  # a duplicate: dropped
             "What is 2 + 2?",  # an evaluation prompt: dropped
             "la la la la la la la la la la la la la",  # rambling: dropped
             "Name a colour please.", "Why is ice slippery?"] + [f"Question number {i} here?" for i in range(40)]
    script = Script(tok, users)
    cfg = SelfGenConfig(chat=6, code=0, batch_size=4, multi_turn=0.0, val_every=3, temperatures=(0.0,))
    meta = distill_data(FakeModel(), tok, tmp_path / "d", cfg, exclude=["what is 2+2?"], progress=False, generate=script)
    f = meta["self_generated"]["filters"]
    assert f["user_duplicate"] == 1 and f["user_eval_prompt"] == 1 and f["user_rejected"] == 1
    assert all(n == 4 for n, _, _ in script.calls)  # every batch is padded to batch_size: one engine
    d = tmp_path / "d"
    ids = {s: read_shard(d / f"{s}.bin").astype(int).tolist() for s in ("train", "val")}
    mask = {s: read_shard(d / f"{s}.mask.bin").astype(int).tolist() for s in ("train", "val")}
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 6 and meta["splits"]["val"]["docs"] == 2
    # Each document: the rendered prompt (mask 0), then the answer and its EOS (mask 1).
    first = tok.chat([{"role": "user", "content": "How do tides work?"}])
    answer = tok.encode("Answer to How do tides work?") + [tok.eos_id]
    assert ids["train"][: len(first) + len(answer)] == first + answer
    assert mask["train"][: len(first) + len(answer)] == [0] * len(first) + [1] * len(answer)
    assert sum(mask["train"]) + sum(mask["val"]) == meta["splits"]["train"]["written"] + meta["splits"]["val"]["written"]
    samples = [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["messages"][-1] == {"role": "assistant", "content": "Answer to How do tides work?"}
    # The loader hands the mask beside the tokens, aligned, and the loss ignores masked targets.
    loader = TokenLoader(d, "train", batch_size=2, seq_len=16)
    window, m = next(loader)
    assert window.shape == m.shape == (2, 17) and m.dtype == torch.bool
    flat = np.asarray(ids["train"])
    starts = [int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(flat, 17) == row.numpy()).all(1))[0]) for row in window]
    for row, s in zip(m, starts):
        assert row.tolist() == [bool(x) for x in mask["train"][s: s + 17]]


def test_a_cut_answer_ends_in_an_eos_the_model_is_not_trained_to_write() -> None:
    """An answer that ran out of tokens gets an EOS so the document ends, but the model did not write
    it: mask 0 there (training on it would teach stopping mid-sentence); a finished answer's EOS is its own (1)."""
    from collections import Counter

    from multitoken.training.selfgen import answer

    tok = chat_tokenizer()
    cut, done = tok.encode("It is because"), tok.encode("Yes.") + [tok.eos_id]
    convs = [[{"role": "user", "content": "Why?"}], [{"role": "user", "content": "Ok?"}]]
    docs = answer(tok, lambda prompts, n, t: [cut, done], SelfGenConfig(answer_tokens=len(cut)), convs, 0.0,
                  Counter(), 4096)
    for d, m, ids, last in zip(docs, convs, (cut, done), (0, 1)):
        p = tok.chat(m)
        assert d.ids == p + ids[: len(ids) - last] + [tok.eos_id]
        assert d.mask == [0] * len(p) + [1] * (len(ids) - last) + [last]


def test_a_masked_target_is_ignored_at_every_depth() -> None:
    """Hand-written: tokens 1..7, EOS = 0 at index 4, mask False on indices 1, 2 and 5."""
    window = torch.tensor([[1, 2, 3, 4, 0, 5, 6, 7]])
    mask = torch.tensor([[1, 0, 0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    I = IGNORE_INDEX
    assert shift_targets(window, 0, 0, mask).tolist() == [[I, I, 4, 0, I, 6, 7]]
    assert shift_targets(window, 1, 0, mask).tolist() == [[I, 4, 0, I, I, 7, I]]  # from the EOS at 4: crosses into doc 2
    assert shift_targets(window, 2, 0, mask).tolist() == [[4, 0, I, I, I, I, I]]
    # The loss counts only the unmasked targets at each depth.
    torch.manual_seed(0)
    from conftest import tiny_model

    model = tiny_model("parallel", 2, vocab_size=8, eos_id=0)
    out = MTPLoss(2, weights=[1, 1, 1], eos_id=0)(model, model(window[:, :-1]), window, loss_mask=mask)
    assert out.per_depth_count.tolist() == [4, 3, 2]


def test_code_continuations_are_cut_from_the_corpus_and_mask_the_prefix(tmp_path: Path) -> None:
    from multitoken.data.prepare import prepare

    tok = chat_tokenizer()
    corpus = tmp_path / "corpus"
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(30)))
    tok.save(tmp_path / "tokdir")
    prepare(str(src), str(tmp_path / "tokdir"), corpus, glob="*.py", val_fraction=0.3, progress=False)
    script = Script(tok, [])
    cfg = SelfGenConfig(chat=0, code=8, batch_size=4, code_prefix=(20, 40), code_tokens=5, corpus_tokens=200,
                        val_every=5, temperatures=(0.0, 1.0))
    # A model of 64 positions: room for the code asked (40 + 5), not for chat's default answers (384):
    # a code-only job runs, a chat job is refused in one line.
    meta = distill_data(ShortModel(), tok, tmp_path / "d", cfg, corpus=corpus, progress=False, generate=script)
    with pytest.raises(UserError, match="too short"):
        distill_data(ShortModel(), tok, tmp_path / "c", SelfGenConfig(chat=1, code=0), progress=False, generate=script)
    assert [t for _, _, t in script.calls] == [0.0, 1.0]
    ids = read_shard(tmp_path / "d" / "train.bin").astype(int).tolist()
    mask = read_shard(tmp_path / "d" / "train.mask.bin").astype(int).tolist()
    corpus_text = tok.decode(read_shard(corpus / "train.bin").astype(int).tolist())
    docs, cur = [], []
    for t, k in zip(ids, mask):
        cur.append((t, k))
        if t == tok.eos_id:
            docs.append(cur)
            cur = []
    code = [d for d in docs if d[0][1] == 0]
    assert code and all(20 <= sum(1 for _, k in d if k == 0) - 1 <= 40 for d in code)  # prefix + the EOS we added
    for d in code:
        prefix = tok.decode([t for t, k in d if k == 0][:-1])
        assert prefix in corpus_text  # cut from the corpus
        assert tok.decode([t for t, k in d if k == 1]) == " pass"  # what the model wrote, mask 1
    copied = [d for d in docs if all(k == 1 for _, k in d)]
    assert copied and meta["splits"]["train"]["kinds"]["corpus"] == len(copied)
    # Another tokenizer's corpus is refused in one line.
    with pytest.raises(UserError, match="another tokenizer"):
        distill_data(FakeModel(), Tokenizer.bytes(), tmp_path / "e", cfg, corpus=corpus, progress=False, generate=script)


def test_distinct_n_by_hand() -> None:
    assert distinct_n([[1, 2, 1, 2]], 2) == 2 / 3  # (1,2) (2,1) (1,2)
    assert distinct_n([[1, 2], [1, 2]], 1) == 2 / 4


def test_heads_train_on_masked_data_and_warm_start_from_a_heads_file(tmp_path: Path) -> None:
    """The trainer reads (tokens, mask) batches; `init_heads` starts the heads from a file's weights
    (checked tensor by tensor after the backbone loads), and a file for other heads is a one-line error."""
    from conftest import tiny_model

    from multitoken.config import TrainConfig
    from multitoken.io.checkpoint import save_run
    from multitoken.io.heads_file import load_heads_into, save_heads
    from multitoken.model import Transformer
    from multitoken.training.trainer import load_backbone, train

    tok = chat_tokenizer()
    users = [f"Tell me fact number {i} about rivers?" for i in range(40)]
    cfg = SelfGenConfig(chat=12, code=0, batch_size=4, multi_turn=0.0, val_every=4, temperatures=(0.0,))
    distill_data(FakeModel(), tok, tmp_path / "d", cfg, progress=False, generate=Script(tok, users))
    base = tiny_model("none", 0, vocab_size=tok.vocab_size, eos_id=tok.eos_id, max_seq_len=64)
    save_run(tmp_path / "base", base, tok)
    donor = tiny_model("sequential", 2, seed=3, vocab_size=tok.vocab_size, eos_id=tok.eos_id, max_seq_len=64)
    donor.load_state_dict(base.state_dict(), strict=False)
    heads = save_heads(donor, tmp_path / "h.safetensors")
    common = dict(heads="sequential:2", init=str(tmp_path / "base"), init_heads=str(heads), freeze_backbone=True,
                  distill=True, batch_size=2, seq_len=32, eval_every=0, save_every=0, log_every=1, eval_batches=1, device="cpu")
    start = Transformer(donor.config)
    load_backbone(start, tmp_path / "base")
    load_heads_into(start, heads)
    for k, v in donor.mtp.state_dict().items():
        assert torch.equal(start.mtp.state_dict()[k], v.to(torch.bfloat16).float()), k
    out = train(TrainConfig(steps=3, **common), tmp_path / "d", tmp_path / "r1", progress=False)
    assert out["step"] == 3
    with pytest.raises(UserError, match="holds sequential:2 heads"):
        train(TrainConfig(steps=1, **{**common, "heads": "sequential:3"}), tmp_path / "d", tmp_path / "r2", progress=False)


def test_a_second_turn_equal_to_an_evaluation_prompt_is_dropped_too(tmp_path: Path) -> None:
    """Follow-up questions pass the same filter as first turns: "What is 2 + 2?" (an evaluation
    prompt) asked as a second turn is not kept; "Tell me more please." is."""
    tok = chat_tokenizer()
    users = ["How do tides work?", "Why is ice slippery?", "What is 2 + 2?", "Tell me more please."]
    cfg = SelfGenConfig(chat=2, code=0, batch_size=2, multi_turn=1.0, val_every=3, temperatures=(0.0,))
    meta = distill_data(FakeModel(), tok, tmp_path / "d", cfg, exclude=["what is 2+2?"], progress=False,
                        generate=Script(tok, users))
    assert meta["self_generated"]["filters"]["second_turns"] == 1
    text = "".join(tok.decode(read_shard(tmp_path / "d" / f"{s}.bin").astype(int).tolist()) for s in ("train", "val"))
    assert "Tell me more please." in text and "2 + 2" not in text


def test_every_generation_call_gets_its_own_seed() -> None:
    """Seeds seed, seed+1, ... call by call (identical Magpie prompts must not sample the same
    messages every round)."""
    from multitoken.training.selfgen import BatchedWriter

    seeds = []

    def fake(model, prompts, max_new, **kw):
        seeds.append(kw["seed"])
        return [[1]] * len(prompts), None

    w = BatchedWriter(None, 2, eos_id=0, top_p=0.9, seed=7, generate=fake)
    w([[1], [2], [3]], 4, 1.0)
    w([[1]], 4, 1.0)
    assert seeds == [7, 8, 9]

