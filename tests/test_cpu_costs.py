"""CPU step costs: the runner times steps, probes new kinds without a trace, and generate uses them."""

from __future__ import annotations

import pytest
import torch

from multitoken.decoding import drafting, runner
from multitoken.decoding.api import engine_for, generate
from multitoken.decoding.sampling import Sampling
from test_speculative import oracle, spread_model


@pytest.fixture
def cpu_costs(monkeypatch):
    monkeypatch.setattr(runner, "CPU_COSTS", True)


def test_probing_a_step_kind_leaves_no_trace(cpu_costs):
    """A kind timed mid-generation (every row done) gives the loop state back: the next steps
    emit what they would have emitted, and the output stays plain greedy's."""
    model = spread_model("medusa", 3, 1)
    prompt = [[5, 6, 7, 8]]
    plain, _ = generate(model, prompt, 30)
    out, _ = generate(model, prompt, 30, mode="spec", draft=3)
    assert out == plain
    eng = engine_for(model, 1)
    before = [t.clone() for t in eng.state.small_tensors()]
    n = int(eng.state.emitter.count[0])
    emitted = eng.state.emitter.out[:, :n].clone()  # slots past the count are scratch by design
    for kind in (eng.strategy("ntp", 0, Sampling()), eng.strategy("spec", 2, Sampling())):
        assert eng.runner.cost(kind, 40) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, eng.state.small_tensors()))
    assert torch.equal(emitted, eng.state.emitter.out[:, :n])
    assert {key[0][0] for key in eng.runner.costs} >= {"plain", "chain"}


def test_timed_steps_update_the_cost_of_their_kind(cpu_costs, monkeypatch):
    """Each CPU step is timed and moves its kind's estimate (here: a clock that says 1 s a step)."""
    model = spread_model("medusa", 2, 0)
    generate(model, [[3, 4, 5]], 8, mode="spec", draft=2)
    eng = engine_for(model, 1)
    eng.runner.costs.clear()
    ticks = iter(range(10**6))
    monkeypatch.setattr(runner, "CPU_CLOCK", lambda: float(next(ticks)))
    generate(model, [[3, 4, 5]], 12, mode="spec", draft=2)
    chain = {v for (key, live), v in eng.runner.costs.items() if key[:2] == ("chain", 2)}
    assert chain == {1.0}


def test_wrong_drafts_make_the_cpu_loop_draft_less(cpu_costs, monkeypatch):
    """Heads that are never right: with measured CPU costs `generate(draft=None)` leaves the full
    draft (the same heads with the choice off keep drafting 3 tokens a step); output stays exact."""
    model = spread_model("medusa", 3, 2)
    prompt = [[7, 8, 9, 10]]
    full, _ = generate(model, prompt, 60)
    ref = torch.tensor([prompt[0] + full[0]])
    monkeypatch.setattr(drafting, "draft_logits", oracle(ref, 61, lambda c, d: False))
    out, stats = generate(model, prompt, 60, mode="spec")
    assert out == full
    assert stats.chosen_draft[0] == 3 and stats.chosen_draft[-1] < 3, stats.chosen_draft
    monkeypatch.setattr(runner, "CPU_COSTS", False)
    model2 = spread_model("medusa", 3, 2)
    _, stats = generate(model2, prompt, 60, mode="spec")
    assert stats.chosen_draft == [3]


def test_medusa_heads_draft_in_one_matmul_as_they_train():
    """The stacked residual blocks give each head's own state (the training forward's), and follow
    weights written in place (an optimizer step) instead of keeping the old stack."""
    from multitoken.model.heads.base import BackboneStates

    model = spread_model("medusa", 3, 0)
    h = torch.randn(2, 5, model.config.dim)
    states = BackboneStates(idx=None, trunk=h, last=h, main=h)
    for _ in range(2):
        fused = model.mtp.decode_states(model.shared, 3, states, None, None, None, None)
        for got, head in zip(fused, model.mtp.heads):
            torch.testing.assert_close(got, head.blocks(h), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            model.mtp.heads[1].blocks[0].linear.weight.add_(0.5)
    assert len(model.mtp.decode_states(model.shared, 2, states, None, None, None, None)) == 2
