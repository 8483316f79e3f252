"""The generation object: rows with their own sampling settings, joining and leaving between steps.

References are each row decoded alone through `generate` (greedy: plain decoding; seeded
sampling: the same seed alone draws the same uniforms, so the same tokens), and, for the
distribution, the exact joint enumerated from full forward passes (test_exactness's helpers).
"""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES
from multitoken.decoding.api import Engine, Settings, generate
from multitoken.decoding.sampling import Sampling
from test_exactness import ALPHA, M, PROMPT, chi2_pvalue, exact_joint, random_model

SETTINGS = [Sampling(), Sampling(0.8), Sampling(), Sampling(1.1, top_k=3), Sampling(0.9, top_p=0.7)]


def alone(model, prompt, n, s: Sampling, seed, mode="spec"):
    return generate(model, [prompt], n, mode=mode, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                    seed=seed)[0][0]


@pytest.mark.parametrize("kind", FAMILIES)
def test_rows_with_different_settings_in_one_batch_equal_each_row_alone(kind):
    model = random_model(kind, 2, 3)
    prompts = [[3, 5, 2], [1, 1], [7, 0, 4, 4], [2], [6, 3]]
    gen = Engine(model, len(prompts)).start([], Settings(12, mode="spec"))
    for i, (p, s) in enumerate(zip(prompts, SETTINGS)):
        gen.add(p, sampling=s, seed=100 + i)
    out, stats = gen.result()
    for i, (p, s) in enumerate(zip(prompts, SETTINGS)):
        assert out[i] == alone(model, p, 12, s, 100 + i), (kind, i)
        if s.greedy:
            assert out[i] == alone(model, p, 12, s, None, mode="ntp")
    assert 0 < stats.acceptance_per_position[0] < 1


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_rows_join_and_leave_between_steps(kind):
    """Two slots, six requests of different budgets: finished rows free their slot, queued ones take it
    (prefilled apart and copied in), one is cancelled midway; every other row equals itself alone."""
    model = random_model(kind, 2, 4)
    gen = Engine(model, 2).start([], Settings(10, mode="spec", stream=True))
    reqs = [([3, 5, 2], SETTINGS[0], 4), ([1, 1], SETTINGS[1], 9), ([7, 0, 4, 4], SETTINGS[3], 6),
            ([2], SETTINGS[2], 10), ([6, 3], SETTINGS[4], 3), ([5, 5, 5], SETTINGS[0], 8)]
    ids = [gen.add(*reqs[0][:2], seed=7, max_new_tokens=reqs[0][2])]  # greedy alone first: then sampled rows join
    gen.step()
    gen.step()
    victim = gen.add([4, 4], sampling=SETTINGS[1], seed=3, max_new_tokens=20)
    ids += [gen.add(p, sampling=s, seed=7 + i, max_new_tokens=n) for i, (p, s, n) in enumerate(reqs[1:], start=1)]
    streamed: dict[int, list[int]] = {}
    cancelled = False
    while not gen.done:
        gen.step()
        for rid, toks in gen.new_tokens().items():
            streamed.setdefault(rid, []).extend(toks)
        if not cancelled and streamed.get(victim):
            gen.cancel(victim)
            cancelled = True
    assert cancelled and gen.requests[victim].finish_reason == "cancelled"
    for i, (rid, (p, s, n)) in enumerate(zip(ids, reqs)):
        assert gen.requests[rid].tokens == streamed[rid] == alone(model, p, n, s, 7 + i), i


def test_mixed_settings_keep_each_rows_exact_distribution():
    """Half the rows at temperature 0.7, half at 1.0 with top-k 5 and top-p 0.8, interleaved in one
    batch: each half has its own exact joint (a step reading one row's settings for all fails)."""
    model = random_model("parallel", 2, 1)
    a, b = Sampling(0.7), Sampling(1.0, top_k=5, top_p=0.8)
    rows = 4000
    gen = Engine(model, rows).start([], Settings(M, mode="spec", draft=2, seed=11))
    for i in range(rows):
        gen.add(PROMPT, sampling=a if i % 2 == 0 else b)
    out, _ = gen.result()
    for s, half in ((a, out[0::2]), (b, out[1::2])):
        p = chi2_pvalue(half, exact_joint(model, PROMPT, M, s.temperature, s.top_k, s.top_p))
        assert p > ALPHA, (s, p)


def test_engine_misuse_is_a_user_error():
    from multitoken.errors import UserError

    model = random_model("parallel", 2, 0)
    e = Engine(model, 1)
    g1 = e.start([[1, 2]], Settings(4))
    e.start([[1]], Settings(4))
    with pytest.raises(UserError, match="another generation"):
        g1.step()
    g = e.start([], Settings(4))
    with pytest.raises(UserError, match="vocabulary"):
        g.add([1, 99])
    with pytest.raises(UserError, match="does not fit"):
        g.add([1] * 40)
    assert torch.is_grad_enabled()


# ---- threads -------------------------------------------------------------------------------------------
def _race(fn, n: int = 2) -> list:
    """Run fn in n threads released together; their results (an exception fails the test)."""
    import threading

    start, out, errors = threading.Barrier(n), [None] * n, []

    def run(i):
        start.wait()
        try:
            out[i] = fn()
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return out


def test_threads_that_ask_for_engines_at_once_share_one(monkeypatch):
    """Two threads make the model's engine cache and an engine of one batch size at the same moment
    (construction slowed so that both are inside it together): one cache and one engine, not one per
    thread with the loser's dropped (a plain dict check-then-set does that)."""
    import time

    from multitoken.decoding import api

    model = random_model("medusa", 2, 0)
    slow_engines, slow_engine = api.Engines.__init__, api.Engine.__init__

    def engines_init(self):
        time.sleep(0.05)
        slow_engines(self)

    def engine_init(self, *a, **k):
        time.sleep(0.05)
        slow_engine(self, *a, **k)

    monkeypatch.setattr(api.Engines, "__init__", engines_init)
    monkeypatch.setattr(api.Engine, "__init__", engine_init)
    caches = _race(lambda: api.engines(model))
    assert caches[0] is caches[1] is api.engines(model)
    got = _race(lambda: api.engine_for(model, 3))
    assert got[0] is got[1] is api.engine_for(model, 3)


def test_threads_calling_generate_on_one_model_take_turns(monkeypatch):
    """Two threads decode with the same batch size (so the same engine) at once, steps interleaved by a
    sleep: each gets the output it gets alone (without the engine lock one ends the other's generation)."""
    import time

    from multitoken.decoding import api

    model = random_model("medusa", 2, 1)
    prompts = [[3, 5, 2], [7, 0]]
    refs = [generate(model, [p], 16, mode="spec")[0][0] for p in prompts]
    step = api.Generation.step

    def slow_step(self):
        time.sleep(0.002)
        step(self)

    monkeypatch.setattr(api.Generation, "step", slow_step)
    turn = iter(range(2))
    outs = _race(lambda: generate(model, [prompts[next(turn)]], 16, mode="spec")[0][0])
    assert sorted(outs) == sorted(refs)


def test_auto_draft_length_drafts_again_once_no_row_decodes(monkeypatch):
    """A long-lived generation (a server's) with the draft length left to the loop: costs that make
    drafting never pay send it to plain steps, where it stays mid-flight until a probe is due (64 plain
    steps, more than these rows run); once every row has finished,
    the next request is prefilled with the full draft again (fresh drafts, fresh module caches) instead
    of decoding plain for the rest of the generation's life. Outputs stay plain greedy's; each row
    counts its steps with drafts and its drafted tokens as they ran."""
    model = random_model("sequential", 3, 2)
    prompts = [[3, 5, 2], [7, 0, 4, 4]]
    refs = [generate(model, [p], 40)[0][0] for p in prompts]
    eng = Engine(model, 2)
    eng.runner.measures_costs = True  # as on CUDA graphs; the costs below replace the measurements
    monkeypatch.setattr(eng.runner, "cost", lambda strategy, need: 1.0 if strategy.k == 0 else 50.0)
    gen = eng.start([], Settings(40, mode="spec", stream=True))
    assert gen.auto
    rows = []
    for p in prompts:
        rid = gen.add(p)
        while not gen.done:
            gen.step()
        rows.append(gen.requests[rid])
    assert [r.tokens for r in rows] == refs
    assert gen.chosen == [3, 0, 3, 0], gen.chosen
    for r in rows:
        assert 8 <= r.draft_steps < r.row_steps and r.drafted == 3 * r.draft_steps, (r.draft_steps, r.row_steps)


def test_cancelling_a_finished_request_leaves_the_row_in_its_old_slot_alone():
    """One slot: A finishes, B takes the slot; cancelling A then (a client that leaves late) changes
    nothing: A stays "length", B decodes on to the same tokens as alone."""
    model = random_model("parallel", 2, 4)
    gen = Engine(model, 1).start([], Settings(10, mode="spec", stream=True))
    a = gen.add([3, 5, 2], max_new_tokens=2)
    while not gen.done:
        gen.step()
    b = gen.add([1, 1], max_new_tokens=9)
    gen.step()  # B is prefilled into A's old slot
    assert gen.requests[b].slot == gen.requests[a].slot == 0 and not gen.requests[b].done
    gen.cancel(a)
    assert gen.requests[a].finish_reason == "length" and gen.requests[a].tokens == generate(model, [[3, 5, 2]], 2)[0][0]
    while not gen.done:
        gen.step()
    assert gen.requests[b].finish_reason == "length"
    assert gen.requests[b].tokens == generate(model, [[1, 1]], 9)[0][0]


def test_a_plain_choice_of_heads_that_cannot_resume_does_not_carry_over_to_the_next_generation(monkeypatch):
    """Parallel heads keep caches that plain steps do not fill, so their plain choice is final for a
    generation; the next generation on the engine (fresh prefill, fresh caches) starts from the full
    draft again, not plain for good."""
    model = random_model("parallel", 2, 2)
    eng = Engine(model, 1)
    eng.runner.measures_costs = True
    monkeypatch.setattr(eng.runner, "cost", lambda strategy, need: 1.0 if strategy.k == 0 else 50.0)
    first = eng.start([[3, 5, 2]], Settings(20, mode="spec"))
    out, _ = first.result()
    assert first.policy is not None and not first.policy.resumable and first.chosen == [2, 0], first.chosen
    second = eng.start([[7, 0, 4]], Settings(20, mode="spec"))
    assert (second.mode_now, second.k_now, second.chosen) == ("spec", 2, [2])
    assert second.result()[0] == [generate(model, [[7, 0, 4]], 20)[0][0]]


@pytest.mark.parametrize("mode", ["ntp", "spec"])
def test_a_row_fills_the_context_exactly(mode):
    """Context 32: a prompt of 29 tokens gets 3 new tokens, one of 31 gets 1 (max_new_tokens 10)."""
    model = random_model("parallel", 2, 1)
    assert model.config.max_seq_len == 32
    out, _ = generate(model, [[1] * 29, [2] * 31], 10, mode=mode)
    assert [len(o) for o in out] == [3, 1]
    gen = Engine(model, 1).start([], Settings(10, mode=mode))
    rid = gen.add([3] * 30)
    assert gen.requests[rid].budget == 2 and [len(o) for o in gen.result()[0]] == [2]


def test_cancelling_the_row_in_slot_zero_stops_it_and_frees_the_slot():
    """Two slots: the row in slot 0 is cancelled after its first tokens; it keeps what it had, is
    "cancelled" for good, and a queued request takes slot 0 and decodes as alone; the row in slot 1
    is untouched."""
    model = random_model("parallel", 2, 4)
    gen = Engine(model, 2).start([], Settings(10, mode="spec", stream=True))
    a = gen.add([3, 5, 2], max_new_tokens=10)
    b = gen.add([1, 1], max_new_tokens=9)
    gen.step()
    assert gen.requests[a].slot == 0 and gen.requests[b].slot == 1
    c = gen.add([6, 3], max_new_tokens=7)  # queued: both slots are taken
    while not gen.requests[a].tokens:
        gen.step()
    kept = list(gen.requests[a].tokens)
    gen.cancel(a)
    assert gen.requests[a].done and gen.requests[a].finish_reason == "cancelled"
    while not gen.done:
        gen.step()
    assert gen.requests[a].tokens == kept and gen.requests[a].finish_reason == "cancelled"
    assert gen.requests[c].slot == 0
    assert gen.requests[c].tokens == generate(model, [[6, 3]], 7)[0][0]
    assert gen.requests[b].tokens == generate(model, [[1, 1]], 9)[0][0]


def test_a_request_in_a_reused_slot_counts_only_its_own_steps():
    """One slot: A decodes 12 tokens, then B takes A's slot. B's counters (steps, tokens, the
    histogram of accepted drafts per step) are those of B decoded alone on a fresh engine, not A's
    plus B's."""
    model = random_model("parallel", 2, 4)
    gen = Engine(model, 1).start([], Settings(12, mode="spec", draft=2))
    a = gen.add([3, 5, 2], max_new_tokens=12)
    while not gen.done:
        gen.step()
    b = gen.add([1, 1], max_new_tokens=9)
    while not gen.done:
        gen.step()
    ref = Engine(model, 1).start([], Settings(12, mode="spec", draft=2))
    alone = ref.add([1, 1], max_new_tokens=9)
    while not ref.done:
        ref.step()
    rb, ra, r0 = gen.requests[b], gen.requests[a], ref.requests[alone]
    assert rb.slot == ra.slot == 0 and rb.tokens == r0.tokens
    assert sum(map(sum, ra.hist)) > 0  # A drafted: a histogram left behind would show in B's
    assert rb.hist == r0.hist and rb.row_steps == r0.row_steps and rb.acceptance_per_position == r0.acceptance_per_position
