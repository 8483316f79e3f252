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


def code_corpus(tok: Tokenizer, tmp_path: Path, files: int) -> Path:
    """A prepared corpus (tmp_path/corpus) of `files` small Python files, in tok's ids."""
    from multitoken.data.prepare import prepare

    src = tmp_path / "src"
    src.mkdir()
    for i in range(files):
        (src / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(30)))
    tok.save(tmp_path / "tokdir")
    prepare(str(src), str(tmp_path / "tokdir"), tmp_path / "corpus", glob="*.py", val_fraction=0.3, progress=False)
    return tmp_path / "corpus"


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


def test_kept_folders_follow_the_new_documents_split_by_split(tmp_path: Path) -> None:
    """`keep`: earlier runs' tokens and masks come after the new documents, train to train and val to val,
    and their counts add up; a folder of another tokenizer, one without masks, or --out itself is refused."""
    from multitoken.data.prepare import prepare

    tok = chat_tokenizer()
    cfg = SelfGenConfig(chat=4, code=0, batch_size=2, multi_turn=0.0, val_every=2, temperatures=(0.0,))
    a = distill_data(FakeModel(), tok, tmp_path / "a", cfg, progress=False,
                     generate=Script(tok, [f"First run question {i}?" for i in range(9)]))
    b = distill_data(FakeModel(), tok, tmp_path / "b", cfg, progress=False,
                     generate=Script(tok, [f"Second run question {i}?" for i in range(9)]))
    c = distill_data(FakeModel(), tok, tmp_path / "c", cfg, progress=False, keep=[tmp_path / "a", tmp_path / "b"],
                     generate=Script(tok, [f"Third run question {i}?" for i in range(9)]))
    shard = lambda d, f: read_shard(tmp_path / d / f).astype(int).tolist()  # noqa: E731
    for split in ("train", "val"):
        for f in (f"{split}.bin", f"{split}.mask.bin"):
            own = shard("c", f)[: len(shard("a", f))]  # the new run's documents come first, as long as a's
            assert shard("c", f) == own + shard("a", f) + shard("b", f)
        assert tok.decode(shard("c", f"{split}.bin")).count("Third run") == tok.decode(shard("a", f"{split}.bin")).count("First run")
        for key in ("docs", "tokens", "written"):  # "Third" is as long as "First": the new documents count as a's
            assert c["splits"][split][key] == 2 * a["splits"][split][key] + b["splits"][split][key]
        assert c["splits"][split]["written"] == sum(shard("c", f"{split}.mask.bin"))
        assert c["splits"][split]["tokens"] == len(shard("c", f"{split}.bin"))
    assert [k["splits"]["train"]["tokens"] for k in c["self_generated"]["kept"]] == [a["splits"]["train"]["tokens"],
                                                                                     b["splits"]["train"]["tokens"]]
    # Merging alone (nothing new asked) writes exactly the kept folders, in order.
    merged = distill_data(FakeModel(), tok, tmp_path / "m", SelfGenConfig(chat=0, code=0), progress=False,
                          keep=[tmp_path / "b", tmp_path / "a"], generate=Script(tok, []))
    assert shard("m", "train.bin") == shard("b", "train.bin") + shard("a", "train.bin")
    assert merged["splits"]["val"]["written"] == a["splits"]["val"]["written"] + b["splits"]["val"]["written"]
    with pytest.raises(UserError, match="nothing to write"):
        distill_data(FakeModel(), tok, tmp_path / "n", SelfGenConfig(chat=0, code=0), progress=False, generate=Script(tok, []))
    with pytest.raises(UserError, match="--out folder itself"):
        distill_data(FakeModel(), tok, tmp_path / "a", cfg, progress=False, keep=[tmp_path / "a"], generate=Script(tok, []))
    with pytest.raises(UserError, match="another tokenizer"):
        distill_data(FakeModel(), Tokenizer.bytes(), tmp_path / "x", SelfGenConfig(chat=0, code=0), progress=False,
                     keep=[tmp_path / "a"], generate=Script(tok, []))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"m{i}.py").write_text(f"x = {i}\n" * 20)
    tok.save(tmp_path / "tokdir")
    prepare(str(src), str(tmp_path / "tokdir"), tmp_path / "corpus", glob="*.py", val_fraction=0.34, progress=False)
    with pytest.raises(UserError, match="no loss masks"):
        distill_data(FakeModel(), tok, tmp_path / "y", SelfGenConfig(chat=0, code=0), progress=False,
                     keep=[tmp_path / "corpus"], generate=Script(tok, []))


def test_continuous_writer_gives_each_request_what_decoding_it_alone_gives() -> None:
    """Jobs of two requests each (the second prompt built from the first answer) on 3 slots: every
    request joins as another leaves, and each gets the tokens plain greedy decoding of it alone gives."""
    from conftest import tiny_model

    from multitoken.decoding import generate
    from multitoken.training.selfgen import ContinuousWriter, Document

    model = tiny_model(vocab_size=48, eos_id=5).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(6, 48, (int(n),), generator=g).tolist() for n in torch.randint(3, 12, (7,), generator=g)]
    budgets = [4, 9, 2, 12, 6, 1, 8]

    def job(prompt, n):
        first = yield prompt, n, 0.0
        second = yield prompt + first + [7], n + 2, 0.0
        return [Document(first + second, [1] * (len(first) + len(second)), "code")]

    writer = ContinuousWriter(model, 3, eos_id=5, top_p=1.0, seed=0, max_new=16)
    docs = writer.run(job(p, n) for p, n in zip(prompts, budgets))
    expected = []
    for p, n in zip(prompts, budgets):
        first = generate(model, [p], n, eos_id=5)[0][0]
        second = generate(model, [p + first + [7]], n + 2, eos_id=5)[0][0]
        expected.append(first + second)
    assert sorted(d.ids for d in docs) == sorted(expected)
    assert writer.requests == 14 and writer.new_tokens == sum(map(len, expected))


def test_a_chat_job_asks_for_what_the_batched_writer_asks_for(tmp_path: Path) -> None:
    """A conversation job driven by hand: the user-turn prefix, then the chat prompt of the kept
    message, then (multi_turn 1) a second user turn after the answer and its answer; the documents
    and masks are the hand-rendered ones, and a dropped message ends the job with none."""
    import random
    from collections import Counter

    from multitoken.training.selfgen import chat_job, normalise, user_turn_prefix

    tok = chat_tokenizer()
    cfg = SelfGenConfig(chat=1, code=0, multi_turn=1.0)
    stats: Counter = Counter()
    job = chat_job(tok, cfg, 0.7, set(), set(), stats, 4096, random.Random(0))
    enc = lambda text: tok.encode(text) + [tok.eos_id]  # noqa: E731
    assert next(job) == (user_turn_prefix(tok), cfg.user_tokens, cfg.user_temperature)
    first = [{"role": "user", "content": "Why is the sky blue?"}]
    assert job.send(enc("Why is the sky blue?")) == (tok.chat(first), cfg.answer_tokens, 0.7)
    history = [*first, {"role": "assistant", "content": "Light scatters."}]
    assert job.send(enc("Light scatters.")) == (user_turn_prefix(tok, history), cfg.user_tokens, cfg.user_temperature)
    second = [*history, {"role": "user", "content": "And at sunset?"}]
    assert job.send(enc("And at sunset?")) == (tok.chat(second), cfg.answer_tokens, 0.7)
    with pytest.raises(StopIteration) as stop:
        job.send(tok.encode("Red, because"))  # cut: no EOS
    one, two = stop.value.value
    assert one.ids == tok.chat(first) + enc("Light scatters.") and one.mask == [0] * len(tok.chat(first)) + [1] * len(enc("Light scatters."))
    assert two.ids == tok.chat(second) + tok.encode("Red, because") + [tok.eos_id]
    assert two.mask == [0] * len(tok.chat(second)) + [1] * len(tok.encode("Red, because")) + [0]
    assert stats["second_turns"] == 1 and stats["answers_finished"] == 1 and stats["answers_cut"] == 1
    dropped = chat_job(tok, cfg, 0.0, {normalise("Why is the sky blue?")}, set(), stats, 4096, random.Random(0))
    next(dropped)
    with pytest.raises(StopIteration) as stop:
        dropped.send(enc("Why is the sky blue?"))  # an evaluation prompt
    assert stop.value.value == [] and stats["user_eval_prompt"] == 1


def test_continuous_code_documents_are_the_prefix_then_what_plain_decoding_writes(tmp_path: Path) -> None:
    """distill-data with continuous batching, code only, on a real (tiny) model: each document is its
    corpus prefix (mask 0) then what greedy decoding of that prefix alone writes (mask 1), ending in EOS."""
    from conftest import tiny_model

    from multitoken.decoding import generate

    tok = chat_tokenizer()
    code_corpus(tok, tmp_path, 6)
    model = tiny_model(vocab_size=tok.vocab_size, eos_id=tok.eos_id).eval()
    cfg = SelfGenConfig(chat=0, code=7, batch_size=3, code_prefix=(10, 30), code_tokens=6, val_every=4,
                        temperatures=(0.0,), continuous=True)
    meta = distill_data(model, tok, tmp_path / "d", cfg, corpus=tmp_path / "corpus", progress=False)
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 7
    corpus_text = tok.decode(read_shard(tmp_path / "corpus" / "train.bin").astype(int).tolist())
    for split in ("train", "val"):
        ids = read_shard(tmp_path / "d" / f"{split}.bin").astype(int).tolist()
        mask = read_shard(tmp_path / "d" / f"{split}.mask.bin").astype(int).tolist()
        while ids:
            n_prefix = mask.index(1) if 1 in mask else len(mask)
            prefix = ids[:n_prefix]
            assert tok.decode(prefix) in corpus_text and 10 <= len(prefix) <= 30
            written = generate(model, [prefix], 6, eos_id=tok.eos_id)[0][0]
            tail = [] if written and written[-1] == tok.eos_id else [tok.eos_id]
            n = len(prefix) + len(written) + len(tail)
            assert ids[:n] == prefix + written + tail and mask[:n] == [0] * len(prefix) + [1] * len(written) + [0] * len(tail)
            ids, mask = ids[n:], mask[n:]
    assert meta["self_generated"]["tokens_written"] == meta["splits"]["train"]["written"] + meta["splits"]["val"]["written"]


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



def test_continuous_jobs_are_exactly_the_asked_counts(tmp_path: Path) -> None:
    """--continuous with 4 conversations and 2 code pieces asked (jobs alternate while both remain):
    exactly 2 code documents are written and 4 user messages asked for, however the tiny model's
    conversations fare in the filters."""
    from conftest import tiny_model

    tok = chat_tokenizer()
    code_corpus(tok, tmp_path, 4)
    model = tiny_model(vocab_size=tok.vocab_size, eos_id=tok.eos_id, max_seq_len=256).eval()
    cfg = SelfGenConfig(chat=4, code=2, batch_size=2, code_prefix=(10, 30), code_tokens=6, user_tokens=8, answer_tokens=8,
                        multi_turn=0.0, val_every=2, temperatures=(0.0, 1.0), continuous=True)
    meta = distill_data(model, tok, tmp_path / "d", cfg, corpus=tmp_path / "corpus", progress=False)
    kinds = {k: sum(meta["splits"][s]["kinds"].get(k, 0) for s in ("train", "val")) for k in ("code", "chat")}
    assert kinds["code"] == 2 and kinds["chat"] <= 4
    assert meta["self_generated"]["filters"]["user_written"] == 4 and meta["self_generated"]["filters"]["code_written"] == 2


def test_one_document_is_refused_unless_a_kept_folder_gives_the_missing_split(tmp_path: Path) -> None:
    """One conversation alone cannot make a train and a validation split: refused in one line; with
    --keep of a folder that has both splits, the same run is accepted."""
    tok = chat_tokenizer()
    one = SelfGenConfig(chat=1, code=0, multi_turn=0.0, temperatures=(0.0,))
    with pytest.raises(UserError, match="too few for a train and a validation split"):
        distill_data(FakeModel(), tok, tmp_path / "one", one, progress=False, generate=Script(tok, ["A lone question?"]))
    distill_data(FakeModel(), tok, tmp_path / "a", SelfGenConfig(chat=4, code=0, multi_turn=0.0, val_every=2, temperatures=(0.0,)),
                 progress=False, generate=Script(tok, [f"Question {i}?" for i in range(4)]))
    meta = distill_data(FakeModel(), tok, tmp_path / "b", one, progress=False, keep=[tmp_path / "a"],
                        generate=Script(tok, ["A lone question?"]))
    assert meta["splits"]["train"]["docs"] == 3 and meta["splits"]["val"]["docs"] == 2
