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
