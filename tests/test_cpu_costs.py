"""CPU step costs: the runner times steps, probes new kinds without a trace, and generate uses them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multitoken.decoding import runner
from multitoken.decoding.api import engine_for, generate
from multitoken.decoding.sampling import Sampling
from test_speculative import oracle, spread_model, stub_heads


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
    # run_costs: only the steps run; a kind only probed (chain:1 here, never run) is not in it.
    assert eng.runner.cost(eng.strategy("spec", 1, Sampling()), 12) is not None
    assert any(key[:2] == ("chain", 1) for key, _ in eng.runner.costs)
    runs = eng.runner.run_costs()
    assert {key[:2] for key, _ in runs} == {("chain", 2)} and set(runs.values()) == {1.0}


def test_wrong_drafts_make_the_cpu_loop_draft_less(cpu_costs, monkeypatch):
    """Heads that are never right: with measured CPU costs `generate(draft=None)` leaves the full
    draft (the same heads with the choice off keep drafting 3 tokens a step); output stays exact."""
    model = spread_model("medusa", 3, 2)
    prompt = [[7, 8, 9, 10]]
    full, _ = generate(model, prompt, 60)
    ref = torch.tensor([prompt[0] + full[0]])
    stub_heads(model, oracle(ref, 61, lambda c, d: False))
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
    other = spread_model("medusa", 3, 1)
    changes = [lambda: model.mtp.heads[1].blocks[0].linear.weight.add_(0.5),  # an optimizer step
               lambda: model.mtp.heads[2].blocks[0].linear.bias.sub_(0.25),
               lambda: model.mtp.load_state_dict(other.mtp.state_dict()),  # heads loaded in place
               lambda: model.double()]  # moved: new tensors under the same parameters
    for change in [*changes, None]:
        x = h.to(next(model.parameters()).dtype)
        fused = model.mtp.decode_states(model.shared, 3, BackboneStates(idx=None, trunk=x, last=x, main=x), None, None, None, None)
        assert fused.shape == (2, 5, 3, model.config.dim) and fused.dtype == x.dtype
        for j, head in enumerate(model.mtp.heads):  # each head's own block, as training runs it
            torch.testing.assert_close(fused[:, :, j], head.blocks(x), rtol=1e-5, atol=1e-6)
        if change is not None:
            with torch.no_grad():
                change()
    x = h.double()
    assert model.mtp.decode_states(model.shared, 2, BackboneStates(idx=None, trunk=x, last=x, main=x), None, None, None,
                                   None).shape[2] == 2


@pytest.mark.parametrize("kind", ["medusa", "parallel", "sequential"])
def test_all_draft_logits_in_one_matmul_equal_each_heads_own(kind):
    """`draft_logits_all` (one matmul: a batched one over Medusa's own LM heads, one over the
    shared head otherwise) gives what each depth's `draft_logits` gives, over the full vocabulary
    and over a draft vocabulary, and follows LM-head weights written in place."""
    model = spread_model(kind, 3, 0)
    heads, shared = model.mtp, model.shared
    h = torch.randn(2, 3, model.config.dim)
    for ids in (None, torch.tensor([0, 5, 9, 17, 40, 60])):
        heads.set_draft_vocab(ids)
        for _ in range(2):
            got = heads.draft_logits_all(shared, h)
            want = torch.stack([F.linear(h[:, j - 1], model.unembed_weight(j) if ids is None else model.unembed_weight(j)[ids])
                                for j in range(1, 4)], 1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            with torch.no_grad():
                model.unembed_weight(3).mul_(1.5)


@pytest.mark.parametrize("right", [True, False])
def test_cpu_checks_follow_the_budget_and_waste_no_step(monkeypatch, right):
    """Rows that stop at their budget are checked only when one may have spent it (the CPU's
    default): the output is plain greedy's, the loop runs exactly the steps a check after every
    step runs (none after the budget is spent) and reads the device far less often."""
    model = spread_model("medusa", 3, 1)
    prompt = [[7, 8, 9, 10]]
    full, _ = generate(model, prompt, 60)
    stub_heads(model, oracle(torch.tensor([prompt[0] + full[0]]), 61, lambda c, d: right))
    eng = engine_for(model, 1)
    calls = []
    step = type(eng.runner).step
    monkeypatch.setattr(type(eng.runner), "step", lambda self, s, need: (calls.append(1), step(self, s, need)))
    runs = {}
    for every in (1, None):
        calls.clear()
        out, stats = generate(model, prompt, 60, mode="spec", draft=3, sync_every=every)
        assert out == full
        runs[every] = (len(calls), stats.host_syncs)
    assert runs[None][0] == runs[1][0] == (15 if right else 59)
    assert runs[None][1] < runs[1][1] / 3, runs
