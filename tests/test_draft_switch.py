"""Changing the draft length mid-generation (`generate(draft=None)`): a shorter draft, or plain
steps, never spoil a later longer draft, statistics count each position over the steps that
drafted it, and output stays exact.

The draft lengths here are scripted (a stand-in for `DraftPolicy`), so each test runs the switches
it names whatever the clock says. References are outside the decoding code: the uncached model's
own states on the accepted tokens (`cache_oracle`), plain greedy decoding, and the exact joint
distribution of the first tokens.
"""

from __future__ import annotations

import pytest
import torch

from conftest import FUSED, SHARED
from multitoken.decoding import runner
from multitoken.decoding.api import Engine, Settings, generate
from multitoken.decoding.sampling import Sampling
from test_exactness import ALPHA, PROMPT, chi2_pvalue, exact_joint, random_model
from test_speculative import oracle, spread_model, stub_heads


class Scripted:
    """A `DraftPolicy` stand-in: the lengths to switch to at each choice, then the last one."""

    resumable = True

    def __init__(self, lengths: list[int]) -> None:
        self.lengths, self.asked = list(lengths), []

    def observe(self, hist, steps: int) -> None:
        pass

    def steps_to_probe(self) -> int:
        return 0  # while plain: a check at every step, so the script runs on

    def choose(self, costs, current: int) -> int:
        self.asked.append(current)
        return self.lengths.pop(0) if self.lengths else current


def scripted_generation(model, prompts, n: int, lengths: list[int], every: int = 4, **settings):
    """Decode `prompts` with the draft length switched by script every `every` steps."""
    eng = Engine(model, len(prompts))
    assert eng.runner.measures_costs  # the CPU's timed steps: the loop may choose lengths
    gen = eng.start(prompts, Settings(n, mode="spec", **settings))
    gen.policy, gen.choose_every = Scripted(lengths), every
    return gen.result()


@pytest.fixture
def cpu_costs(monkeypatch):
    monkeypatch.setattr(runner, "CPU_COSTS", True)


def cache_oracle(model, ref: torch.Tensor, log: list):
    """draft_logits stand-in for heads that are right exactly when their state is: depth j's
    draft of position P names ref's token there when the drafter's state equals the uncached
    model's depth-j state on ref at position P-j-1 (what a drafter whose cache holds only entries
    written from the accepted tokens computes), and a wrong token otherwise."""
    with torch.no_grad():
        states = model(ref)  # [main, d1..dK], normed, no cache
    V = model.config.vocab_size

    def fake(model, depth, h, next_pos):
        P = int(next_pos[0])
        good = P < ref.shape[1] and torch.allclose(h[0], states[depth][0, P - depth - 1], atol=1e-4, rtol=1e-4)
        log.append((depth, P, good))
        tok = ref[0, min(P, ref.shape[1] - 1)]
        return torch.nn.functional.one_hot((tok if good else (tok + 1) % V)[None], V).float() * 20.0

    return fake


SCRIPTS = {
    "shorter, then longer": [1, 1, 3, 3, 2, 3],
    "plain, then drafts": [0, 3, 1, 0, 2, 3],
}


@pytest.mark.parametrize("kind", ["sequential", SHARED, FUSED])
@pytest.mark.parametrize("script", SCRIPTS)
def test_drafts_after_a_shorter_stretch_are_those_of_a_drafter_that_never_stopped(kind, script, cpu_costs):
    """Heads right whenever their state is right: every draft, before and after shorter drafts or
    plain steps, must be. Without the catch-up (modules deeper than the running length kept
    stale entries) depths 2-3 were never right again after the first shorter stretch: measured
    before the fix, acceptance [1.0, 0.19, 0.19] over the steps of 3 drafts."""
    K = 3
    model = spread_model(kind, K, 6, max_seq_len=160)
    prompt = [4, 5, 6, 7, 8]
    full, _ = generate(model, [prompt], 140)
    ref = torch.tensor([prompt + full[0]])
    log = []
    stub_heads(model, cache_oracle(model, ref, log))
    out, stats = scripted_generation(model, [prompt], 120, SCRIPTS[script])
    assert out[0] == full[0][:120]
    assert sorted(set(stats.chosen_draft)) == sorted(set([K] + SCRIPTS[script])), stats.chosen_draft
    bad = [(d, P) for d, P, good in log if not good and P < ref.shape[1] - 1]
    assert not bad, bad[:10]
    assert stats.acceptance_per_position == [1.0] * K


def test_drafts_after_a_long_plain_stretch_are_those_of_a_drafter_that_never_stopped(cpu_costs):
    """About 200 plain steps, then 3 drafts: the catch-up rewrites 256 positions in four chunks of
    64, the oldest of which holds the first positions the plain steps did not keep; heads right
    whenever their state is right must be right at every draft after it."""
    K = 3
    model = spread_model("sequential", K, 6, max_seq_len=300)
    prompt = [4, 5, 6, 7, 8]
    full, _ = generate(model, [prompt], 270)
    ref = torch.tensor([prompt + full[0]])
    log = []
    stub_heads(model, cache_oracle(model, ref, log))
    out, stats = scripted_generation(model, [prompt], 250, [0] * 200 + [K])
    assert out[0] == full[0][:250]
    assert stats.chosen_draft == [K, 0, K], stats.chosen_draft
    after = [(d, P, good) for d, P, good in log if P > 230 and P < ref.shape[1] - 1]
    assert after and all(good for _, _, good in after), [x for x in after if not x[2]][:10]


@pytest.mark.parametrize("kind", ["sequential", "parallel", "medusa"])
def test_acceptance_per_position_counts_only_the_steps_that_drafted_it(kind, cpu_costs):
    """Heads right at depth 1 only, lengths switched between 3, 1 and plain: position 1 is
    accepted in every step that drafted it and positions 2-3 in none, so acceptance is [1, 0, 0]
    whatever the lengths (dividing by every step, plain ones included, gives less than 1 at
    position 1). Steps with drafts and drafted tokens are a replay of the script."""
    K = 3
    model = spread_model(kind, K, 2, max_seq_len=120)
    prompt = [7, 8, 9, 10]
    full, _ = generate(model, [prompt], 100)
    ref = torch.tensor([prompt + full[0]])
    stub_heads(model, oracle(ref, 61, lambda c, d: d == 1))
    # Heads that draft from the verification pass resume after plain steps with the drafts they
    # kept (one step of stale drafts, `_Drafting.resume`), and parallel heads never do: no plain here.
    lengths = [1, 0, 3, 1, 3] if kind == "sequential" else [1, 3, 1, 2]
    out, stats = scripted_generation(model, [prompt], 90, lengths)
    assert out[0] == full[0][:90]
    assert stats.acceptance_per_position == [1.0, 0.0, 0.0], (stats.chosen_draft, stats.acceptance_per_position)
    # A drafting step emits 2 tokens (one accepted draft, one bonus), a plain one 1.
    draft_steps = stats.new_tokens - 1 - stats.row_steps  # the prefill's token aside
    assert 0 < draft_steps < stats.row_steps


def test_a_row_reports_its_drafted_tokens_step_by_step(cpu_costs):
    """Request counters against a replay of the script: steps with drafts and drafted tokens."""
    model = spread_model("sequential", 3, 2, max_seq_len=120)
    prompt = [7, 8, 9, 10]
    full, _ = generate(model, [prompt], 100)
    ref = torch.tensor([prompt + full[0]])
    stub_heads(model, oracle(ref, 61, lambda c, d: False))  # never right: one token a step
    eng = Engine(model, 1)
    gen = eng.start([prompt], Settings(40, mode="spec"))
    gen.policy, gen.choose_every = Scripted([1, 0, 2]), 4
    gen.result()
    r = gen.requests[0]
    # Steps 1-4 draft 3 (the plan), 5-8 draft 1, then plain steps with a check each (one step), then 2.
    runs = [(3, 4), (1, 4), (0, 1), (2, r.row_steps - 9)]
    assert gen.chosen == [3, 1, 0, 2] and r.row_steps == 39
    assert r.draft_steps == sum(n for k, n in runs if k) and r.drafted == sum(k * n for k, n in runs)
    assert r.accepted == [0, 0, 0] and r.acceptance_per_position == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("kind", ["sequential", "medusa", "parallel"])
def test_sampling_stays_exact_across_switches(kind, cpu_costs):
    """Temperature 0.7, lengths switched after every step (2 -> 1 -> plain -> 2 -> 1): the first
    four tokens have the model's exact joint law (chi-square against enumeration). A resumed
    chain draws fresh drafts (sequential modules) or scores kept drafts under a point mass
    (heads that draft from the verification pass); keeping a kept draft's stale q instead was
    planted and caught for medusa (a row's q from an earlier step no longer matches its draft
    after the side prefill copies) -- see the docstring of `_Drafting.resume`."""
    rows = 6000
    model = random_model(kind, 2, 0)
    joint = exact_joint(model, PROMPT, 4, 0.7)
    # Step 1 drafts 2 (the prefill's drafts), step 2 runs the first switch, step 3 the resumed
    # length: it decides token 4 whenever steps 1 and 2 emitted one token each.
    lengths = [0, 2, 1, 0] if kind != "parallel" else [1, 2, 1, 2]
    eng = Engine(model, rows)
    gen = eng.start([PROMPT] * rows, Settings(4, mode="spec", sampling=Sampling(0.7), seed=11))
    gen.policy, gen.choose_every = Scripted(lengths), 1
    out, stats = gen.result()
    assert len(stats.chosen_draft) >= 3, stats.chosen_draft
    p = chi2_pvalue(out, joint)
    assert p > ALPHA, (kind, p, stats.chosen_draft)


def test_a_row_that_joined_during_a_short_stretch_gets_drafts_its_q_can_have_drawn(cpu_costs):
    """Medusa heads at temperature 0.7: a row joins (prefilled apart, with one draft) while the
    loop drafts 1, then the loop drafts 2. The row's second draft was never drawn in its side
    state (its q there is all zeros), so verifying it under that q would accept it whatever the
    target says (u * 0 < p); `resume` gives such kept drafts a point mass. Checked on the state
    right after the switch: every draft has positive probability under the q it is verified
    with (planted without the point mass: q(d) = 0 for the joined row's second draft)."""
    model = random_model("medusa", 2, 0)
    eng = Engine(model, 2)
    gen = eng.start([PROMPT], Settings(24, mode="spec", sampling=Sampling(0.7), seed=3))
    gen.policy, gen.choose_every = Scripted([1, 1, 2]), 2
    while gen.chosen[-1] != 1:
        gen.step()
    gen.add([2, 6, 1, 4])
    joined = False
    while gen.chosen[-1] != 2 and not gen.done:
        gen.step()
        joined = joined or len(gen.active) == 2
    assert joined and gen.chosen == [2, 1, 2] and len(gen.active) == 2, (gen.chosen, joined)
    st = eng.state
    q_of_drafts = st.qd[:, :2].gather(2, st.drafts[:, :2, None])[..., 0]  # (B, 2)
    assert bool((q_of_drafts > 0).all()), q_of_drafts
