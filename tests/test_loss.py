"""Target alignment (the classic bug) and the memory-efficient loss against the naive one."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import FAMILIES, tiny_model
from multitoken.errors import UserError
from multitoken.training import loss as loss_mod
from multitoken.training.loss import (IGNORE_INDEX, MTPLoss, Targets, linear_cross_entropy, naive_linear_cross_entropy,
                                      parse_schedule, resolve_loss_kernel, resolve_weights, schedule_value, shift_targets)

X = IGNORE_INDEX
EOS = 0


def test_alignment_single_document():
    # Window of T+1 = 6 tokens; inputs are the first 5.
    w = torch.tensor([[10, 11, 12, 13, 14, 15]])
    assert shift_targets(w, 0, EOS).tolist() == [[11, 12, 13, 14, 15]]
    assert shift_targets(w, 1, EOS).tolist() == [[12, 13, 14, 15, X]]
    assert shift_targets(w, 2, EOS).tolist() == [[13, 14, 15, X, X]]
    assert shift_targets(w, 4, EOS).tolist() == [[15, X, X, X, X]]
    assert shift_targets(w, 5, EOS).tolist() == [[X, X, X, X, X]]  # nothing wraps around


def test_alignment_packed_documents_never_cross_a_boundary():
    # Two documents: [a b EOS] [c d e EOS]; EOS belongs to the document it closes.
    a, b, c, d, e = 21, 22, 23, 24, 25
    w = torch.tensor([[a, b, EOS, c, d, e, EOS, 26]])
    #                  inputs:  a    b    EOS  c    d    e    EOS
    assert shift_targets(w, 0, EOS).tolist() == [[b, EOS, X, d, e, EOS, X]]
    assert shift_targets(w, 1, EOS).tolist() == [[EOS, X, X, e, EOS, X, X]]
    assert shift_targets(w, 2, EOS).tolist() == [[X, X, X, EOS, X, X, X]]
    assert shift_targets(w, 3, EOS).tolist() == [[X, X, X, X, X, X, X]]
    # Without a separator the same window is one document.
    assert shift_targets(w, 1, None).tolist() == [[EOS, c, d, e, EOS, 26, X]]


def test_alignment_with_a_loss_mask_ignores_masked_target_tokens_at_every_depth():
    # A chat window: [u1 u2] is a user turn (masked), [a b c] the model's answer, EOS ends it.
    u1, u2, a, b, c = 31, 32, 33, 34, 35
    w = torch.tensor([[u1, u2, a, b, c, EOS]])
    m = torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    #                  inputs:  u1   u2   a    b    c
    assert shift_targets(w, 0, EOS, m).tolist() == [[X, a, b, c, EOS]]  # u1 predicts u2: masked
    assert shift_targets(w, 1, EOS, m).tolist() == [[a, b, c, EOS, X]]
    assert shift_targets(w, 2, EOS, m).tolist() == [[b, c, EOS, X, X]]
    # A masked token in the middle (a second user turn) is no target at any depth; the rest stay.
    m2 = torch.tensor([[1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    assert shift_targets(w, 0, EOS, m2).tolist() == [[u2, a, X, c, EOS]]
    assert shift_targets(w, 1, EOS, m2).tolist() == [[a, X, c, EOS, X]]
    assert shift_targets(w, 2, EOS, m2).tolist() == [[X, c, EOS, X, X]]
    t = Targets.build(w, 2, EOS, m2)
    assert t.counts.tolist() == [4, 3, 2]  # each depth normalises by its own valid targets
    with pytest.raises(ValueError, match="shape"):
        shift_targets(w, 0, EOS, m[:, :-1])


def test_masked_targets_add_nothing_to_the_loss():
    """Masking a target token changes the loss exactly as dropping that term from a hand-computed
    mean: the per-depth loss is the mean CE over the unmasked targets only."""
    model = tiny_model("parallel", 2, seed=5)
    window = torch.randint(2, 61, (2, 10))
    mask = torch.ones_like(window, dtype=torch.bool)
    mask[0, 3:6] = False
    mask[1, 8] = False
    hiddens = model(window[:, :-1])
    out = MTPLoss(2, weights=[1.0, 1.0, 1.0], eos_id=1)(model, hiddens, window, loss_mask=mask)
    for k in range(3):
        logits = model.logits(hiddens[k], k)  # (B, T, V)
        terms = [F.cross_entropy(logits[b, i], window[b, i + k + 1]) for b in range(2) for i in range(9 - k)
                 if mask[b, i + k + 1]]
        torch.testing.assert_close(out.per_depth_loss[k], torch.stack(terms).mean().detach(), atol=1e-5, rtol=0)
        assert int(out.per_depth_count[k]) == len(terms)


def test_decay_weights_follow_dflash_formula():
    gamma = 2.5
    got = resolve_weights("decay:2.5", "parallel", 4)
    assert got == pytest.approx([1.0] + [math.exp(-(k - 1) / gamma) for k in range(1, 5)], rel=1e-12)
    assert got[1] == 1.0 and got[2] < 1.0  # the first extra depth keeps weight 1
    with pytest.raises(UserError, match="decay:G"):
        resolve_weights("decay:-1", "parallel", 2)
    with pytest.raises(UserError, match="decay:G"):
        resolve_weights("decay:x", "parallel", 2)


def test_alignment_rows_are_independent():
    w = torch.tensor([[1, 2, 3, 4], [5, 6, EOS, 7]])
    assert shift_targets(w, 1, EOS).tolist() == [[3, 4, X], [EOS, X, X]]


def test_each_depth_is_normalised_by_its_own_count():
    model = tiny_model("parallel", 2)
    window = torch.randint(2, 61, (2, 9))
    window[0, 4] = 1  # an EOS removes different numbers of targets at each depth
    hiddens = model(window[:, :-1])
    out = MTPLoss(2, weights=[1.0, 1.0, 1.0], eos_id=1)(model, hiddens, window)
    for k in range(3):
        t = shift_targets(window, k, 1).flatten()
        logits = model.logits(hiddens[k], k).flatten(0, 1)
        ref = F.cross_entropy(logits, t, ignore_index=X)  # mean over valid targets of this depth
        torch.testing.assert_close(out.per_depth_loss[k], ref.detach(), atol=1e-5, rtol=0)
        assert out.per_depth_count[k] == (t != X).sum()
    torch.testing.assert_close(out.loss, out.per_depth_loss.sum(), atol=1e-5, rtol=0)


def test_deepseek_lambda_schedule():
    assert parse_schedule("0.3,0.1@10000") == [(0, 0.3), (10000, 0.1)]
    assert parse_schedule("0.1@5") == [(0, 0.1), (5, 0.1)]
    sched = parse_schedule("0.3,0.1@10")
    assert [schedule_value(sched, s) for s in (0, 9, 10, 99)] == [0.3, 0.3, 0.1, 0.1]
    loss = MTPLoss(2, weights=None, mtp_lambda="0.3,0.1@10")
    assert loss.depth_weights(0) == [1.0, 0.15, 0.15]
    assert loss.depth_weights(10) == pytest.approx([1.0, 0.05, 0.05])
    with pytest.raises(UserError, match="schedule"):
        parse_schedule("high")
    with pytest.raises(UserError, match="need 3 values"):
        MTPLoss(2, weights=[1.0, 0.5])


TOL = dict(atol=2e-5, rtol=1e-5)  # float32: chunked sums reorder additions, nothing more


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("distill", [False, True])
@pytest.mark.parametrize("upstream", [1.0, 3.7])
def test_memory_efficient_loss_equals_naive_in_value_and_gradient(kind, distill, upstream):
    """Also with an upstream gradient other than 1 (a scaled loss, as under a grad scaler): a
    custom backward that ignored it would still agree at 1."""
    window = torch.randint(0, 61, (3, 17))
    window[1, 5] = 1
    results = []
    for efficient in (True, False):
        model = tiny_model(kind, 3, seed=7, n_layers=4)
        loss_fn = MTPLoss(3, weights=None if kind == "sequential" else [1.0, 0.5, 0.3, 0.2], eos_id=1,
                          distill=distill, chunk_rows=5, kernel="chunked" if efficient else "naive")
        out = loss_fn(model, model(window[:, :-1]), window)
        (out.loss * upstream).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.loss, b.loss, **TOL)
    torch.testing.assert_close(a.per_depth_loss, b.per_depth_loss, **TOL)
    torch.testing.assert_close(a.per_depth_acc, b.per_depth_acc, atol=0, rtol=0)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], **TOL, msg=n)


def test_linear_cross_entropy_matches_autograd_in_float64_and_never_builds_full_logits():
    torch.manual_seed(1)
    N, C, V = 37, 8, 23
    h = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, C, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[::5] = X
    scale = torch.rand(N, dtype=torch.float64).float()
    loss, ce, ok = linear_cross_entropy(h, w, t, scale, chunk_rows=4)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref, ref_ce, ref_ok = naive_linear_cross_entropy(h, w, t, scale)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(gh, h.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(gw, w.grad, atol=1e-6, rtol=0)
    assert torch.equal(ok, ref_ok)
    assert (ce[t == X] == 0).all()


def test_chunked_accuracy_counts_only_valid_rows_even_where_token_0_wins():
    """Every row's argmax is token 0, which is also where an ignored row's target is clamped: the
    correct rows are exactly the valid ones whose target is 0 (2 of 6), never an ignored one."""
    h = torch.ones(6, 4)
    w = torch.zeros(5, 4)
    w[0] = 1.0  # logits: 4 for token 0, 0 for the rest
    t = torch.tensor([0, X, 3, 0, X, X])
    _, ce, ok = linear_cross_entropy(h, w, t, torch.ones(6), chunk_rows=4)
    assert ok.tolist() == [True, False, False, True, False, False] and int(ok.sum()) == 2
    assert (ce[t == X] == 0).all()


def test_distillation_targets_are_the_main_heads_later_distribution():
    """Depth k at position i learns softmax(main logits at i+k): perfect heads give zero KL.

    (A cross-entropy to the teacher would report the teacher's entropy here, not 0.)"""
    model = tiny_model("parallel", 2, seed=2)
    window = torch.randint(2, 61, (1, 12))
    hiddens = model(window[:, :-1])
    # A "perfect" head: depth k's state equals the main state k positions later.
    perfect = [hiddens[0]] + [torch.cat([hiddens[0][:, k:], hiddens[0][:, -1:].expand(-1, k, -1)], 1) for k in (1, 2)]
    out = MTPLoss(2, weights=[1.0, 1.0, 1.0], eos_id=1, distill=True)(model, perfect, window)
    for k in (1, 2):
        torch.testing.assert_close(out.per_depth_loss[k], torch.tensor(0.0), atol=1e-5, rtol=0)
        assert out.per_depth_acc[k] == 1.0


@pytest.mark.parametrize("upstream", [3.7, -0.25])
@pytest.mark.parametrize("teacher", [False, True])
def test_linear_cross_entropy_backward_scales_by_its_upstream_gradient(upstream, teacher):
    """Gradients of (loss * c) against plain autograd of the written-out loss in float64.

    Inputs are float32 (the loss accumulates gradients in float32): relative error 1e-5 of the
    largest gradient entry; doubled or unscaled gradients are off by 100% or more."""
    torch.manual_seed(2)
    N, C, V = 29, 8, 19
    h = torch.randn(N, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[::4] = X
    scale = torch.rand(N)
    th, tw = (torch.randn(N, C), torch.randn(V, C)) if teacher else (None, None)
    loss, _, _ = linear_cross_entropy(h, w, t, scale, th, tw, chunk_rows=4)
    (loss * upstream).backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    logp = torch.log_softmax(h64 @ w64.T, -1)
    if teacher:
        target = torch.softmax(th.double() @ tw.double().T, -1)
        ce = -(target * logp).sum(-1) * (t != X)
    else:
        ce = -logp.gather(1, t.clamp(min=0)[:, None])[:, 0] * (t != X)
    ref = (ce * scale.double()).sum()
    (ref * upstream).backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * float(want.abs().max()))


# ---- loss kernels, and the frozen backbone's skipped main loss ------------------------------------


def test_loss_kernel_selection_and_one_line_errors(monkeypatch):
    monkeypatch.setattr(loss_mod, "liger_available", lambda: True)
    assert resolve_loss_kernel("auto", "cuda") == "liger"
    assert resolve_loss_kernel("auto", "cpu") == "chunked"  # ours on the CPU, whatever is installed
    assert resolve_loss_kernel("naive", "cpu") == "naive"
    with pytest.raises(UserError, match="needs a CUDA device.*--loss-kernel chunked"):
        resolve_loss_kernel("liger", "cpu")
    monkeypatch.setattr(loss_mod, "liger_available", lambda: False)
    assert resolve_loss_kernel("auto", "cuda") == "chunked"
    with pytest.raises(UserError, match="not importable.*pip install liger-kernel") as e:
        resolve_loss_kernel("liger", "cuda")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="choose one of auto, chunked, naive, liger"):
        resolve_loss_kernel("fused", "cpu")
    with pytest.raises(UserError, match="loss kernel 'fused'"):
        MTPLoss(1, kernel="fused")


def frozen(kind: str, depth: int = 3):
    model = tiny_model(kind, depth, seed=5, n_layers=4)
    model.freeze_backbone()
    return model


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("distill", [False, True])
def test_skipping_the_frozen_main_loss_leaves_the_heads_gradients_unchanged(kind, distill):
    """skip_main drops the main head's LM-head matmul and CE; the heads' loss and gradients equal
    those of the full loss computed naively (full logits, autograd)."""
    window = torch.randint(0, 61, (3, 17))
    window[1, 5] = 1
    results = []
    for skip in (True, False):
        model = frozen(kind)
        loss_fn = MTPLoss(3, weights=None if kind == "sequential" else [1.0, 0.5, 0.3, 0.2], eos_id=1, distill=distill,
                          chunk_rows=5, kernel="chunked" if skip else "naive", skip_main=skip)
        out = loss_fn(model, model(window[:, :-1]), window)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    assert torch.isnan(a.per_depth_loss[0]) and torch.isnan(a.per_depth_acc[0])  # not computed, and says so
    torch.testing.assert_close(a.per_depth_loss[1:], b.per_depth_loss[1:], **TOL)
    torch.testing.assert_close(a.per_depth_acc[1:], b.per_depth_acc[1:], atol=0, rtol=0)
    assert ga.keys() == gb.keys() and ga and all(n.startswith("mtp.") for n in ga)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], **TOL, msg=n)


def test_skip_main_refuses_a_main_loss_that_has_a_gradient():
    model = tiny_model("parallel", 2)
    window = torch.randint(2, 61, (2, 9))
    with pytest.raises(ValueError, match="skip_main"):
        MTPLoss(2, weights=[1.0, 1.0, 1.0], skip_main=True)(model, model(window[:, :-1]), window)


@pytest.mark.skipif(not torch.cuda.is_available() or not loss_mod.liger_available(), reason="needs CUDA and liger-kernel")
@pytest.mark.parametrize("kind", FAMILIES)
def test_liger_kernel_equals_naive_on_cuda(kind):
    """bf16 autocast, as training runs: both kernels see the same bf16 logits; liger keeps its
    logits gradient in bf16, hence the tolerance."""
    window = torch.randint(0, 61, (4, 65), device="cuda")
    window[1, 5] = 1
    results = []
    for kernel in ("liger", "naive"):
        model = tiny_model(kind, 3, seed=7, n_layers=4, max_seq_len=64).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = MTPLoss(3, weights=None if kind == "sequential" else [1.0, 0.5, 0.3, 0.2], eos_id=1,
                          kernel=kernel)(model, model(window[:, :-1]), window)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.per_depth_loss, b.per_depth_loss, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(a.per_depth_acc, b.per_depth_acc, atol=0.02, rtol=0)
    for n in gb:
        assert (ga[n] - gb[n]).norm() <= 2e-2 * gb[n].norm() + 1e-6, n


def test_named_weight_schedules_resolve_per_depth():
    from multitoken.config import TrainConfig
    from multitoken.training.loss import parse_weights, resolve_weights

    assert resolve_weights("equal", "parallel", 3) == [1.0] * 4
    assert resolve_weights("geometric:0.5", "parallel", 3) == [1.0, 0.5, 0.25, 0.125]
    assert resolve_weights("lambda", "parallel", 3) is None  # MTPLoss's 1, lambda/D form
    assert MTPLoss(3, resolve_weights("lambda", "parallel", 3), "0.3,0.1@10").depth_weights(10) == pytest.approx([1, 0.1 / 3, 0.1 / 3, 0.1 / 3])
    assert resolve_weights(None, "parallel", 2) == [1.0] * 3 and resolve_weights("default", "sequential", 1) is None
    assert resolve_weights([1.0, 0.2], "sequential", 1) == [1.0, 0.2]
    cfg = TrainConfig(loss_weights="Geometric:0.50")  # a TOML string is checked and normalised by validate
    cfg.validate()
    assert cfg.loss_weights == "geometric:0.5"
    for bad in ["geometric:0", "geometric:1.5", "geometric:nan", "lambda:0.3", "cubic"]:
        with pytest.raises(UserError) as e:
            parse_weights(bad)
        assert "\n" not in str(e.value)
