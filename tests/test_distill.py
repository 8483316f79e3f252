"""Self-distillation with the teacher computed once: against a float64 reference written here."""

import pytest
import torch

from conftest import tiny_model
from multitoken.training.distill import distill_kl, naive_distill_kl
from multitoken.training.loss import IGNORE_INDEX, MTPLoss, Targets


def reference(h0, w0, hs, ws, valid, scales):
    """sum_k scale_k * sum_{valid i} KL(p_teacher(. | t<=i+k) || q_k(. | i)), one position at a time."""
    T = h0.shape[1]
    total = h0.new_zeros(())
    for j, (h, w) in enumerate(zip(hs, ws)):
        k = j + 1
        for b in range(h0.shape[0]):
            for i in range(T - k):
                if not valid[j, b, i]:
                    continue
                p = torch.softmax(w0 @ h0[b, i + k], -1)  # the teacher's row at i+k
                logq = torch.log_softmax(w @ h[b, i], -1)
                total = total + scales[j] * (p * (p.log() - logq)).sum()
    return total


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("chunk_rows", [3, 7, 0])
def test_distill_kl_equals_the_reference_in_value_and_gradients_float64(shared, chunk_rows):
    torch.manual_seed(3)
    B, T, C, V, D = 2, 9, 5, 11, 3
    h0 = torch.randn(B, T, C, dtype=torch.float64)
    w0 = torch.randn(V, C, dtype=torch.float64)
    hs = [torch.randn(B, T, C, dtype=torch.float64, requires_grad=True) for _ in range(D)]
    w_one = torch.randn(V, C, dtype=torch.float64, requires_grad=True)
    ws = [w_one] * D if shared else [torch.randn(V, C, dtype=torch.float64, requires_grad=True) for _ in range(D)]
    valid = torch.rand(D, B, T) > 0.25
    for j in range(D):
        valid[j, :, T - j - 1:] = False  # no teacher row past the window (shift_targets says so too)
    scales = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)
    params = hs + list(dict.fromkeys(ws))
    ref = reference(h0, w0, hs, ws, valid, scales)
    ref_grads = torch.autograd.grad(ref, params)
    loss, kl, ok = distill_kl(h0, w0, hs, ws, valid, scales, chunk_rows)
    grads = torch.autograd.grad(3.0 * loss, params)  # an upstream gradient other than 1 scales them all
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, 3.0 * r, atol=1e-12, rtol=1e-12)
    n_loss, n_kl, n_ok = naive_distill_kl(h0, w0, hs, ws, valid, scales)
    torch.testing.assert_close(n_loss.double(), ref, atol=1e-5, rtol=1e-5)  # the naive kernel: float32 logits
    torch.testing.assert_close(kl, n_kl.double(), atol=1e-5, rtol=1e-5)
    assert torch.equal(ok, n_ok)


def test_the_teacher_logits_are_computed_once_per_batch_not_once_per_depth(monkeypatch):
    """Count the matmuls against the teacher's matrix: one per chunk, for all depths together."""
    torch.manual_seed(0)
    B, T, C, V, D = 2, 16, 4, 13, 4
    h0, w0 = torch.randn(B, T, C), torch.randn(V, C)
    hs = [torch.randn(B, T, C, requires_grad=True) for _ in range(D)]
    ws = [torch.randn(V, C) for _ in range(D)]
    valid = torch.ones(D, B, T, dtype=torch.bool)
    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append(b.data_ptr())
        return real(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    distill_kl(h0, w0, hs, ws, valid, torch.ones(D), chunk_rows=0)  # one chunk covers T
    monkeypatch.undo()
    assert seen.count(w0.t().data_ptr()) == 1


def test_mtp_loss_distills_every_depth_and_ignores_masked_targets():
    """Through MTPLoss on a model: per-depth KL means over valid targets only; a masked target
    position contributes nothing (its KL term included)."""
    model = tiny_model("sequential", 2, seed=4)
    window = torch.randint(2, 61, (2, 13))
    mask = torch.ones_like(window, dtype=torch.bool)
    mask[0, :6] = False  # a prompt: its tokens are never targets
    hiddens = model(window[:, :-1])
    out = MTPLoss(2, weights=[1.0, 1.0, 1.0], eos_id=1, distill=True)(model, hiddens, window, loss_mask=mask)
    t = Targets.build(window, 2, 1, mask)
    valid = (t.tokens[1:] != IGNORE_INDEX).view(2, 2, 12)
    h = [x.detach().double() for x in hiddens]
    w = model.lm_head.weight.detach().double()
    for k in (1, 2):
        one = torch.zeros(2, dtype=torch.float64)
        one[k - 1] = 1.0
        ref = reference(h[0], w, h[1:], [w, w], valid, one) / valid[k - 1].sum()
        torch.testing.assert_close(out.per_depth_loss[k].double(), ref, atol=1e-5, rtol=1e-5)
        assert out.per_depth_count[k] == valid[k - 1].sum() < 2 * (12 - k)  # the mask removed targets


@pytest.mark.slow
def test_the_compiled_chunk_math_equals_the_eager_one():
    """torch.compile of the per-chunk math (what --compile turns on) changes nothing (~70 s on a CPU)."""
    torch.manual_seed(0)
    B, T, C, V, D = 2, 20, 8, 50, 3
    h0, w0 = torch.randn(B, T, C), torch.randn(V, C)
    hs = [torch.randn(B, T, C, requires_grad=True) for _ in range(D)]
    ws = [torch.randn(V, C, requires_grad=True) for _ in range(D)]
    valid, scales = torch.rand(D, B, T) > 0.2, torch.rand(D)
    runs = []
    for compiled in (False, True):
        loss, kl, ok = distill_kl(h0, w0, hs, ws, valid, scales, chunk_rows=14, compiled=compiled)
        runs.append((loss, kl, ok, torch.autograd.grad(loss, hs + ws)))
    (a, b) = runs
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert torch.equal(a[2], b[2])
    for x, y in zip(a[3], b[3]):
        torch.testing.assert_close(x, y)
