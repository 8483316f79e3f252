"""Distributed training on CPU (gloo): 2-process DDP and FSDP2 give the loss of one process on
the same global batch, and an FSDP2 run stopped and resumed continues the same curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multitoken.errors import UserError
from multitoken.model import Transformer
from multitoken.training import parallel
from multitoken.training.trainer import train
from train_helpers import make_data, one_thread, tiny_train_config  # noqa: F401 (one_thread is a fixture)

# fp32 on CPU: the all-reduce sums gradients in another order than one process does, so values
# agree to rounding, amplified a little by 4 Adam steps; measured max relative difference 1.2e-7 on
# losses, 0 on gradient norms (which, unlike AdamW's weights, see a doubled or halved gradient).
RTOL = 1e-4
WEIGHT_ATOL = 1e-5  # measured max |difference| 1.3e-6 after 4 steps

ARGS = dict(steps=4, batch_size=4, seq_len=32, warmup=2, log_every=1, eval_every=0, save_every=2, seed=0)


def cli_args(**kw) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]


def torchrun(data: Path, out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "multitoken", "train", "--data", str(data), "--out", str(out), "--device", "cpu", "--quiet",
           "--heads", "parallel:2", *cli_args(**ARGS), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A session of its own so that a timeout kills the workers too, not only torchrun.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in 300 s: {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]


def train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def losses(run: Path) -> list[list[float]]:
    return [r["loss_per_depth"] for r in train_rows(run)]


def grad_norms(run: Path) -> list[float]:
    """The gradient norm of every step, before clipping: unlike the weights after AdamW (which
    is invariant to the gradient's scale), it changes when gradients are doubled or halved."""
    return [r["grad_norm"] for r in train_rows(run)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    data = make_data(root)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    train(tiny_train_config(**ARGS, heads="parallel:2"), data, root / "single", progress=False)
    torch.set_num_threads(n)
    return data, root


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(setup):
    data, root = setup
    torchrun(data, root / "ddp")
    ref, got = losses(root / "single"), losses(root / "ddp")
    assert len(got) == len(ref) == 4
    for a, b in zip(ref, got):
        assert b == pytest.approx(a, rel=RTOL)
    assert grad_norms(root / "ddp") == pytest.approx(grad_norms(root / "single"), rel=RTOL)
    w1, w2 = load_file(str(root / "single/model.safetensors")), load_file(str(root / "ddp/model.safetensors"))
    assert all(torch.allclose(w1[k], w2[k], rtol=RTOL, atol=WEIGHT_ATOL) for k in w1)


@pytest.mark.slow
def test_fsdp2_two_processes_stop_and_resume_equal_one_process(setup):
    """FSDP2 (fully_shard) works on gloo CPU in torch 2.13; its checkpoints gather full tensors on rank 0."""
    data, root = setup
    torchrun(data, root / "fsdp", "--fsdp", "--stop-after", "2")
    assert len(losses(root / "fsdp")) == 2
    torchrun(data, root / "fsdp", "--fsdp", "--resume")
    ref, got = losses(root / "single"), losses(root / "fsdp")
    assert len(got) == 4
    for a, b in zip(ref, got):
        assert b == pytest.approx(a, rel=RTOL)
    assert grad_norms(root / "fsdp") == pytest.approx(grad_norms(root / "single"), rel=RTOL)
    w1, w2 = load_file(str(root / "single/model.safetensors")), load_file(str(root / "fsdp/model.safetensors"))
    assert w1.keys() == w2.keys()
    assert all(torch.allclose(w1[k], w2[k], rtol=RTOL, atol=WEIGHT_ATOL) for k in w1)


def test_single_process_wrappers_are_identity():
    from conftest import tiny_config

    info = parallel.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    model = Transformer(tiny_config("parallel", 2))
    assert parallel.apply_ddp(model, info) is model and parallel.apply_fsdp(model, info) is model
    assert parallel.unwrap(model) is model
    t = torch.ones(3)
    assert parallel.all_reduce_sum(t) is t and parallel.all_gather_object({"a": 1}) == [{"a": 1}]


@pytest.mark.parametrize("kind", ["parallel", "sequential", "medusa"])
def test_compile_and_fsdp_units_keep_parameter_names(kind):
    from conftest import tiny_config

    model = Transformer(tiny_config(kind, 2))
    names = list(model.state_dict())
    units = list(parallel._mtp_units(model))
    assert len(units) == 2
    if kind == "medusa":  # the projections stay with the root: the loss reads them outside any module call
        assert all(not any(p is h.lm_head.weight for p in u.parameters()) for u, h in zip(units, model.mtp.heads))
    parallel.apply_compile(model)  # lazy: compiles at the first call, which this test does not make
    assert list(model.state_dict()) == names


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_compiled_training_step_equals_eager(kind):
    """`apply_compile` really compiles (inductor, C++ on CPU): loss and gradients of one training
    step equal eager's to float32 rounding (measured: loss identical, gradients within 6e-7 of
    each tensor's largest entry). Slow: the first compile takes ~30 s on one CPU thread."""
    import copy

    from conftest import tiny_config
    from multitoken.training.loss import MTPLoss

    torch.manual_seed(0)
    eager = Transformer(tiny_config(kind, 2))
    compiled = copy.deepcopy(eager)
    parallel.apply_compile(compiled)
    window = torch.randint(2, 61, (2, 17))
    torch._dynamo.reset()
    results = []
    for model in (eager, compiled):
        out = MTPLoss(2, eos_id=1)(model, model(window[:, :-1]), window)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    units = [*compiled.layers, *parallel._mtp_units(compiled)]
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in units)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # dynamo traced the blocks
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=0)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=n)


# ---- recomputation of the heads' blocks ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["parallel", "sequential", "medusa"])
def test_recompute_on_and_off_give_identical_gradients_and_on_recomputes(kind):
    from conftest import tiny_model
    from multitoken.training.loss import MTPLoss

    window = torch.randint(2, 61, (2, 17))
    grads, calls = [], []
    for mode in ("on", "off"):
        model = tiny_model(kind, 2, seed=3).train()
        assert parallel.apply_recompute(model, mode, 32, torch.device("cpu"), bf16=False).endswith(mode)
        unit, n = next(iter(parallel._mtp_units(model))), [0]
        forward = unit.forward  # counted by wrapping: module hooks do not fire when checkpoint recomputes

        def counted(*args, forward=forward, n=n):
            n[0] += 1
            return forward(*args)

        unit.forward = counted
        MTPLoss(2, weights=[1.0, 0.5, 0.5], eos_id=1)(model, model(window[:, :-1]), window).loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        calls.append(n[0])
    assert calls == [2, 1]  # recomputed in backward with "on", stored with "off"
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


def test_recompute_auto_follows_the_memory_estimate(monkeypatch):
    from conftest import tiny_model

    model = tiny_model("parallel", 2)
    need = parallel.training_bytes(model, 1024, bf16=True, recompute=False)
    assert need > parallel.training_bytes(model, 1024, bf16=True, recompute=True)
    monkeypatch.setattr(parallel, "device_memory", lambda device: int(need / parallel.RECOMPUTE_BUDGET) + 1)
    assert "off (auto" in parallel.apply_recompute(model, "auto", 1024, torch.device("cpu"), True)
    assert model.mtp.recompute is False
    monkeypatch.setattr(parallel, "device_memory", lambda device: int(need / parallel.RECOMPUTE_BUDGET) - 1)
    assert "on (auto" in parallel.apply_recompute(model, "auto", 1024, torch.device("cpu"), True)
    assert model.mtp.recompute is True
    with pytest.raises(UserError, match="--recompute 'maybe'"):
        parallel.apply_recompute(model, "maybe", 1024, torch.device("cpu"), True)
